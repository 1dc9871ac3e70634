"""qnorm_rope_cache (chain): ``weightless_rms_norm(q)`` → ``rope(q)``, ``rope(kv)`` →
``mla_cache_write(kv_rot)``  ⇒  ``qnorm_rope_mla_cache_write``.

DeepSeek-V4's attention normalizes each q head without a weight before its rope; vLLM
hand-fuses that norm with both ropes, the kv quant and the paged insert into one kernel
(``fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert``). Registered before ``rope_cache``, so
it sees the two ropes and the write unfused (the rotated kv always has a user there: the write;
a ``rope_mla_cache_write`` output may have none, which would need one pattern per set of used
outputs). Written in both functionalization forms of the cache write (kwargs in
functionalization's order), like ``rope_cache``, whose canonicalization it shares.

The norm must be the ``weightless_rms_norm`` op: a norm written in plain PyTorch is reduced by
Inductor in its own order, which the fused kernel cannot reproduce bit for bit, so it is left
alone unless the pass is built with ``numerics="tolerant"``, which turns it into that op first
(:mod:`patterns.plain_norms`).
The normed q must have no other user (a pattern's inner nodes never do).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2

from fusion_ops import CACHE_LAYOUTS

from . import canonical, rope_cache
from .base import (
    HOPS,
    NearMiss,
    PatternSpec,
    dtype_name,
    find_calls,
    functional_call,
    op_args,
    op_name,
    users_by_op,
    val,
)

NAME = "qnorm_rope_cache"
STANDALONE_OPS = ("weightless_rms_norm", "rope", "mla_cache_write")
FUSED_OPS = ("qnorm_rope_mla_cache_write",)
EXAMPLE_ROPE_DIM = rope_cache.EXAMPLE_ROPE_DIM
EXAMPLE_EPS = 1e-6
ops = torch.ops.fusion_ops


def _spec(is_neox: bool, layout: str, v2: bool) -> PatternSpec:
    fused = ops.qnorm_rope_mla_cache_write.default

    def search(positions, q, kv, cos_sin_cache, kv_cache, slot_mapping, q_eps, rope_dim):  # type: ignore[no-untyped-def]
        return _ropes_and_write(
            ops.weightless_rms_norm.default(q, q_eps), positions, kv, cos_sin_cache, kv_cache,
            slot_mapping, rope_dim, is_neox, layout, v2,
        )  # fmt: skip

    def replace(positions, q, kv, cos_sin_cache, kv_cache, slot_mapping, q_eps, rope_dim):  # type: ignore[no-untyped-def]
        kwargs = dict(positions=positions, q=q, q_eps=q_eps, kv=kv, cos_sin_cache=cos_sin_cache)
        kwargs.update(kv_cache=kv_cache, slot_mapping=slot_mapping, rope_dim=rope_dim)
        kwargs.update(is_neox=is_neox, layout=layout)
        out = functional_call(fused, v2, kwargs)
        return out[2], out[0], out[1]  # new cache, q_rot, kv_rot

    variant = f"{'neox' if is_neox else 'gptj'}_{layout}_{'v2' if v2 else 'v1'}"
    wildcards = {"q_eps": EXAMPLE_EPS, "rope_dim": EXAMPLE_ROPE_DIM}
    return PatternSpec(
        NAME, variant, search, replace, lambda: rope_cache.example_inputs(layout), wildcards
    )


def _ropes_and_write(
    q_normed, positions, kv, cos_sin_cache, kv_cache, slot_mapping, rope_dim, is_neox, layout, v2
):  # type: ignore[no-untyped-def]
    """The rest of the search: q rope, kv rope, kv cache write; returns (new cache, q_rot,
    kv_rot), the order of the replacement's outputs."""
    q_rot = ops.rope.default(positions, q_normed, cos_sin_cache, rope_dim, is_neox)
    kv_rot = ops.rope.default(positions, kv, cos_sin_cache, rope_dim, is_neox)
    kwargs = dict(kv=kv_rot, kv_cache=kv_cache, slot_mapping=slot_mapping, layout=layout)
    out = functional_call(ops.mla_cache_write.default, v2, kwargs)
    return out[1], q_rot, kv_rot


def pattern_specs(schemes: Sequence[str]) -> list[PatternSpec]:
    return [
        _spec(is_neox, layout, v2)
        for v2 in (False, True)
        for layout in CACHE_LAYOUTS
        for is_neox in (False, True)
    ]


