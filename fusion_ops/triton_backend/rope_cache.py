"""Launchers of RoPE, the MLA cache write, the norm/rope/cache chains and the cache dequant,
registered as the ``triton`` implementations of their ops."""

from __future__ import annotations

import torch
import triton

from .. import formats
from .. import launch_policy as policy
from ..backends import register_impl
from ..launch_policy import next_power_of_2
from ..reference import cache as ref_cache
from . import kernels as k
from .calls import chain_meta
from .device import FNUZ, IS_HIP, device_facts, rows
from .launch import Launcher

_rope_launch = Launcher(k.rope_kernel)
_cache_write_launch = Launcher(k.cache_write_kernel)
_rope_cache_launch = Launcher(k.rope_cache_kernel)
_norm_rope_cache_launch = Launcher(k.norm_rope_cache_kernel)
_qnorm_rope_cache_launch = Launcher(k.qnorm_rope_cache_kernel)
_dequant_dsv4_launch = Launcher(k.dequant_dsv4_kernel)
_gather_rows_launch = Launcher(k.gather_rows_kernel)


def _fp32_table(cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """The rope table as the kernels read it (fp32, contiguous). Tested before converting: in
    compiled code even a no-op ``.float()`` reaches the dispatcher as ``aten::to``, which the
    CUDA replay must refuse (fusion_ops.native), so the rope ops would never replay."""
    if cos_sin_cache.dtype == torch.float32 and cos_sin_cache.is_contiguous():
        return cos_sin_cache
    return cos_sin_cache.float().contiguous()


def _heads_view(x: torch.Tensor) -> torch.Tensor:
    """x [T, ..., D] as [T, H, D] with a unit last stride."""
    t, d = x.shape[0], x.shape[-1]
    v = x.reshape(t, -1, d) if x.dim() != 3 else x
    return v if v.stride(-1) == 1 else v.contiguous()


@register_impl("rope", "triton")
def rope(positions, x, cos_sin_cache, rope_dim, is_neox):  # type: ignore[no-untyped-def]
    xv = _heads_view(x)
    t, h, d = xv.shape
    out = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
    if t:
        _rope_launch(
            (t, h),
            (
                positions,
                xv,
                out,
                _fp32_table(cos_sin_cache),
                xv.stride(0),
                xv.stride(1),
                h,
            ),
            (
                ("D", d),
                ("ROPE", rope_dim),
                ("IS_NEOX", is_neox),
                ("BLOCK_D", next_power_of_2(d)),
                ("enable_fp_fusion", False),
            ),
        )
    return out.view(x.shape)


def _kv_rows(kv: torch.Tensor) -> torch.Tensor:
    return kv if kv.stride(-1) == 1 else kv.contiguous()


@register_impl("mla_cache_write", "triton")
def mla_cache_write(kv, kv_cache, slot_mapping, layout):  # type: ignore[no-untyped-def]
    kv2 = _kv_rows(kv)
    t, d = kv2.shape
    if t:
        _cache_write_launch(
            (t,),
            (
                kv2,
                kv2.stride(0),
                kv_cache,
                slot_mapping,
                kv_cache.stride(0),
                kv_cache.shape[0] * kv_cache.shape[1],
            ),
            (
                ("BS", kv_cache.shape[1]),
                ("D", d),
                ("DSV4", layout == "dsv4_fp8"),
                ("BLOCK_D", next_power_of_2(d)),
                ("num_warps", 4),
            ),
        )


def _rope_cache(
    positions, q, kv, cos_sin_cache, kv_cache, slot_mapping, rope_dim, is_neox, layout, q_eps
):  # type: ignore[no-untyped-def]
    """Both ropes and the kv write in one launch, grid (tokens, heads + 1); with ``q_eps`` (not
    None) each q head is first normed without a weight (qnorm_rope_cache_kernel)."""
    qv, kv2 = _heads_view(q), _kv_rows(kv)
    t, h, d = qv.shape
    q_out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    kv_out = torch.empty(kv2.shape, dtype=kv.dtype, device=kv.device)
    if not t:
        return q_out.view(q.shape), kv_out
    block = next_power_of_2(d)
    rows = (positions, qv, kv2, q_out, kv_out, _fp32_table(cos_sin_cache), kv_cache, slot_mapping)
    strides = (qv.stride(0), qv.stride(1), kv2.stride(0))
    cache = (kv_cache.stride(0), kv_cache.shape[0] * kv_cache.shape[1], h)
    geometry = (
        ("BS", kv_cache.shape[1]),
        ("D", d),
        ("ROPE", rope_dim),
        ("IS_NEOX", is_neox),
        ("DSV4", layout == "dsv4_fp8"),
        ("BLOCK_D", block),
    )
    if q_eps is None:
        flags = (("enable_fp_fusion", False),)
        _rope_cache_launch((t, h + 1), (*rows, *strides, *cache), (*geometry, *flags))
    else:
        # the standalone weightless norm's warps for its t·h rows: same sums
        launch = policy.chain_launch(d, t * h, device_facts(q.get_device()), q_eps)
        flags = chain_meta(launch, IS_HIP)
        _qnorm_rope_cache_launch((t, h + 1), (*rows, *strides, q_eps, *cache), (*geometry, *flags))
    return q_out.view(q.shape), kv_out


@register_impl("rope_mla_cache_write", "triton")
def rope_mla_cache_write(
    positions, q, kv, cos_sin_cache, kv_cache, slot_mapping, rope_dim, is_neox, layout
):  # type: ignore[no-untyped-def]
    args = (positions, q, kv, cos_sin_cache, kv_cache, slot_mapping, rope_dim, is_neox, layout)
    return _rope_cache(*args, q_eps=None)


@register_impl("qnorm_rope_mla_cache_write", "triton")
def qnorm_rope_mla_cache_write(
    positions, q, q_eps, kv, cos_sin_cache, kv_cache, slot_mapping, rope_dim, is_neox, layout
):  # type: ignore[no-untyped-def]
    args = (positions, q, kv, cos_sin_cache, kv_cache, slot_mapping, rope_dim, is_neox, layout)
    return _rope_cache(*args, q_eps=q_eps)


@register_impl("rms_norm_rope_mla_cache_write", "triton")
def rms_norm_rope_mla_cache_write(
    positions,
    x,
    weight,
    eps,
    cos_sin_cache,
    kv_cache,
    slot_mapping,
    rope_dim,
    is_neox,
    layout,
    out_dtype=None,
):  # type: ignore[no-untyped-def]
    x2 = rows(x)
    t, d = x2.shape
    kv_out = torch.empty((t, d), dtype=out_dtype or x.dtype, device=x.device)
    if t:
        launch = policy.chain_launch(d, t, device_facts(x.get_device()), eps)
        _norm_rope_cache_launch(
            (t,),
            (
                positions,
                x2,
                weight,
                kv_out,
                _fp32_table(cos_sin_cache),
                kv_cache,
                slot_mapping,
                x2.stride(0),
                eps,
                kv_cache.stride(0),
                kv_cache.shape[0] * kv_cache.shape[1],
            ),
            (
                ("BS", kv_cache.shape[1]),
                ("D", d),
                ("ROPE", rope_dim),
                ("IS_NEOX", is_neox),
                ("DSV4", layout == "dsv4_fp8"),
                ("BLOCK_D", launch.block_k),
                *chain_meta(launch, IS_HIP),  # the standalone norm's warps: same sums
            ),
        )
    return kv_out


def dequant(
    kv_cache: torch.Tensor,
    block_ids: torch.Tensor,
    layout: str,
    fp8_dtype: torch.dtype | None,
    launch: policy.DequantLaunch | None = None,
) -> torch.Tensor:
    """The dequant_cache(_fp8) launcher: ``kv_cache``'s blocks ``block_ids`` as rows, bf16 or cast
    to ``fp8_dtype``; ``launch``: the policy's record unless given (benchmarks override it)."""
    nb, bs, row = kv_cache.shape
    n = block_ids.shape[0]
    to_fp8 = fp8_dtype is not None
    fmax = formats.fp8_max(fp8_dtype) if to_fp8 else 0.0
    if layout == "dsv4_fp8":
        out = torch.empty(
            (n * bs, 512), device=kv_cache.device, dtype=fp8_dtype if to_fp8 else torch.bfloat16
        )
        launch = launch or policy.dequant_launch(bs)
        if n and bs % launch.tokens == 0:
            _dequant_dsv4_launch(
                launch.grid(n, bs),
                (kv_cache, block_ids, out, kv_cache.stride(0), nb, fmax),
                (("BS", bs), ("TOK", launch.tokens), ("TO_FP8", to_fp8),
                 ("num_warps", launch.num_warps)),
            )  # fmt: skip
            return out
        return _reference_dequant(kv_cache, block_ids, layout, fp8_dtype)
    out = torch.empty(
        (n * bs, row), device=kv_cache.device, dtype=fp8_dtype if to_fp8 else kv_cache.dtype
    )
    if n:
        block = policy.GATHER_BLOCK
        _gather_rows_launch(
            (n, triton.cdiv(bs * row, block)),
            (kv_cache, block_ids, out, kv_cache.stride(0), nb, fmax),
            (("TO_FP8", to_fp8), ("ROW", bs * row), ("BLOCK", block), ("num_warps", 4)),
        )
    return out


def _reference_dequant(kv_cache, block_ids, layout, fp8_dtype):  # type: ignore[no-untyped-def]
    if fp8_dtype is None:
        return ref_cache.dequant_cache(kv_cache, block_ids, layout)
    return ref_cache.dequant_cache_fp8(kv_cache, block_ids, layout, fp8_dtype)


@register_impl("dequant_cache", "triton")
def dequant_cache(kv_cache, block_ids, layout):  # type: ignore[no-untyped-def]
    return dequant(kv_cache, block_ids, layout, None)


@register_impl("dequant_cache_fp8", "triton")
def dequant_cache_fp8(kv_cache, block_ids, layout, fp8_dtype):  # type: ignore[no-untyped-def]
    if fp8_dtype == FNUZ and not IS_HIP:
        return _reference_dequant(kv_cache, block_ids, layout, fp8_dtype)
    return dequant(kv_cache, block_ids, layout, fp8_dtype)
