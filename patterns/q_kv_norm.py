"""q_kv_norm (horizontal): two norms of one split projection ⇒ one op, one launch.

    qr, kv = split(x @ W_qkv_a)
    q  = rms_norm(qr, w_q, eps_q) [→ quant]   ⇒   q_kv_rms_norm(qr, w_q, eps_q, kv, w_kv, eps_kv)
    kv = rms_norm(kv, w_kv, eps_kv)               [q_kv_rms_norm_<scheme>_quant(..., *params)]

DeepSeek-V4's q-lora norm (→ the wq_b FP8 quant) and kv norm, DeepSeek-V3's ``q_a_layernorm``
and ``kv_a_layernorm``: vLLM hand-writes this pair as ``fused_q_kv_rmsnorm``. A horizontal fusion
has no single dataflow chain to match, so this family is a graph rewrite (``rewrite``) run after
the pattern matchers, when ``rms_quant`` has already fused the q-lora norm with its quant.

Which norms pair: two norm calls (``rms_norm``, or ``rms_norm_<scheme>_quant`` of an enabled
scheme, at most one of them quantized) whose inputs are parts of one tensor, reached through
views, slices, splits and getitem (the projection's parts), with the same leading dims. Decided
here: independent norms elsewhere in the graph, and two norms of the very same tensor, are left
alone. Pairing them would not change results either, but it moves one norm's launch and its
consumers away from where the program put them, for a saving the model did not ask for.

Must not fire (each gives a near miss): the leading dims differ; both norms are quantized (no
fused op quantizes both); the quantized norm's scheme is not enabled; an in-place op lies
between the two norms. A cycle (one norm's input computed from the other's output) cannot
arise: both inputs are views of one tensor that exists before either norm runs.

The fused node is placed at the later norm; the earlier norm's consumers move after it
(the pass re-sorts the graph). Every value is computed as before, so the rewrite is exact.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fusion_ops import SCHEMES

from . import canonical
from . import quant_variants as qv
from .base import HOPS, NearMiss, PatternSpec, dtype_name, op_args, op_name, val

NAME = "q_kv_norm"
STANDALONE_OPS = ("rms_norm", *(s.rms_op for s in SCHEMES.values()))
FUSED_OPS = ("q_kv_rms_norm", *(s.q_kv_rms_op for s in SCHEMES.values()))
ops = torch.ops.fusion_ops
aten = torch.ops.aten

#: ops that take a part of a tensor (the parts of one projection are reached through these)
_PART_OPS = (
    *canonical.VIEW_OPS,
    aten.slice.Tensor,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.narrow.default,
    operator.getitem,
)


def pattern_specs(schemes: Sequence[str]) -> list[PatternSpec]:
    return []  # a graph rewrite (see rewrite), nothing for the pattern matcher


def prepare(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    return 0


def _scheme(node: torch.fx.Node) -> str | None:
    """The quant scheme of a fused rms+quant call, '' for a plain rms_norm, None otherwise."""
    name = op_name(node)
    if name == "rms_norm" and node.target not in HOPS:
        return ""
    return qv.scheme_of_op(name or "", "rms_norm_")


def _root(node: torch.fx.Node) -> torch.fx.Node:
    """The tensor ``node`` is a part of (through views, slices, splits, getitem)."""
    while (
        isinstance(node, torch.fx.Node)
        and node.op == "call_function"
        and node.target in _PART_OPS
        and isinstance(node.args[0], torch.fx.Node)
    ):
        node = node.args[0]
    return node


def _norm_groups(graph: torch.fx.Graph) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    """Norm calls grouped by the tensor their input is a part of (groups of two or more)."""
    groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        x = node.args[0] if node.args else None
        if _scheme(node) is not None and isinstance(x, torch.fx.Node) and _root(x) is not x:
            groups.setdefault(_root(x), []).append(node)
    return {root: norms for root, norms in groups.items() if len(norms) > 1}


def _why_not(first: torch.fx.Node, second: torch.fx.Node, schemes: Sequence[str]) -> str | None:
    """Why ``first`` and ``second`` (in program order) must not fuse, or None."""
    s1, s2 = _scheme(first), _scheme(second)
    if s1 and s2:
        return "both norms are quantized: no fused op quantizes both"
    for s in (s1, s2):
        if s and s not in schemes:
            return f"quant scheme {s!r} is not enabled in this pass (enabled: {list(schemes)})"
    a, b = val(first.args[0]), val(second.args[0])
    if a is None or b is None:
        return "no fake values on the norm inputs"
    if a.dim() != b.dim() or not all(
        statically_known_true(x == y) for x, y in zip(a.shape[:-1], b.shape[:-1], strict=False)
    ):
        return f"leading dims differ: {tuple(a.shape[:-1])} vs {tuple(b.shape[:-1])}"
    if a.device != b.device:
        return f"devices differ: {a.device} vs {b.device}"
    node = first.next
    while node is not second:
        if _mutates(node):
            return f"{node.name} mutates a tensor between the two norms"
        node = node.next
    return None


def _mutates(node: torch.fx.Node) -> bool:
    """An in-place op (graphs not functionalized by torch.compile; compiled graphs keep their
    mutations as auto_functionalized and a final copy_, after every norm)."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


