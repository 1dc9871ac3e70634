"""RoPE, the MLA KV-cache write and dequant, and their fused chains (rope + write, q norm + rope
+ write, kv norm + rope + write, dequant + FP8 cast)."""

from __future__ import annotations

from typing import Any

import torch

from .. import checks
from ..formats import CACHE_LAYOUTS, DSV4_HEAD_DIM, DSV4_SLOT_BYTES
from ..reference import cache as ref_cache
from ..reference import rope as ref_rope
from .define import define
from .norm import check_norm, check_weightless_norm


def check_rope(
    op: str,
    positions: torch.Tensor,
    x: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rope_dim: int,
    x_arg: str = "x",
) -> None:
    checks.check_min_dim(op, x_arg, x, 2)
    checks.check_dtype(op, x_arg, x, checks.FLOAT_DTYPES)
    checks.check_dim(op, "positions", positions, 1)
    checks.check(
        op,
        "positions",
        positions.shape[0] == x.shape[0],
        lambda: (
            f"has {positions.shape[0]} entries; expected one per token of '{x_arg}' ({x.shape[0]})"
        ),
    )
    d = x.shape[-1]
    checks.check(
        op,
        "rope_dim",
        rope_dim > 0 and rope_dim % 2 == 0 and rope_dim <= d,
        lambda: f"got {rope_dim}; expected an even number in [2, {d}] (the head dim of '{x_arg}')",
    )
    checks.check_dim(op, "cos_sin_cache", cos_sin_cache, 2)
    checks.check_dtype(op, "cos_sin_cache", cos_sin_cache, checks.FLOAT_DTYPES)
    checks.check(
        op,
        "cos_sin_cache",
        cos_sin_cache.shape[1] == rope_dim,
        lambda: (
            f"has shape {tuple(cos_sin_cache.shape)}; expected [max_pos, rope_dim={rope_dim}] "
            "holding [cos | sin]"
        ),
    )
    checks.check_same_device(op, positions=positions, x=x, cos_sin_cache=cos_sin_cache)
    checks.check_index_range(op, "positions", positions, cos_sin_cache.shape[0])


def _rope_fake(positions: torch.Tensor, x: torch.Tensor, *_: Any) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


define(
    "rope",
    "(Tensor positions, Tensor x, Tensor cos_sin_cache, int rope_dim, bool is_neox) -> Tensor",
    lambda pos, x, cs, rope_dim, is_neox: check_rope("rope", pos, x, cs, rope_dim),
    _rope_fake,
    ref_rope.rope,
    device_arg=1,
)


def _check_layout(op: str, layout: str) -> None:
    checks.check(
        op, "layout", layout in CACHE_LAYOUTS, lambda: f"got {layout!r}; expected {CACHE_LAYOUTS}"
    )


def _check_cache(op: str, kv_cache: torch.Tensor, layout: str) -> None:
    _check_layout(op, layout)
    checks.check_dim(op, "kv_cache", kv_cache, 3)
    if layout == "dsv4_fp8":
        checks.check_dtype(op, "kv_cache", kv_cache, (torch.uint8,))
        checks.check(
            op,
            "kv_cache",
            kv_cache.shape[2] == DSV4_SLOT_BYTES,
            lambda: (
                f"has shape {tuple(kv_cache.shape)}; layout 'dsv4_fp8' expects "
                f"[num_blocks, block_size, {DSV4_SLOT_BYTES}] uint8"
            ),
        )
    else:
        checks.check_dtype(op, "kv_cache", kv_cache, checks.FLOAT_DTYPES)
    nb, bs, row = kv_cache.shape
    checks.check(
        op,
        "kv_cache",
        kv_cache.stride(2) == 1
        and (bs == 1 or kv_cache.stride(1) == row)
        and (nb == 1 or kv_cache.stride(0) >= bs * row),
        lambda: (
            f"has strides {kv_cache.stride()}; each block must be contiguous (strides "
            f"(>= {bs * row}, {row}, 1))"
        ),
    )


