"""dequant_fp8: ``dequant_cache → .to(float8)``  ⇒  ``dequant_cache_fp8``.

The fused op reproduces the compiled cast's overflow behaviour (saturation for e4m3fn), so the
rewrite does not change what the compiled graph computes. Must not fire: the dequantized bf16
value has another user; the cast goes to a non-FP8 dtype or through an intermediate cast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fusion_ops import CACHE_LAYOUTS

from . import canonical
from .base import (
    NearMiss,
    PatternSpec,
    dtype_name,
    find_calls,
    op_args,
    op_name,
    users_by_op,
    val,
)

NAME = "dequant_fp8"
STANDALONE_OPS = ("dequant_cache",)
FUSED_OPS = ("dequant_cache_fp8",)
FP8 = {torch.float8_e4m3fn: "e4m3fn", torch.float8_e4m3fnuz: "e4m3fnuz"}
ops = torch.ops.fusion_ops
convert = torch.ops.prims.convert_element_type.default


def _spec(layout: str, fp8: torch.dtype) -> PatternSpec:
    def search(kv_cache: Any, block_ids: Any) -> Any:
        return convert(ops.dequant_cache.default(kv_cache, block_ids, layout), fp8)

    def replace(kv_cache: Any, block_ids: Any) -> Any:
        return ops.dequant_cache_fp8.default(kv_cache, block_ids, layout, fp8)

    def example_inputs() -> list[torch.Tensor]:
        if layout == "dsv4_fp8":
            cache = torch.empty(4, 8, 584, dtype=torch.uint8)
        else:
            cache = torch.empty(4, 8, 512, dtype=torch.bfloat16)
        return [cache, torch.empty(2, dtype=torch.int64)]

    return PatternSpec(NAME, f"{layout}_{FP8[fp8]}", search, replace, example_inputs)


def pattern_specs(schemes: Sequence[str]) -> list[PatternSpec]:
    return [_spec(layout, fp8) for layout in CACHE_LAYOUTS for fp8 in FP8]


def prepare(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    """``dequant_cache(…).view(…).to(fp8)`` → the cast on the dequantized value, then the view
    (a cast is elementwise: any view that keeps the rows commutes with it)."""
    casts = [n for n in graph.nodes if n.target is convert and n.args[1] in FP8]
    is_dequant = lambda n: op_name(n) == "dequant_cache"  # noqa: E731
    return sum(canonical.sink_below_views(c, is_dequant) for c in casts)


def rewrite(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    return 0  # no graph rewrite after the matchers


def label(node: torch.fx.Node) -> str | None:
    if node.target is not ops.dequant_cache_fp8.default:
        return None
    a = op_args(node)
    cache_dtype = "uint8" if a["layout"] == "dsv4_fp8" else dtype_name(val(a["kv_cache"]).dtype)
    return f"{NAME}/{a['layout']}_{FP8[a['fp8_dtype']]}/{cache_dtype}"


def near_misses(graph: torch.fx.Graph, schemes: Sequence[str]) -> list[NearMiss]:
    out = []
    for node in find_calls(graph, "dequant_cache"):
        users = list(node.users)
        casts = [u for u in users if u.target is convert and u.args[1] in FP8]
        if not casts:
            other = [u for u in users if u.target is convert]
            if other:
                reason = (
                    f"it is cast to {dtype_name(other[0].args[1])}, not to an FP8 dtype "
                    "(e4m3fn / e4m3fnuz)"
                )
            else:
                reason = (
                    f"no FP8 cast consumes it (users: {', '.join(users_by_op(node)) or 'none'})"
                )
        elif len(users) > 1:
            users_text = ", ".join(users_by_op(node))
            reason = (
                f"dequantized output has {len(users)} users ({users_text}); "
                "the fused op returns only the FP8 value"
            )
        else:
            reason = "structure matched a registered pattern but its re-check failed"
        out.append(NearMiss(NAME, node.name, "dequant_cache", reason))
    return out
