"""Reference MLA KV-cache codec: write (encode + scatter to slots) and dequant (gather + decode).

Byte layout: see :mod:`fusion_ops.formats`. Encoding of one token of the ``dsv4_fp8`` layout
(kv bf16 [512]): for each 64-wide NoPE tile, amax = max(max|x|, 1e-4), e = ceil(log2(amax/448))
(exact), scale byte = clamp(e + 127, 0, 255), codes = e4m3fn(clamp(x·2^−e, ±448)) RNE; a tile
holding inf/NaN gets scale byte 0xFF (decodes to NaN) and codes 0x7F. RoPE dims are stored as
their bf16 bytes. Decoding: fp8(code) · 2^(byte − 127), byte 0xFF → NaN, rounded to bf16.
"""

from __future__ import annotations

import torch

from ..formats import (
    DSV4_DATA_BYTES,
    DSV4_FP8,
    DSV4_NOPE_DIM,
    DSV4_SCALE_BYTES,
    DSV4_SLOT_BYTES,
    DSV4_TILE,
    DSV4_TILE_AMAX_FLOOR,
    DSV4_TILES,
    E8M0_NAN,
    fp8_max,
)
from .norm import rms_norm, weightless_rms_norm
from .numerics import ceil_log2_ratio, pow2
from .rope import rope

_FP8_NAN_BYTE = 0x7F


def block_rows(kv_cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, row] cache -> [num_blocks, bs·row] view (one row per block, same memory)."""
    nb, bs, row = kv_cache.shape
    return kv_cache.as_strided((nb, bs * row), (kv_cache.stride(0), 1))


def encode_dsv4(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kv bf16 [N, 512] -> (data uint8 [N, 576], scales uint8 [N, 8])."""
    n = kv.shape[0]
    nope = kv[:, :DSV4_NOPE_DIM].float().reshape(n, DSV4_TILES, DSV4_TILE)
    amax = nope.abs().amax(-1)
    finite = amax.isfinite()
    e = ceil_log2_ratio(torch.where(finite, amax.clamp_min(DSV4_TILE_AMAX_FLOOR), 1.0), 448.0)
    byte = torch.where(finite, (e + 127).clamp(0, 255), E8M0_NAN)
    fmax = fp8_max(DSV4_FP8)
    codes = (nope * pow2(-e).unsqueeze(-1)).clamp(-fmax, fmax).to(DSV4_FP8).view(torch.uint8)
    codes = torch.where(finite.unsqueeze(-1), codes, _FP8_NAN_BYTE)
    rope_bytes = kv[:, DSV4_NOPE_DIM:].to(torch.bfloat16).contiguous().view(torch.uint8)
    data = torch.cat((codes.reshape(n, DSV4_NOPE_DIM), rope_bytes), dim=1)
    pad = torch.zeros(n, DSV4_SCALE_BYTES - DSV4_TILES, dtype=torch.uint8, device=kv.device)
    scales = torch.cat((byte.to(torch.uint8), pad), dim=1)
    return data, scales