def _written(kv: torch.Tensor, kv_dtype: torch.dtype | None) -> str:
    if kv_dtype is None:
        return f"has dtype {str(kv.dtype).removeprefix('torch.')}"
    return f"is written as {str(kv_dtype).removeprefix('torch.')} (out_dtype)"


def _check_cache_write(
    op: str,
    kv: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: str,
    kv_dtype: torch.dtype | None = None,
    kv_arg: str = "kv",
) -> None:
    """``kv_dtype``: the dtype of what is written when it is not kv's own (an op that casts)."""
    _check_cache(op, kv_cache, layout)
    checks.check_dim(op, kv_arg, kv, 2)
    dtype = kv.dtype if kv_dtype is None else kv_dtype
    if layout == "dsv4_fp8":
        if dtype != torch.bfloat16:
            raise TypeError(
                f"fusion_ops.{op}: argument '{kv_arg}' {_written(kv, kv_dtype)}; layout "
                "'dsv4_fp8' expects bfloat16 rows"
            )
        checks.check(
            op,
            kv_arg,
            kv.shape[1] == DSV4_HEAD_DIM,
            lambda: (
                f"has shape {tuple(kv.shape)}; layout 'dsv4_fp8' expects [tokens, {DSV4_HEAD_DIM}]"
            ),
        )
    else:
        if dtype != kv_cache.dtype:
            raise TypeError(
                f"fusion_ops.{op}: argument '{kv_arg}' {_written(kv, kv_dtype)}; expected the "
                f"dtype of 'kv_cache' ({str(kv_cache.dtype).removeprefix('torch.')})"
            )
        checks.check(
            op,
            kv_arg,
            kv.shape[1] == kv_cache.shape[2],
            lambda: (
                f"has shape {tuple(kv.shape)}; expected [tokens, {kv_cache.shape[2]}] "
                "(cache head dim)"
            ),
        )
    checks.check_dim(op, "slot_mapping", slot_mapping, 1)
    checks.check(
        op,
        "slot_mapping",
        slot_mapping.shape[0] == kv.shape[0],
        lambda: (
            f"has {slot_mapping.shape[0]} entries; expected one per token of '{kv_arg}' "
            f"({kv.shape[0]})"
        ),
    )
    checks.check_same_device(op, **{kv_arg: kv}, kv_cache=kv_cache, slot_mapping=slot_mapping)
    checks.check_index_range(
        op,
        "slot_mapping",
        slot_mapping,
        kv_cache.shape[0] * kv_cache.shape[1],
        allow_negative=True,
    )


define(
    "mla_cache_write",
    "(Tensor kv, Tensor(a!) kv_cache, Tensor slot_mapping, str layout) -> ()",
    lambda kv, cache, slots, layout: _check_cache_write(
        "mla_cache_write", kv, cache, slots, layout
    ),
    lambda *args: None,
    ref_cache.mla_cache_write,
)


def _check_dequant(op: str, kv_cache: torch.Tensor, block_ids: torch.Tensor, layout: str) -> None:
    _check_cache(op, kv_cache, layout)
    checks.check_dim(op, "block_ids", block_ids, 1)
    checks.check_same_device(op, kv_cache=kv_cache, block_ids=block_ids)
    checks.check_index_range(op, "block_ids", block_ids, kv_cache.shape[0])


def _dequant_shape(kv_cache: torch.Tensor, block_ids: torch.Tensor, layout: str) -> tuple:
    head_dim = DSV4_HEAD_DIM if layout == "dsv4_fp8" else kv_cache.shape[2]
    return (block_ids.shape[0] * kv_cache.shape[1], head_dim)


define(
    "dequant_cache",
    "(Tensor kv_cache, Tensor block_ids, str layout) -> Tensor",
    lambda cache, ids, layout: _check_dequant("dequant_cache", cache, ids, layout),
    lambda cache, ids, layout: cache.new_empty(
        _dequant_shape(cache, ids, layout),
        dtype=torch.bfloat16 if layout == "dsv4_fp8" else cache.dtype,
    ),
    ref_cache.dequant_cache,
)


