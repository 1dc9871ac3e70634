"""norm_rope_cache (kv-only chain): ``rms_norm → [cast] → rope → mla_cache_write``  ⇒
``rms_norm_rope_mla_cache_write``.

DeepSeek-V4's compressor: each pooled group of tokens (fp32) is normed, cast to bf16, roped at
the group's first position and written to the compressed cache, with no q rope beside it (so
``rope_cache`` leaves it alone); vLLM hand-fuses that chain into one kernel. Registered after
``rope_cache``, so a kv rope that has a q rope beside it is taken by that family first.

Written in the functional form of the cache write (``auto_functionalized`` v1 and v2, kwargs in
functionalization's order), like ``rope_cache``; the cast is ``prims.convert_element_type`` to
bf16 or fp16, or absent. The normed and cast values must have no other user (a pattern's inner
nodes never do); the rotated rows may (prefill attends to them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2

from fusion_ops import CACHE_LAYOUTS

from .base import HOPS, NearMiss, PatternSpec, dtype_name, find_calls, op_name, users_by_op, val

NAME = "norm_rope_cache"
STANDALONE_OPS = ("rms_norm", "rope", "mla_cache_write")
FUSED_OPS = ("rms_norm_rope_mla_cache_write",)
EXAMPLE_ROPE_DIM = 64
EXAMPLE_EPS = 1e-6
CASTS: tuple[torch.dtype | None, ...] = (None, torch.bfloat16, torch.float16)
ops = torch.ops.fusion_ops


def _spec(is_neox: bool, layout: str, v2: bool, cast: torch.dtype | None) -> PatternSpec:
    write, fused = ops.mla_cache_write.default, ops.rms_norm_rope_mla_cache_write.default

    def search(positions, x, weight, cos_sin_cache, kv_cache, slot_mapping, eps, rope_dim):  # type: ignore[no-untyped-def]
        y = ops.rms_norm.default(x, weight, eps)
        if cast is not None:
            y = torch.ops.prims.convert_element_type.default(y, cast)
        kv_rot = ops.rope.default(positions, y, cos_sin_cache, rope_dim, is_neox)
        if v2:
            out = auto_functionalized_v2(
                write,
                kv=kv_rot,
                slot_mapping=slot_mapping,
                layout=layout,
                _kv_cache_base_index=0,
                _all_bases=[kv_cache],
            )
        else:
            out = auto_functionalized(
                write, kv=kv_rot, kv_cache=kv_cache, slot_mapping=slot_mapping, layout=layout
            )
        return out[1], kv_rot

    def replace(positions, x, weight, cos_sin_cache, kv_cache, slot_mapping, eps, rope_dim):  # type: ignore[no-untyped-def]
        common = dict(positions=positions, x=x, weight=weight, eps=eps, cos_sin_cache=cos_sin_cache)
        flags = dict(rope_dim=rope_dim, is_neox=is_neox, layout=layout, out_dtype=cast)
        if v2:
            out = auto_functionalized_v2(
                fused,
                **common,
                slot_mapping=slot_mapping,
                **flags,
                _kv_cache_base_index=0,
                _all_bases=[kv_cache],
            )
        else:
            out = auto_functionalized(
                fused, **common, kv_cache=kv_cache, slot_mapping=slot_mapping, **flags
            )
        return out[1], out[0]  # new cache, kv_rot

    def example_inputs() -> list[torch.Tensor]:
        t, x_dtype = 4, torch.float32 if cast is not None else torch.bfloat16
        if layout == "dsv4_fp8":
            cache = torch.empty(2, 4, 584, dtype=torch.uint8)
        else:
            cache = torch.empty(2, 4, 512, dtype=cast or torch.bfloat16)
        return [
            torch.empty(t, dtype=torch.int64),
            torch.empty(t, 512, dtype=x_dtype),
            torch.empty(512, dtype=x_dtype),
            torch.empty(16, EXAMPLE_ROPE_DIM, dtype=torch.float32),
            cache,
            torch.empty(t, dtype=torch.int64),
        ]

    cast_name = "" if cast is None else f"_to_{dtype_name(cast)}"
    variant = f"{'neox' if is_neox else 'gptj'}_{layout}{cast_name}_{'v2' if v2 else 'v1'}"
    wildcards = {"eps": EXAMPLE_EPS, "rope_dim": EXAMPLE_ROPE_DIM}
    return PatternSpec(NAME, variant, search, replace, example_inputs, wildcards)


def pattern_specs(schemes: Sequence[str]) -> list[PatternSpec]:
    return [
        _spec(is_neox, layout, v2, cast)
        for v2 in (False, True)
        for layout in CACHE_LAYOUTS
        for is_neox in (False, True)
        for cast in CASTS
        if not (layout == "dsv4_fp8" and cast == torch.float16)  # dsv4_fp8 stores bf16 rows
    ]


def prepare(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    return 0


def label(node: torch.fx.Node) -> str | None:
    if op_name(node) != "rms_norm_rope_mla_cache_write" or node.target not in HOPS:
        return None
    kw = node.kwargs
    style = "neox" if kw["is_neox"] else "gptj"
    hop = "v2" if node.target is auto_functionalized_v2 else "v1"
    cast = "" if kw.get("out_dtype") is None else f"_to_{dtype_name(kw['out_dtype'])}"
    dtype = dtype_name(val(kw["x"]).dtype)
    return f"{NAME}/{style}_{kw['layout']}{cast}_{hop}/{dtype}"


def near_misses(graph: torch.fx.Graph, schemes: Sequence[str]) -> list[NearMiss]:
    """Every kv-only ``mla_cache_write`` left whose rope reads a norm (or its cast), and why."""
    out = []
    for write in find_calls(graph, "mla_cache_write"):
        kv_rot = write.kwargs.get("kv") if write.target in HOPS else write.args[0]
        if not isinstance(kv_rot, torch.fx.Node) or op_name(kv_rot) != "rope":
            continue
        src = kv_rot.args[1]
        cast = None
        if (
            isinstance(src, torch.fx.Node)
            and src.target is torch.ops.prims.convert_element_type.default
        ):
            cast, src = src, src.args[0]
        if not isinstance(src, torch.fx.Node) or op_name(src) != "rms_norm":
            continue
        out.append(NearMiss(NAME, write.name, "mla_cache_write", _explain(src, cast, kv_rot)))
    return out


def _explain(norm: torch.fx.Node, cast: torch.fx.Node | None, kv_rot: torch.fx.Node) -> str:
    for node, what in ((norm, "normed value"), (cast, "cast value")):
        if node is not None and len(node.users) > 1:
            users = ", ".join(users_by_op(node))
            return (
                f"the {what} has other users ({users}); the fused op returns only the rotated rows"
            )
    if cast is not None and val(cast).dtype not in [c for c in CASTS if c is not None]:
        return f"the cast to {val(cast).dtype} is not one of the registered casts (bf16, fp16)"
    if not all(isinstance(a, torch.fx.Node) or a is not None for a in kv_rot.args):
        return "rope arguments are not graph values"
    return "structure matched a registered pattern but its re-check failed"