def decode_dsv4(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(data uint8 [N, 576], scales uint8 [N, 8]) -> bf16 [N, 512]."""
    n = data.shape[0]
    codes = data[:, :DSV4_NOPE_DIM].contiguous().view(DSV4_FP8).float()
    tile_scale = scales[:, :DSV4_TILES].to(torch.int32)
    factor = torch.where(tile_scale == E8M0_NAN, float("nan"), pow2(tile_scale - 127))
    nope = (codes.reshape(n, DSV4_TILES, DSV4_TILE) * factor.unsqueeze(-1)).reshape(
        n, DSV4_NOPE_DIM
    )
    rope = data[:, DSV4_NOPE_DIM:].contiguous().view(torch.bfloat16)
    return torch.cat((nope.to(torch.bfloat16), rope), dim=1)


def mla_cache_write(
    kv: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, layout: str
) -> None:
    """Write kv [T, D] into the slots of ``slot_mapping`` [T]; slots < 0 are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    kv = kv[keep]
    nb, bs, _ = kv_cache.shape
    rows = block_rows(kv_cache)
    block, offset = slots // bs, slots % bs
    if layout == "bf16":
        d = kv_cache.shape[-1]
        cols = offset.unsqueeze(1) * d + torch.arange(d, device=kv.device)
        rows[block.unsqueeze(1), cols] = kv.to(kv_cache.dtype)
        return
    data, scales = encode_dsv4(kv)
    data_cols = offset.unsqueeze(1) * DSV4_DATA_BYTES + torch.arange(
        DSV4_DATA_BYTES, device=kv.device
    )
    scale_cols = (
        bs * DSV4_DATA_BYTES
        + offset.unsqueeze(1) * DSV4_SCALE_BYTES
        + torch.arange(DSV4_SCALE_BYTES, device=kv.device)
    )
    rows[block.unsqueeze(1), data_cols] = data
    rows[block.unsqueeze(1), scale_cols] = scales


def rope_mla_cache_write(
    positions: torch.Tensor,
    q: torch.Tensor,
    kv: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rope_dim: int,
    is_neox: bool,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused op's reference: rope on q and kv, then write the rotated kv; returns both."""
    q_rot = rope(positions, q, cos_sin_cache, rope_dim, is_neox)
    kv_rot = rope(positions, kv, cos_sin_cache, rope_dim, is_neox)
    mla_cache_write(kv_rot, kv_cache, slot_mapping, layout)
    return q_rot, kv_rot


def qnorm_rope_mla_cache_write(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The q-norm chain's reference: weightless rms_norm of each q head, then
    :func:`rope_mla_cache_write` (rope on q and kv, write the rotated kv); returns both."""
    q_normed = weightless_rms_norm(q, q_eps)
    return rope_mla_cache_write(
        positions, q_normed, kv, cos_sin_cache, kv_cache, slot_mapping, rope_dim, is_neox, layout
    )


def rms_norm_rope_mla_cache_write(
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
) -> torch.Tensor:
    """The kv-only chain's reference: rms_norm, cast to ``out_dtype`` (None: keep x's dtype),
    rope, write the rotated rows; returns them."""
    y = rms_norm(x, weight, eps)
    if out_dtype is not None:
        y = y.to(out_dtype)
    kv_rot = rope(positions, y, cos_sin_cache, rope_dim, is_neox)
    mla_cache_write(kv_rot, kv_cache, slot_mapping, layout)
    return kv_rot


def dequant_cache(kv_cache: torch.Tensor, block_ids: torch.Tensor, layout: str) -> torch.Tensor:
    """Decode the blocks ``block_ids`` [n] -> [n·bs, head_dim] (bf16 for dsv4_fp8)."""
    nb, bs, row = kv_cache.shape
    blocks = block_rows(kv_cache)[block_ids.long()]  # [n, bs·row], copies only these blocks
    n = blocks.shape[0]
    if layout == "bf16":
        return blocks.reshape(n * bs, row)
    assert row == DSV4_SLOT_BYTES
    data = blocks[:, : bs * DSV4_DATA_BYTES].reshape(n * bs, DSV4_DATA_BYTES)
    scales = blocks[:, bs * DSV4_DATA_BYTES :].reshape(n * bs, DSV4_SCALE_BYTES)
    return decode_dsv4(data, scales)


def cast_fp8_like_compiled(y: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """``y.to(fp8_dtype)`` as Inductor-compiled code computes it (measured, README "Numerics").

    e4m3fn: saturates to ±448 (inf → ±448, NaN stays NaN) on CUDA and CPU, so clamp first (CUDA
    *eager* would give NaN from 464 up). e4m3fnuz: compiled CPU code gives NaN for |y| ≥ 248 (its
    max is 240) exactly like eager CPU; Triton on sm_90 cannot emit it, so the plain cast is kept.
    """
    if fp8_dtype == torch.float8_e4m3fn:
        fmax = fp8_max(fp8_dtype)
        return y.float().clamp(-fmax, fmax).to(fp8_dtype)
    return y.to(fp8_dtype)


def dequant_cache_fp8(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, layout: str, fp8_dtype: torch.dtype
) -> torch.Tensor:
    """dequant_cache → cast to ``fp8_dtype`` with compiled-code overflow behaviour."""
    return cast_fp8_like_compiled(dequant_cache(kv_cache, block_ids, layout), fp8_dtype)
