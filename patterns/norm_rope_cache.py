"""norm_rope_cache (kv-only chain): ``rms_norm → [cast] → rope → mla_cache_write``  ⇒
``rms_norm_rope_mla_cache_write``.

DeepSeek-V4's compressor: each pooled group of tokens (fp32) is normed, cast to bf16, roped at
the group's first position and written to the compressed cache, with no q rope beside it (so
``rope_cache`` leaves it alone); vLLM hand-fuses that chain into one kernel. Registered after
``rope_cache``, so a kv rope that has a q rope beside it is taken by that family first.

Written in the functional form of the cache write (``auto_functionalized`` v1 and v2, kwargs in
functionalization's order), like ``rope_cache``. The cast (``prims.convert_element_type``), when
present, is to the dtype the cache stores (bf16 rows for ``dsv4_fp8``, the cache's own dtype for
``bf16``): the write accepts nothing else. The pattern matcher ignores dtype literals when it
matches (``ignore_types``), so one pattern per cache layout takes the dtype from the matched
cache instead of one pattern per dtype (a bf16 pattern would otherwise bind an fp16 cast and
then fail its re-trace). The normed and cast values must have no other user (a pattern's inner
nodes never do); the rotated rows may (prefill attends to them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2

from fusion_ops import CACHE_LAYOUTS

from . import canonical
from .base import (
    HOPS,
    NearMiss,
    PatternSpec,
    dtype_name,
    find_calls,
    functional_call,
    op_name,
    users_by_op,
    val,
)

NAME = "norm_rope_cache"
STANDALONE_OPS = ("rms_norm", "rope", "mla_cache_write")
FUSED_OPS = ("rms_norm_rope_mla_cache_write",)
EXAMPLE_ROPE_DIM = 64
EXAMPLE_EPS = 1e-6
ops = torch.ops.fusion_ops


def written_dtype(layout: str, kv_cache: torch.Tensor) -> torch.dtype:
    """The dtype of the rows a cache write takes (mla_cache_write's contract)."""
    return torch.bfloat16 if layout == "dsv4_fp8" else kv_cache.dtype


def _spec(is_neox: bool, layout: str, v2: bool, cast: bool) -> PatternSpec:
    write, fused = ops.mla_cache_write.default, ops.rms_norm_rope_mla_cache_write.default

    def search(positions, x, weight, cos_sin_cache, kv_cache, slot_mapping, eps, rope_dim):  # type: ignore[no-untyped-def]
        y = ops.rms_norm.default(x, weight, eps)
        if cast:
            y = torch.ops.prims.convert_element_type.default(y, written_dtype(layout, kv_cache))
        kv_rot = ops.rope.default(positions, y, cos_sin_cache, rope_dim, is_neox)
        kwargs = dict(kv=kv_rot, kv_cache=kv_cache, slot_mapping=slot_mapping, layout=layout)
        out = functional_call(write, v2, kwargs)
        return out[1], kv_rot

    def replace(positions, x, weight, cos_sin_cache, kv_cache, slot_mapping, eps, rope_dim):  # type: ignore[no-untyped-def]
        kwargs = dict(positions=positions, x=x, weight=weight, eps=eps, cos_sin_cache=cos_sin_cache)
        kwargs.update(kv_cache=kv_cache, slot_mapping=slot_mapping, rope_dim=rope_dim)
        out_dtype = written_dtype(layout, kv_cache) if cast else None
        kwargs.update(is_neox=is_neox, layout=layout, out_dtype=out_dtype)
        out = functional_call(fused, v2, kwargs)
        return out[1], out[0]  # new cache, kv_rot

    def example_inputs() -> list[torch.Tensor]:
        t, x_dtype = 4, torch.float32 if cast else torch.bfloat16
        if layout == "dsv4_fp8":
            cache = torch.empty(2, 4, 584, dtype=torch.uint8)
        else:
            cache = torch.empty(2, 4, 512, dtype=torch.bfloat16)
        return [
            torch.empty(t, dtype=torch.int64),
            torch.empty(t, 512, dtype=x_dtype),
            torch.empty(512, dtype=x_dtype),
            torch.empty(16, EXAMPLE_ROPE_DIM, dtype=torch.float32),
            cache,
            torch.empty(t, dtype=torch.int64),
        ]

    variant = (
        f"{'neox' if is_neox else 'gptj'}_{layout}{'_cast' if cast else ''}_{'v2' if v2 else 'v1'}"
    )
    wildcards = {"eps": EXAMPLE_EPS, "rope_dim": EXAMPLE_ROPE_DIM}
    return PatternSpec(NAME, variant, search, replace, example_inputs, wildcards)


def pattern_specs(schemes: Sequence[str]) -> list[PatternSpec]:
    return [
        _spec(is_neox, layout, v2, cast)
        for v2 in (False, True)
        for layout in CACHE_LAYOUTS
        for is_neox in (False, True)
        for cast in (False, True)
    ]


def prepare(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    return 0


def rewrite(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    return 0  # no graph rewrite after the matchers


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
    """Every kv-only ``mla_cache_write`` left that writes a rope of a norm (or of its cast,
    through views or not), and why."""
    out = []
    for write in find_calls(graph, "mla_cache_write"):
        kv_rot, views = _through_views(
            write.kwargs.get("kv") if write.target in HOPS else write.args[0]
        )
        if not isinstance(kv_rot, torch.fx.Node) or op_name(kv_rot) != "rope":
            continue
        src, more = _through_views(kv_rot.args[1])
        views += more
        cast = None
        if isinstance(src, torch.fx.Node) and src.target is _CAST:
            cast, (src, more) = src, _through_views(src.args[0])
            views += more
        if not isinstance(src, torch.fx.Node) or op_name(src) != "rms_norm":
            continue
        out.append(NearMiss(NAME, write.name, "mla_cache_write", _explain(src, cast, views)))
    return out


_CAST = torch.ops.prims.convert_element_type.default


def _through_views(node: object) -> tuple[object, list[torch.fx.Node]]:
    return canonical.view_chain(node) if isinstance(node, torch.fx.Node) else (node, [])


def _explain(norm: torch.fx.Node, cast: torch.fx.Node | None, views: list[torch.fx.Node]) -> str:
    for node, what in ((norm, "normed value"), (cast, "cast value")):
        if node is not None and len(node.users) > 1:
            users = ", ".join(users_by_op(node))
            return (
                f"the {what} has other users ({users}); the fused op returns only the rotated rows"
            )
    if views:
        return (
            f"a view sits in the chain ({canonical.describe_view(views[0])}): norm → cast → "
            "rope → write is matched without views in it"
        )
    return "structure matched a registered pattern but its re-check failed"
