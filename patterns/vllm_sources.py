"""vLLM's own spellings in a post-grad graph, recognized as ours before matching.

1. ``QuantFP8`` in its native form, as our ``fp8_group_quant`` (exact). With Inductor and vLLM's
   default ``custom_ops=["none"]``, ``QuantFP8(static=False, group_shape=GroupShape(1, g))``
   traces ``_quantize_group_native`` (vLLM 0.33,
   ``model_executor/layers/quantization/input_quant_fp8.py``); a post-grad graph holds::

       xg = reshape(x, [-1, G, g])                                   x [..., K], K = G·g
       s  = clamp_min(div(abs(xg).max(-1, keepdim)[0].float(), FP8_MAX), 1 / (FP8_MAX·512))
       q  = clamp(div(xg, s), -FP8_MAX, FP8_MAX).to(fp8)             then views of q and of s

   which is ``fusion_ops.fp8_group_quant(x, g, False, fp8)``'s definition step for step (the
   same scale rule, a correctly rounded quotient, the same clamp). The replacement keeps vLLM's
   tensors (``q`` and ``s`` in their ``[-1, G, g]`` / ``[-1, G, 1]`` shapes, so the views and
   the scale layout vLLM applies after it, e.g. column-major, stay); the norm+quant families
   then fuse a norm in front of it (vLLM IR's ``rms_norm``: ``rms_quant/…+vllm_ir``). Not
   recognized (the bits would differ): UE8M0 scales (vLLM takes ``exp2(ceil(log2(s)))`` of a
   float ``log2``, we round up from the bits), a padded last group, an FP8 max other than the
   dtype's (vLLM clamps e4m3fnuz at 224, we at 240), the per-token form (vLLM multiplies by a
   reciprocal of the scale instead of dividing).
2. ``torch.ops.vllm.all_reduce(x, group_name)`` (what vLLM's ``tensor_model_parallel_all_reduce``
   traces to where the platform uses custom-op collectives, CUDA among them), as the functional
   ``wait_tensor(all_reduce(x, "sum", <the c10d name of that vLLM group's device group>))``, the
   source ``ar_add_rms_quant`` folds into the add-norm op that reads it. The fused op sums over
   the same process group in rank order (fp32): at 2 ranks that is any all-reduce's sum; at
   more, our order, as for the functional source.

A canonical op no pattern consumed is put back as the original nodes
(:func:`patterns.plain_norms.restore`): vLLM's own all-reduce (its custom kernels) and quant stay
where nothing fuses.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from fusion_ops.formats import fp8_max, fp8_min_scale

from .plain_norms import Canonical, _set_aside

aten = torch.ops.aten
_CAST = torch.ops.prims.convert_element_type.default
_FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
_HALF = (torch.bfloat16, torch.float16)


def _is(node: object, target: object, nargs: int | None = None) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "call_function"
        and node.target is target
        and not node.kwargs
        and (nargs is None or len(node.args) == nargs)
    )


def _single(node: torch.fx.Node) -> bool:
    return len(node.users) == 1


def _f32(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(torch.tensor(v, dtype=torch.float32))


@dataclass
class NativeQuant:
    """One recognized native quant: its nodes (graph order), the input, the scheme, and whether
    our op reproduces its bits (else only ``numerics="tolerant"`` takes it)."""

    nodes: list[torch.fx.Node]
    x: torch.fx.Node
    group_size: int | None  # None: per token
    use_ue8m0: bool
    fp8: torch.dtype
    codes: torch.fx.Node  # the FP8 cast
    scales: torch.fx.Node  # the final scale
    grouped: torch.fx.Node | None  # the [-1, G, g] view of a group quant

    @property
    def exact(self) -> bool:
        return self.group_size is not None and not self.use_ue8m0


def _scale(s: object, fp8: torch.dtype) -> tuple[torch.fx.Node, bool, list[torch.fx.Node]] | None:
    """``clamp_min(div(amax_f32, FP8_MAX), 1/(FP8_MAX·512))``, optionally then
    ``exp2(ceil(log2(·)))`` (UE8M0) → (amax_f32, use_ue8m0, the scale's nodes), or None."""
    ue8m0 = _is(s, aten.exp2.default, 1)
    chain: list[torch.fx.Node] = []
    if ue8m0:
        ceil = s.args[0]
        log2 = ceil.args[0] if _is(ceil, aten.ceil.default, 1) else None
        if not _is(log2, aten.log2.default, 1) or not (_single(ceil) and _single(log2)):
            return None
        chain, s = [log2, ceil, s], log2.args[0]
    fmax = fp8_max(fp8)
    if not _is(s, aten.clamp_min.default, 2) or _f32(s.args[1]) != _f32(fp8_min_scale(fp8)):
        return None
    s_div = s.args[0]
    if not _is(s_div, aten.div.Tensor, 2) or _f32(s_div.args[1]) != fmax or not _single(s_div):
        return None
    amax_f32 = s_div.args[0]
    if not _is(amax_f32, _CAST, 2) or amax_f32.args[1] != torch.float32:
        return None
    if ue8m0 and not _single(s):
        return None
    return amax_f32, ue8m0, [amax_f32, s_div, s, *chain]


def _group_amax(amax_f32: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """``max(abs(xg), -1, keepdim)[0]`` → (xg, its nodes)."""
    item = amax_f32.args[0]
    if not _is(item, operator.getitem, 2) or item.args[1] != 0:
        return None
    amax = item.args[0]
    if not _is(amax, aten.max.dim, 3) or amax.args[1] not in (-1, 2) or amax.args[2] is not True:
        return None
    absolute = amax.args[0]
    if not _is(absolute, aten.abs.default, 1):
        return None
    return absolute.args[0], [absolute, amax, item]


def _token_amax(amax_f32: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """``amax(abs(x), [-1]).unsqueeze(-1)`` → (x, its nodes)."""
    unsqueeze = amax_f32.args[0]
    if not _is(unsqueeze, aten.unsqueeze.default, 2) or unsqueeze.args[1] != -1:
        return None
    amax = unsqueeze.args[0]
    if not _is(amax, aten.amax.default, 2) or list(amax.args[1]) != [-1]:
        return None
    absolute = amax.args[0]
    if not _is(absolute, aten.abs.default, 1):
        return None
    return absolute.args[0], [absolute, amax, unsqueeze]


def recognize(cast: torch.fx.Node) -> NativeQuant | None:
    """The native quant ending in ``cast`` (the FP8 cast), or None."""
    if not _is(cast, _CAST, 2) or cast.args[1] not in _FP8:
        return None
    fp8 = cast.args[1]
    fmax = fp8_max(fp8)
    clamp_hi = cast.args[0]
    if not _is(clamp_hi, aten.clamp_max.default, 2) or _f32(clamp_hi.args[1]) != fmax:
        return None
    clamp_lo = clamp_hi.args[0]
    if not _is(clamp_lo, aten.clamp_min.default, 2) or _f32(clamp_lo.args[1]) != -fmax:
        return None
    tail = [clamp_lo, clamp_hi, cast]
    quotient = clamp_lo.args[0]
    if _is(quotient, aten.div.Tensor, 2):  # groups: xg / s
        grouped, s = quotient.args
        scale = _scale(s, fp8)
        found = _group_amax(scale[0]) if scale is not None else None
        if found is None or found[0] is not grouped or grouped.target not in _RESHAPES:
            return None
        x, reads = grouped.args[0], {found[1][0], quotient}
        head = [grouped, *found[1]]
        middle = [quotient]
    elif _is(quotient, aten.mul.Tensor, 2):  # per token: x.float() * reciprocal(s)
        xf, recip = quotient.args
        if not _is(recip, aten.reciprocal.default, 1) or not _is(xf, _CAST, 2):
            return None
        scale = _scale(recip.args[0], fp8)
        found = _token_amax(scale[0]) if scale is not None else None
        if found is None or found[0] is not xf.args[0] or xf.args[1] != torch.float32:
            return None
        grouped, x = None, xf.args[0]
        head, middle, reads = found[1], [xf, recip, quotient], None
    else:
        return None
    amax_f32, ue8m0, scale_nodes = scale
    xv = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if not isinstance(xv, torch.Tensor) or xv.dtype not in (*_HALF, torch.float32):
        return None
    group_size = None
    if grouped is not None:
        gv = grouped.meta.get("val")
        if not isinstance(gv, torch.Tensor) or gv.dim() != 3:
            return None
        groups, group_size = gv.shape[1], gv.shape[2]
        if not isinstance(groups, int) or not isinstance(group_size, int):
            return None
        if xv.shape[-1] != groups * group_size or set(grouped.users) != reads:
            return None
    inner = [*head, *middle, amax_f32, clamp_lo, clamp_hi]
    if any(not _single(n) for n in inner if n is not grouped):
        return None
    nodes = [*head, *scale_nodes, *middle, *tail]
    order = {n: i for i, n in enumerate(cast.graph.nodes)}
    nodes = sorted(set(nodes), key=order.__getitem__)
    return NativeQuant(nodes, x, group_size, ue8m0, fp8, cast, scale_nodes[-1], grouped)


def canonicalize(graph: torch.fx.Graph, tolerant: bool) -> tuple[list[Canonical], list[Canonical]]:
    """Both rewrites of this module: (the exact records, the tolerant ones: quants whose bits our
    op does not reproduce, canonicalized only when ``tolerant``)."""
    exact, inexact = _canonicalize_quants(graph, tolerant)
    return [*exact, *_canonicalize_all_reduces(graph)], inexact


def _is_vllm_all_reduce(node: torch.fx.Node) -> bool:
    target = node.target
    return (
        node.op == "call_function"
        and isinstance(target, torch._ops.OpOverload)
        and target.namespace == "vllm"
        and target._opname == "all_reduce"
    )


def c10d_group_name(vllm_group: str) -> str | None:
    """The c10d name of the device group of vLLM's group ``vllm_group`` (e.g. 'tp:0'), or None
    when vLLM's parallel state does not know it."""
    try:
        from vllm.distributed import parallel_state
    except ImportError:
        return None
    ref = parallel_state._groups.get(vllm_group)
    coordinator = ref() if ref is not None else None
    group = getattr(coordinator, "device_group", None)
    return getattr(group, "group_name", None)


def _canonicalize_all_reduces(graph: torch.fx.Graph) -> list[Canonical]:
    records = []
    c10d = torch.ops._c10d_functional
    for node in [n for n in graph.nodes if _is_vllm_all_reduce(n)]:
        args = dict(zip(("tensor", "group_name"), node.args, strict=False)) | dict(node.kwargs)
        x, name = args.get("tensor"), args.get("group_name")
        group = c10d_group_name(name) if isinstance(name, str) else None
        if not isinstance(x, torch.fx.Node) or group is None:
            continue
        original = _set_aside([node], (x,), node)
        with graph.inserting_before(node):
            reduce = graph.call_function(c10d.all_reduce.default, (x, "sum", group))
            wait = graph.call_function(c10d.wait_tensor.default, (reduce,))
        for new in (reduce, wait):
            new.meta = {k: v for k, v in node.meta.items() if k in ("val", "stack_trace")}
        node.replace_all_uses_with(wait)
        graph.erase_node(node)
        records.append(Canonical("vllm_all_reduce", reduce, original, (x,), (wait,)))
    return records


def _canonicalize_quants(
    graph: torch.fx.Graph, tolerant: bool
) -> tuple[list[Canonical], list[Canonical]]:
    """Replace every native quant by our op with vLLM's output shapes (the inexact ones only
    when ``tolerant``); (exact records, tolerant records)."""
    exact: list[Canonical] = []
    inexact: list[Canonical] = []
    for cast in [n for n in graph.nodes if n.target is _CAST]:
        found = recognize(cast)
        if found is None or not (found.exact or tolerant):
            continue
        records = exact if found.exact else inexact
        records.append(_replace(graph, found))
    return exact, inexact


def _replace(graph: torch.fx.Graph, found: NativeQuant) -> Canonical:
    x, cast, s = found.x, found.codes, found.scales
    original = _set_aside(found.nodes, (x,), (cast, s))
    ops = torch.ops.fusion_ops
    if found.group_size is None:
        target, args = ops.fp8_per_token_quant.default, (x, found.use_ue8m0, found.fp8)
    else:
        target = ops.fp8_group_quant.default
        args = (x, found.group_size, found.use_ue8m0, found.fp8)
    with graph.inserting_before(cast):
        op = graph.call_function(target, args)
        codes = graph.call_function(operator.getitem, (op, 0))
        scales = graph.call_function(operator.getitem, (op, 1))
        q_like, s_like = codes, scales
        if found.grouped is not None:  # vLLM's [-1, G, g] codes and [-1, G, 1] scales
            shape = found.grouped.args[1]
            q_like = graph.call_function(aten.reshape.default, (codes, shape))
            s_like = graph.call_function(aten.reshape.default, (scales, [-1, shape[1], 1]))
    with cast.meta["val"].fake_mode:
        q_val, s_val = target(x.meta["val"], *args[1:])
    op.meta["val"] = (q_val, s_val)
    codes.meta["val"], scales.meta["val"] = q_val, s_val
    q_like.meta["val"], s_like.meta["val"] = cast.meta["val"], s.meta["val"]
    for node in {op, codes, scales, q_like, s_like}:
        if "stack_trace" in cast.meta:
            node.meta["stack_trace"] = cast.meta["stack_trace"]
    cast.replace_all_uses_with(q_like)
    s.replace_all_uses_with(s_like)
    for node in reversed(found.nodes):
        graph.erase_node(node)
    kind = "per_token" if found.group_size is None else "group"
    return Canonical(f"vllm_quant_fp8_{kind}", op, original, (x,), (q_like, s_like))