def _check_rope_cache(
    positions: torch.Tensor,
    q: torch.Tensor,
    kv: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rope_dim: int,
    is_neox: bool,
    layout: str,
    op: str = "rope_mla_cache_write",
) -> None:
    check_rope(op, positions, q, cos_sin_cache, rope_dim, x_arg="q")
    check_rope(op, positions, kv, cos_sin_cache, rope_dim, x_arg="kv")
    _check_cache_write(op, kv, kv_cache, slot_mapping, layout)


define(
    "rope_mla_cache_write",
    "(Tensor positions, Tensor q, Tensor kv, Tensor cos_sin_cache, Tensor(a!) kv_cache, "
    "Tensor slot_mapping, int rope_dim, bool is_neox, str layout) -> (Tensor, Tensor)",
    _check_rope_cache,
    lambda positions, q, kv, *_: (_rope_fake(positions, q), _rope_fake(positions, kv)),
    ref_cache.rope_mla_cache_write,
    device_arg=1,
)


def _check_qnorm_rope_cache(
    positions: torch.Tensor,
    q: torch.Tensor,
    q_eps: float,
    kv: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rope_dim: int,
    is_neox: bool,
    layout: str,
) -> None:
    op = "qnorm_rope_mla_cache_write"
    check_weightless_norm(op, q, q_eps, x_arg="q")
    _check_rope_cache(
        positions, q, kv, cos_sin_cache, kv_cache, slot_mapping, rope_dim, is_neox, layout, op
    )


define(
    "qnorm_rope_mla_cache_write",
    "(Tensor positions, Tensor q, float q_eps, Tensor kv, Tensor cos_sin_cache, "
    "Tensor(a!) kv_cache, Tensor slot_mapping, int rope_dim, bool is_neox, str layout) "
    "-> (Tensor, Tensor)",
    _check_qnorm_rope_cache,
    lambda positions, q, q_eps, kv, *_: (_rope_fake(positions, q), _rope_fake(positions, kv)),
    ref_cache.qnorm_rope_mla_cache_write,
    device_arg=1,
)


def _check_norm_rope_cache(
    positions: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rope_dim: int,
    is_neox: bool,
    layout: str,
    out_dtype: torch.dtype | None = None,
) -> None:
    op = "rms_norm_rope_mla_cache_write"
    check_norm(op, x, weight, eps)
    if out_dtype is not None:
        checks.check(
            op,
            "out_dtype",
            out_dtype in checks.FLOAT_DTYPES,
            lambda: f"is {out_dtype}; expected one of {checks.FLOAT_DTYPES} or None (x's dtype)",
        )
    check_rope(op, positions, x, cos_sin_cache, rope_dim)
    _check_cache_write(
        op, x, kv_cache, slot_mapping, layout, kv_dtype=out_dtype or x.dtype, kv_arg="x"
    )


def _norm_rope_cache_fake(positions, x, *args):  # type: ignore[no-untyped-def]
    out_dtype = args[-1]
    return torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format)


define(
    "rms_norm_rope_mla_cache_write",
    "(Tensor positions, Tensor x, Tensor weight, float eps, Tensor cos_sin_cache, "
    "Tensor(a!) kv_cache, Tensor slot_mapping, int rope_dim, bool is_neox, str layout, "
    "ScalarType? out_dtype=None) -> Tensor",
    _check_norm_rope_cache,
    _norm_rope_cache_fake,
    ref_cache.rms_norm_rope_mla_cache_write,
    device_arg=1,
)


def _check_dequant_fp8(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, layout: str, fp8_dtype: torch.dtype
) -> None:
    _check_dequant("dequant_cache_fp8", kv_cache, block_ids, layout)
    checks.check_fp8_dtype("dequant_cache_fp8", "fp8_dtype", fp8_dtype)


define(
    "dequant_cache_fp8",
    "(Tensor kv_cache, Tensor block_ids, str layout, ScalarType fp8_dtype) -> Tensor",
    _check_dequant_fp8,
    lambda cache, ids, layout, dt: cache.new_empty(_dequant_shape(cache, ids, layout), dtype=dt),
    ref_cache.dequant_cache_fp8,
)
