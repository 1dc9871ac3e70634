"""rope_cache: ``rope(q)``, ``rope(kv)`` → ``mla_cache_write(kv_rot)``  ⇒  ``rope_mla_cache_write``.

The cache write mutates the cache, so it reaches the pass wrapped in ``auto_functionalized``
(v1, what vLLM uses) or ``auto_functionalized_v2`` (torch's default); one spec each, written in
that functional form with kwargs in the order functionalization emits them (the order is part
of the match). The replacement keeps the functional form, so Inductor reinplaces it.

q and kv are usually views of one projection at nonzero storage offsets. The pass rebuilds the
replacement's ``eager_input_vals`` from the real inputs (fusion_passes.fusion_pass), otherwise
Inductor copies the wrong memory into the fused op (torch's
register_replacement.check_fn rebuilds the args with empty_strided, dropping storage_offset).

Must not fire: q and kv ropes differ in positions, table, rope_dim or style; the cache is a view
(v2 carries ``_kv_cache_size``); no q rope exists (kv-only writes are left alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
    op_args,
    op_name,
    val,
)

NAME = "rope_cache"
STANDALONE_OPS = ("rope", "mla_cache_write")
FUSED_OPS = ("rope_mla_cache_write",)
EXAMPLE_ROPE_DIM = 64
ops = torch.ops.fusion_ops


def _spec(is_neox: bool, layout: str, v2: bool) -> PatternSpec:
    write, fused = ops.mla_cache_write.default, ops.rope_mla_cache_write.default

    def search(
        positions: Any,
        q: Any,
        kv: Any,
        cos_sin_cache: Any,
        kv_cache: Any,
        slot_mapping: Any,
        rope_dim: int,
    ) -> Any:
        q_rot = ops.rope.default(positions, q, cos_sin_cache, rope_dim, is_neox)
        kv_rot = ops.rope.default(positions, kv, cos_sin_cache, rope_dim, is_neox)
        kwargs = dict(kv=kv_rot, kv_cache=kv_cache, slot_mapping=slot_mapping, layout=layout)
        out = functional_call(write, v2, kwargs)
        return out[1], q_rot, kv_rot

    def replace(
        positions: Any,
        q: Any,
        kv: Any,
        cos_sin_cache: Any,
        kv_cache: Any,
        slot_mapping: Any,
        rope_dim: int,
    ) -> Any:
        kwargs = dict(positions=positions, q=q, kv=kv, cos_sin_cache=cos_sin_cache)
        kwargs.update(kv_cache=kv_cache, slot_mapping=slot_mapping, rope_dim=rope_dim)
        kwargs.update(is_neox=is_neox, layout=layout)
        out = functional_call(fused, v2, kwargs)
        return out[2], out[0], out[1]  # new cache, q_rot, kv_rot

    variant = f"{'neox' if is_neox else 'gptj'}_{layout}_{'v2' if v2 else 'v1'}"
    wildcards = {"rope_dim": EXAMPLE_ROPE_DIM}
    return PatternSpec(NAME, variant, search, replace, lambda: example_inputs(layout), wildcards)


def example_inputs(layout: str) -> list[torch.Tensor]:
    """(positions, q [T, 2, 512], kv [T, 512], cos_sin_cache, kv_cache, slot_mapping) for a
    pattern over q and kv ropes and a cache write in ``layout`` (called under fake tensors)."""
    t = 4
    if layout == "dsv4_fp8":
        cache = torch.empty(2, 4, 584, dtype=torch.uint8)
    else:
        cache = torch.empty(2, 4, 512, dtype=torch.bfloat16)
    return [
        torch.empty(t, dtype=torch.int64),
        torch.empty(t, 2, 512, dtype=torch.bfloat16),
        torch.empty(t, 512, dtype=torch.bfloat16),
        torch.empty(16, EXAMPLE_ROPE_DIM, dtype=torch.float32),
        cache,
        torch.empty(t, dtype=torch.int64),
    ]


def pattern_specs(schemes: Sequence[str]) -> list[PatternSpec]:
    return [
        _spec(is_neox, layout, v2)
        for v2 in (False, True)
        for layout in CACHE_LAYOUTS
        for is_neox in (False, True)
    ]


def prepare(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    """For each cache write fed by a rope through views that keep tokens and head dim
    (``rope(kv3d).squeeze(1)``), move the views to the rope's input; then put every such kv
    rope last among the users of its inputs, so the q-rope output of the pattern binds to a
    q rope written before *or after* it."""
    done = 0
    for write in find_calls(graph, "mla_cache_write"):
        src, views = canonical.view_chain(op_args(write).get("kv"))
        if views and op_name(src) == "rope":
            done += canonical.hoist_views_above(src, input_index=1)
    for write in find_calls(graph, "mla_cache_write"):
        kv_rot = op_args(write).get("kv")
        if isinstance(kv_rot, torch.fx.Node) and op_name(kv_rot) == "rope":
            for arg in kv_rot.all_input_nodes:
                canonical.move_user_last(arg, kv_rot)
    return done


def rewrite(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    return 0  # no graph rewrite after the matchers


def label(node: torch.fx.Node) -> str | None:
    if op_name(node) != "rope_mla_cache_write" or node.target not in HOPS:
        return None
    kw = node.kwargs
    style = "neox" if kw["is_neox"] else "gptj"
    hop = "v2" if node.target is auto_functionalized_v2 else "v1"
    return f"{NAME}/{style}_{kw['layout']}_{hop}/{dtype_name(val(kw['q']).dtype)}"


def near_misses(graph: torch.fx.Graph, schemes: Sequence[str]) -> list[NearMiss]:
    """Every ``mla_cache_write`` left in the graph, with why it was not fused."""
    return [
        NearMiss(NAME, n.name, "mla_cache_write", _explain_write(n))
        for n in find_calls(graph, "mla_cache_write")
    ]


def _rope_key(node: torch.fx.Node) -> tuple[Any, ...]:
    a = op_args(node)
    return (a["positions"], a["cos_sin_cache"], a["rope_dim"], a["is_neox"])


def _explain_write(write: torch.fx.Node) -> str:
    if "_kv_cache_size" in write.kwargs:
        return (
            "the cache is a view (auto_functionalized_v2 passes _kv_cache_size/stride/offset); "
            "pass the cache base tensor to mla_cache_write"
        )
    kv_rot = op_args(write).get("kv")
    if not isinstance(kv_rot, torch.fx.Node) or op_name(kv_rot) != "rope":
        producer = getattr(kv_rot, "target", kv_rot)
        return f"its kv input is not a rope output (produced by {producer})"
    if write.target not in HOPS:
        return "the cache write is not functionalized (graph not from torch.compile?)"
    ropes = [n for n in find_calls(write.graph, "rope") if n is not kv_rot]
    same = [n for n in ropes if _rope_key(n) == _rope_key(kv_rot)]
    if same:
        return (
            "a q rope with the same positions/table/rope_dim/style exists but the re-check failed"
        )
    shares_positions = [n for n in ropes if op_args(n)["positions"] is op_args(kv_rot)["positions"]]
    if shares_positions:
        q_key, kv_key = _rope_key(shares_positions[0]), _rope_key(kv_rot)
        fields = ("positions", "cos_sin_cache", "rope_dim", "is_neox")
        diff = [
            f"{f} {q!s} vs {k!s}"
            for f, q, k in zip(fields, q_key, kv_key, strict=True)
            if q is not k and q != k
        ]
        return f"q rope {shares_positions[0].name} and kv rope differ: {', '.join(diff)}"
    return "kv-only cache write: no q rope shares the kv rope's positions and table"
