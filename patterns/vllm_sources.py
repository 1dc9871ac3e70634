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

import torch

from fusion_ops.formats import fp8_max, fp8_min_scale

from .plain_norms import Canonical, _set_aside

aten = torch.ops.aten
_CAST = torch.ops.prims.convert_element_type.default
_FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


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


def recognize(cast: torch.fx.Node) -> tuple[list[torch.fx.Node], tuple, torch.fx.Node] | None:
    """The native group quant ending in ``cast`` (the FP8 cast): (its nodes in graph order, the
    arguments of ``fp8_group_quant``, the scale node ``s``), or None."""
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
    div = clamp_lo.args[0]
    if not _is(div, aten.div.Tensor, 2):
        return None
    xg, s = div.args
    if not (
        isinstance(xg, torch.fx.Node)
        and xg.target in _RESHAPES
        and not xg.kwargs
        and isinstance(s, torch.fx.Node)
    ):
        return None
    # s = clamp_min(div(max(abs(xg), -1, keepdim)[0].float(), FP8_MAX), 1/(FP8_MAX·512))
    if not _is(s, aten.clamp_min.default, 2) or _f32(s.args[1]) != _f32(fp8_min_scale(fp8)):
        return None
    s_div = s.args[0]
    if not _is(s_div, aten.div.Tensor, 2) or _f32(s_div.args[1]) != fmax:
        return None
    amax_f32 = s_div.args[0]
    if not _is(amax_f32, _CAST, 2) or amax_f32.args[1] != torch.float32:
        return None
    item = amax_f32.args[0]
    if not _is(item, operator.getitem, 2) or item.args[1] != 0:
        return None
    amax = item.args[0]
    if not _is(amax, aten.max.dim, 3) or amax.args[1] not in (-1, 2) or amax.args[2] is not True:
        return None
    absolute = amax.args[0]
    if not _is(absolute, aten.abs.default, 1) or absolute.args[0] is not xg:
        return None
    x = xg.args[0]
    xv, gv = (n.meta.get("val") if isinstance(n, torch.fx.Node) else None for n in (x, xg))
    if not isinstance(xv, torch.Tensor) or not isinstance(gv, torch.Tensor) or gv.dim() != 3:
        return None
    groups, size = gv.shape[1], gv.shape[2]
    if not isinstance(groups, int) or not isinstance(size, int) or xv.shape[-1] != groups * size:
        return None
    if xv.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return None
    inner = [absolute, amax, item, amax_f32, s_div, div, clamp_lo, clamp_hi]
    if any(not _single(n) for n in inner) or set(xg.users) != {absolute, div}:
        return None
    nodes = [xg, absolute, amax, item, amax_f32, s_div, s, div, clamp_lo, clamp_hi, cast]
    return nodes, (x, size, False, fp8), s


def canonicalize(graph: torch.fx.Graph) -> list[Canonical]:
    """Both rewrites of this module; the records :func:`patterns.plain_norms.restore` needs."""
    return [*_canonicalize_quants(graph), *_canonicalize_all_reduces(graph)]


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


def _canonicalize_quants(graph: torch.fx.Graph) -> list[Canonical]:
    """Replace every native group quant by ``fp8_group_quant`` with vLLM's output shapes."""
    records = []
    quant = torch.ops.fusion_ops.fp8_group_quant.default
    for cast in [n for n in graph.nodes if n.target is _CAST]:
        found = recognize(cast)
        if found is None:
            continue
        nodes, args, s = found
        x, xg = args[0], nodes[0]
        original = _set_aside(nodes, (x,), (cast, s))
        with graph.inserting_before(cast):
            op = graph.call_function(quant, args)
            codes = graph.call_function(operator.getitem, (op, 0))
            scales = graph.call_function(operator.getitem, (op, 1))
            q_like = graph.call_function(aten.reshape.default, (codes, xg.args[1]))
            s_like = graph.call_function(aten.reshape.default, (scales, [-1, xg.args[1][1], 1]))
        _fake_meta(op, codes, scales, q_like, s_like, cast, s)
        cast.replace_all_uses_with(q_like)
        s.replace_all_uses_with(s_like)
        for node in reversed(nodes):
            graph.erase_node(node)
        records.append(Canonical("vllm_quant_fp8_group", op, original, (x,), (q_like, s_like)))
    return records


def _fake_meta(op, codes, scales, q_like, s_like, cast, s) -> None:  # type: ignore[no-untyped-def]
    """``val`` of the new nodes, from the fake tensors the replaced ones had."""
    q_val, s_val = cast.meta["val"], s.meta["val"]
    x_val = op.args[0].meta["val"]
    with q_val.fake_mode:
        q2, s2 = torch.ops.fusion_ops.fp8_group_quant.default(x_val, *op.args[1:])
    op.meta["val"] = (q2, s2)
    codes.meta["val"], scales.meta["val"] = q2, s2
    q_like.meta["val"], s_like.meta["val"] = q_val, s_val
    for node in (op, codes, scales, q_like, s_like):
        if "stack_trace" in cast.meta:
            node.meta["stack_trace"] = cast.meta["stack_trace"]