def _is_rope(node: torch.fx.Node) -> bool:
    return op_name(node) == "rope"


def _ropes_q(node: torch.fx.Node) -> bool:
    """A rope, or the fused rope + write rope_cache made of one."""
    return op_name(node) in ("rope", "rope_mla_cache_write")


def prepare(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    """Views between a q norm and its rope that keep the rows (``norm(q2d).view(T, H, D)``)
    move above the norm (row-wise, so exact); then rope_cache's canonicalization (views hoisted
    above the kv rope, the kv rope last among its inputs' users: a q rope before or after it
    binds), which does nothing more the second time when both families are enabled."""
    done = 0
    for norm in find_calls(graph, "weightless_rms_norm"):
        views = canonical.single_use_views(norm)
        if views and all(canonical.keeps_rows(v) for v in views):
            if any(_is_rope(u) for u in views[-1].users):
                done += canonical.hoist_views_above(norm, input_index=0, keep_first=False)
    return done + rope_cache.prepare(graph, schemes)


def rewrite(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    return 0  # no graph rewrite after the matchers


def label(node: torch.fx.Node) -> str | None:
    if op_name(node) != "qnorm_rope_mla_cache_write" or node.target not in HOPS:
        return None
    kw = node.kwargs
    style = "neox" if kw["is_neox"] else "gptj"
    hop = "v2" if node.target is auto_functionalized_v2 else "v1"
    return f"{NAME}/{style}_{kw['layout']}_{hop}/{dtype_name(val(kw['q']).dtype)}"


def near_misses(graph: torch.fx.Graph, schemes: Sequence[str]) -> list[NearMiss]:
    """Every ``weightless_rms_norm`` left whose output is roped, and every fused rope + write
    whose q is a norm written in plain PyTorch, with why."""
    out = []
    for norm in find_calls(graph, "weightless_rms_norm"):
        ropes = [u for u in norm.users if _ropes_q(u)]
        if ropes:
            out.append(NearMiss(NAME, norm.name, "weightless_rms_norm", _explain(norm, ropes)))
        elif canonical.consumers_through_views(norm, _ropes_q) or canonical.blocking_view(
            norm, _ropes_q
        ):
            reason = (
                "views between the norm and its rope were not moved above it (a view that "
                "changes the rows, or one with other users): norm → rope is matched without "
                "views in it"
            )
            out.append(NearMiss(NAME, norm.name, "weightless_rms_norm", reason))
    for fused in find_calls(graph, "rope_mla_cache_write"):
        if _is_plain_torch_norm(op_args(fused).get("q")):
            reason = (
                "its q is an RMS norm written in plain PyTorch (Inductor reduces it in its own "
                "order, which a fused kernel cannot reproduce bit for bit): write it as "
                'fusion_ops.weightless_rms_norm, or build FusionPass(numerics="tolerant") to '
                "fuse it anyway (last-bit differences within a tested bound)"
            )
            out.append(NearMiss(NAME, fused.name, "rope_mla_cache_write", reason))
    return out


def _is_plain_torch_norm(node: object) -> bool:
    """``(x·rsqrt(…)).to(dtype)`` as post-grad graphs spell a plain-PyTorch RMS norm."""
    if not isinstance(node, torch.fx.Node) or node.target is not _CAST:
        return False
    product = node.args[0]
    return (
        isinstance(product, torch.fx.Node)
        and product.target is torch.ops.aten.mul.Tensor
        and any(
            isinstance(a, torch.fx.Node) and a.target is torch.ops.aten.rsqrt.default
            for a in product.args
        )
    )


_CAST = torch.ops.prims.convert_element_type.default


def _explain(norm: torch.fx.Node, ropes: list[torch.fx.Node]) -> str:
    if len(norm.users) > 1:
        users = ", ".join(sorted(users_by_op(norm)))
        return f"the normed q has other users ({users}); the fused op returns only the roped q"
    (rope,) = ropes
    if op_name(rope) == "rope":
        return "its rope has no kv rope + cache write beside it (same positions, table, style)"
    if op_args(rope).get("q") is not norm:
        return "the norm feeds the kv side of the fused rope + write, not its q"
    return "structure matched a registered pattern but its re-check failed"
