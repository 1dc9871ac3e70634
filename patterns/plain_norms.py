"""RMSNorms written in plain PyTorch, recognized for ``FusionPass(numerics="tolerant")``.

The spellings other code emits, as post-grad graphs carry them (x bf16 or fp16, ``xf = x.float()``,
``n = xf · rsqrt(mean(xf², -1) + eps)``; the square as ``pow(xf, 2)`` or ``xf · xf``, the mean
over the last dim, written ``-1`` or ``ndim - 1``)::

    weight after the cast back   w · n.to(x.dtype)          transformers' *RMSNorm classes
    weight in the fp32 product   (n · w).to(x.dtype)        torch.nn.RMSNorm, F.rms_norm, w.float()
    weightless                   n.to(x.dtype)              DeepSeek-V4's per-head q norm

:func:`canonicalize` replaces each with our op of the same math, ``fusion_ops.rms_norm`` or
``fusion_ops.weightless_rms_norm``; the families' patterns then fuse it like a norm of ours. The
weight after the cast back becomes ``rms_norm`` too (one rounding, not two): Inductor drops the
intermediate rounding to x's dtype inside its kernel (its default, without
``emulate_precision_casts``), so the compile without the pass rounds once as well, and one
rounding is never further from the exact value than two. What stays different is how the sum
of squares is reduced (Inductor's order and vectorization against the fused kernel's) and
Inductor's ``rsqrt`` against the correctly rounded 1/rms of our kernels: the last bit of the
normed value may differ, which is why this runs only in the tolerant mode (the contract and its
bound: ``docs/numerics.md``, :data:`BOUND_ULPS`).

A canonical op no pattern consumed is put back as the original nodes (:func:`restore`): the
tolerant mode changes bits only where it fuses.

Never canonicalized (the meaning would change): a mean over another dim, without ``keepdim``,
or of another tensor than the squared one; an fp32 ``x`` (no rounding point to reproduce); a
weight that is not one value per column of x's dtype (or fp32 inside the product); an
intermediate (the fp32 sum of squares, 1/rms, the fp32 normed value) read by anything else.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

import fusion_ops  # noqa: F401  (defines torch.ops.fusion_ops)

aten = torch.ops.aten
_CAST = torch.ops.prims.convert_element_type.default
_HALF = (torch.bfloat16, torch.float16)
#: the tolerant contract: a fused normed value is at most this many units in the last place of
#: x's dtype further from the fp64 evaluation of the norm than the compile without the pass
BOUND_ULPS = 1


@dataclass
class Canonical:
    """One canonicalized region: its canonical op call, the original nodes kept aside as a graph
    (placeholders for ``inputs``) to put back if no pattern consumed the op, and the nodes that
    stand for the original outputs (the canonical op itself unless given)."""

    spelling: str  # "cast_then_weight", "weight_in_product", "weightless", ...
    canonical: torch.fx.Node
    original: torch.fx.Graph
    inputs: tuple[torch.fx.Node, ...]
    replacements: tuple[torch.fx.Node, ...] = ()


def _val(node: object) -> object:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _other(node: torch.fx.Node, known: torch.fx.Node) -> object:
    """The argument of a binary ``node`` that is not ``known`` (None if neither or both)."""
    a, b = node.args[:2]
    if a is known and b is not known:
        return b
    if b is known and a is not known:
        return a
    return None


def _is_mul(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.target is aten.mul.Tensor and not node.kwargs


def _is_cast_to(node: object, dtype: torch.dtype) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.target is _CAST
        and len(node.args) == 2
        and node.args[1] == dtype
    )


def _column_weight(w: object, x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    v = _val(w)
    return (
        isinstance(v, torch.Tensor)
        and v.dim() == 1
        and v.shape[0] == x.shape[-1]
        and v.dtype in dtypes
        and v.device == x.device
    )


def _reduction(rsqrt: torch.fx.Node) -> tuple[torch.fx.Node, float, list[torch.fx.Node]] | None:
    """``rsqrt(mean(xf², [-1], keepdim=True) + eps)`` → (xf, eps, the nodes in between)."""
    add = rsqrt.args[0]
    if not isinstance(add, torch.fx.Node) or add.target not in (aten.add.Tensor, aten.add.Scalar):
        return None
    if add.kwargs or len(add.args) != 2:
        return None
    mean, eps = add.args
    if not isinstance(mean, torch.fx.Node):
        mean, eps = eps, mean
    if not isinstance(mean, torch.fx.Node) or mean.target is not aten.mean.dim:
        return None
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or eps < 0:
        return None
    if mean.kwargs or len(mean.args) != 3 or mean.args[2] is not True:
        return None
    square = mean.args[0]
    v = _val(square)
    if not isinstance(v, torch.Tensor) or list(mean.args[1]) not in ([-1], [v.dim() - 1]):
        return None
    if not isinstance(square, torch.fx.Node):
        return None
    if square.target is aten.pow.Tensor_Scalar and square.args[1] == 2:
        xf = square.args[0]
    elif _is_mul(square) and square.args[0] is square.args[1]:
        xf = square.args[0]
    else:
        return None
    if not isinstance(xf, torch.fx.Node):
        return None
    inner = [square, mean, add]
    if any(len(n.users) != 1 for n in inner) or len(rsqrt.users) != 1:
        return None
    return xf, float(eps), inner


def recognize(rsqrt: torch.fx.Node) -> tuple[str, list[torch.fx.Node], tuple, torch.fx.Node] | None:
    """A plain RMSNorm around ``rsqrt``: (spelling, its nodes in graph order, the canonical op's
    arguments, its output node), or None."""
    found = _reduction(rsqrt)
    if found is None:
        return None
    xf, eps, inner = found
    if not _is_cast_to(xf, torch.float32):
        return None
    x = xf.args[0]
    xv = _val(x)
    if not isinstance(xv, torch.Tensor) or xv.dtype not in _HALF:
        return None
    n = _only_user(rsqrt)
    if not _is_mul(n) or _other(n, rsqrt) is not xf:
        return None
    if set(xf.users) != {inner[0], n}:
        return None
    nodes = [xf, *inner, rsqrt, n]
    after = _only_user(n)
    if _is_cast_to(after, xv.dtype):  # n.to(x.dtype), then maybe · weight
        mul = _only_user(after)
        w = _other(mul, after) if _is_mul(mul) else None
        if w is not None and _column_weight(w, xv, (xv.dtype,)):
            return "cast_then_weight", [*nodes, after, mul], (x, w, eps), mul
        return "weightless", [*nodes, after], (x, eps), after
    if not _is_mul(after):
        return None
    w = _other(after, n)
    weight_nodes: list[torch.fx.Node] = []
    if _is_cast_to(w, torch.float32) and len(w.users) == 1:  # w.float() inside the product
        weight_nodes, w = [w], w.args[0]
    if w is None or not _column_weight(w, xv, (*_HALF, torch.float32)):
        return None
    out = _only_user(after)
    if not _is_cast_to(out, xv.dtype):
        return None
    return "weight_in_product", [*nodes, *weight_nodes, after, out], (x, w, eps), out


_CANONICAL = {
    "cast_then_weight": torch.ops.fusion_ops.rms_norm.default,
    "weight_in_product": torch.ops.fusion_ops.rms_norm.default,
    "weightless": torch.ops.fusion_ops.weightless_rms_norm.default,
}


def find(graph: torch.fx.Graph) -> list[tuple[str, list[torch.fx.Node], tuple, torch.fx.Node]]:
    """Every plain RMSNorm of ``graph`` (read only)."""
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.rsqrt.default:
            norm = recognize(node)
            if norm is not None:
                found.append(norm)
    return found


def canonicalize(graph: torch.fx.Graph) -> list[Canonical]:
    """Replace every plain RMSNorm by its canonical op; the records :func:`restore` needs."""
    records = []
    for spelling, nodes, args, out in find(graph):
        tensors = tuple(a for a in args if isinstance(a, torch.fx.Node))
        original = _set_aside(nodes, tensors, out)
        with graph.inserting_before(out):
            canonical = graph.call_function(_CANONICAL[spelling], args)
        canonical.meta = {k: v for k, v in out.meta.items() if k in ("val", "stack_trace")}
        out.replace_all_uses_with(canonical)
        for node in reversed(nodes):
            graph.erase_node(node)
        records.append(Canonical(spelling, canonical, original, tensors))
    return records


def _set_aside(
    nodes: list[torch.fx.Node],
    inputs: tuple[torch.fx.Node, ...],
    out: torch.fx.Node | tuple[torch.fx.Node, ...],
) -> torch.fx.Graph:
    """``nodes`` copied into a graph of their own, ``inputs`` its placeholders, ``out`` (one
    node or a tuple) its output."""
    original = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for t, name in zip(inputs, ("x", "weight"), strict=False):
        env[t] = original.placeholder(name)
        env[t].meta = dict(t.meta)
    for node in nodes:
        env[node] = original.node_copy(node, env.__getitem__)
    original.output(tuple(env[o] for o in out) if isinstance(out, tuple) else env[out])
    return original


def restore(graph: torch.fx.Graph, records: list[Canonical]) -> int:
    """Put back the original nodes of every canonical op still in ``graph``; how many."""
    done = 0
    for record in records:
        node = record.canonical
        if node._erased or node.graph is not graph:
            continue
        placeholders = [n for n in record.original.nodes if n.op == "placeholder"]
        inputs = dict(zip(placeholders, record.inputs, strict=True))
        first = min((node, *record.replacements), key=_position)
        with graph.inserting_before(first):
            out = graph.graph_copy(record.original, inputs)
        replacements = record.replacements or (node,)
        outs = out if isinstance(out, tuple) else (out,)
        for replacement, original in zip(replacements, outs, strict=True):
            replacement.replace_all_uses_with(original)
        for dead in (*record.replacements, *list(node.users), node):
            if not dead._erased and not dead.users:
                graph.erase_node(dead)
        done += 1
    return done


def _position(node: torch.fx.Node) -> int:
    return next(i for i, n in enumerate(node.graph.nodes) if n is node)


def fused_from(records: list[Canonical], nodes: list[torch.fx.Node]) -> set[torch.fx.Node]:
    """The nodes of ``nodes`` that took a canonical op of ``records`` (a pattern consumed it):
    those whose arguments hold its input, or, where the pattern consumed that input too (a
    plain add before a norm, vLLM IR's norm before a quant), that input's tensor inputs."""
    keys = []
    for record in records:
        if not record.canonical._erased:
            continue
        x = record.inputs[0]  # consumed too (a plain add, vLLM IR's norm): its tensor inputs
        keys.append({a for a in x.args if isinstance(a, torch.fx.Node)} if x._erased else {x})
    out = set()
    for node in nodes:
        if node._erased or not keys:
            continue
        args: set[torch.fx.Node] = set()
        torch.fx.node.map_arg((node.args, node.kwargs), args.add)
        if any(key <= args for key in keys):
            out.add(node)
    return out