def _pairs(
    graph: torch.fx.Graph, schemes: Sequence[str]
) -> tuple[list[tuple[torch.fx.Node, torch.fx.Node]], list[tuple[torch.fx.Node, str]]]:
    """Pairs to fuse (program order within each pair) and (norm, reason) of siblings left."""
    pairs, left = [], []
    for norms in _norm_groups(graph).values():
        free = list(norms)
        while len(free) > 1:
            first = free.pop(0)
            reasons = []
            for second in free:
                reason = _why_not(first, second, schemes)
                if reason is None:
                    free.remove(second)
                    pairs.append((first, second))
                    break
                reasons.append(reason)
            else:
                left.append((first, reasons[0]))
    return pairs, left


def rewrite(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    """Fuse every pair (see the module docstring); the number of fused nodes made."""
    pairs, _ = _pairs(graph, schemes)
    for first, second in pairs:
        # the quantized norm is the fused op's q (it is the one the op may quantize)
        q_norm, kv_norm = (second, first) if _scheme(second) else (first, second)
        scheme = _scheme(q_norm)
        q_args, kv_args = op_args(q_norm), op_args(kv_norm)
        head = (q_args["x"], q_args["weight"], q_args["eps"])
        tail = (kv_args["x"], kv_args["weight"], kv_args["eps"])
        with graph.inserting_before(second):
            if scheme:
                fused = getattr(ops, SCHEMES[scheme].q_kv_rms_op).default
                rest = tuple(q_norm.args[3:])
                node = canonical.call(graph, fused, (*head, *tail, *rest), dict(q_norm.kwargs))
                kv_out = canonical.call(graph, operator.getitem, (node, 3))
                q_norm.replace_all_uses_with(node)  # getitem 0..2: codes, scales, normed
            else:
                node = canonical.call(graph, ops.q_kv_rms_norm.default, (*head, *tail))
                q_out = canonical.call(graph, operator.getitem, (node, 0))
                kv_out = canonical.call(graph, operator.getitem, (node, 1))
                q_norm.replace_all_uses_with(q_out)
        node.meta["eager_input_vals"] = None  # rebuilt from the real inputs by the pass
        node.meta["stack_trace"] = q_norm.meta.get("stack_trace")
        kv_norm.replace_all_uses_with(kv_out)
        graph.erase_node(q_norm)
        graph.erase_node(kv_norm)
    return len(pairs)


def label(node: torch.fx.Node) -> str | None:
    """'q_kv_norm/<rms | scheme label[+normed]>/<q dtype>' for a fused node of this family."""
    name = op_name(node) or ""
    if name == "q_kv_rms_norm":
        return f"{NAME}/rms/{dtype_name(val(node.args[0]).dtype)}"
    scheme = qv.scheme_of_op(name, "q_kv_rms_norm_")
    if scheme is None:
        return None
    normed = "+normed" if op_args(node).get("return_normed") else ""
    dtype = dtype_name(val(node.args[0]).dtype)
    return f"{NAME}/{qv.label_of_call(scheme, node)}{normed}/{dtype}"


def near_misses(graph: torch.fx.Graph, schemes: Sequence[str]) -> list[NearMiss]:
    """Norms that have a sibling norm (another part of the same tensor) but were not paired."""
    _, left = _pairs(graph, schemes)
    return [NearMiss(NAME, n.name, op_name(n) or "rms_norm", why) for n, why in left]
