"""Reference activation quantizers (pure torch, any device). They define the package's numerics.

All math is fp32 on the input upcast; the last dim K is quantized in blocks (MX: 32, group: g,
per-token: K). NaN/inf behaviour is part of the contract (README, "Numerics"):

* MXFP4: a block holding NaN gets scale byte 0xFF (E8M0 NaN: the block decodes to NaN); its codes
  are 0 (0x8 where the sign bit is set). An inf amax gives u = 127 (byte 254), inf elements
  saturate to ±6.
* MXFP8: NaN block → byte 0xFF, NaN elements stay NaN; inf → byte 254, inf elements clamp to ±448.
* FP8 per-token / per-group: a NaN in the row/group makes its scale and values NaN; an inf makes
  the scale inf, inf/inf elements NaN and finite elements 0.
"""

from __future__ import annotations

import torch

from ..formats import E8M0_NAN, FP4_MIDPOINTS, MX_BLOCK, fp8_max, fp8_min_scale
from .numerics import ceil_log2, ceil_log2_ratio, exponent_field, pow2

_AMAX_ROUND_ADD = 0x200000  # AITER/Quark "even" rounding of amax to 1 mantissa bit, half up
_EXP_MASK = -0x800000  # 0xFF800000 as int32: keep sign and exponent


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)


def mxfp4_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (packed uint8 [..., K/2], e8m0 uint8 [..., K/32]); AITER's exact rule.

    amax bits + 0x200000 masked to the exponent; u = floor(log2) − 2 in [−127, 127]; byte u + 127;
    elements x·2^−u rounded to nearest E2M1 (ties away from zero, saturating at 6); element 2j in
    the low nibble of byte j.
    """
    xb = _blocks(x, MX_BLOCK)  # [..., K/32, 32]
    amax = xb.abs().amax(-1)  # NaN propagates
    is_nan = amax.isnan()
    rounded_bits = (amax.view(torch.int32) + _AMAX_ROUND_ADD) & _EXP_MASK
    field = exponent_field(rounded_bits.view(torch.float32))
    u = torch.where(field == 255, 127, (field - 127 - 2).clamp(-127, 127))  # inf or NaN → 127
    scale = torch.where(is_nan, E8M0_NAN, u + 127).to(torch.uint8)

    q = xb * pow2(-u).unsqueeze(-1)
    mag = q.abs()
    code = torch.zeros_like(q, dtype=torch.uint8)
    for midpoint in FP4_MIDPOINTS:  # NaN compares false everywhere → code 0
        code += (mag >= midpoint).to(torch.uint8)
    code = torch.where(is_nan.unsqueeze(-1), 0, code)  # a NaN block keeps only the signs
    code |= torch.signbit(q).to(torch.uint8) << 3
    code = code.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    packed = code[..., 0] | (code[..., 1] << 4)
    return packed, scale


def mxfp8_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3fn [..., K], e8m0 uint8 [..., K/32]).

    byte = clamp(ceil(log2(max(amax, FLT_MIN) / 448)) + 127, 0, 254) (the ceiling taken exactly);
    elements e4m3fn(clamp(x · 2^−(byte−127), ±448)), round to nearest even.
    """
    xb = _blocks(x, MX_BLOCK)
    amax = xb.abs().amax(-1)
    finite = amax.isfinite()
    safe = torch.where(finite, amax.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
    e = ceil_log2_ratio(safe, fp8_max(torch.float8_e4m3fn))
    byte = torch.where(finite, (e + 127).clamp(0, 254), 254)
    byte = torch.where(amax.isnan(), E8M0_NAN, byte)
    exp = torch.where(byte == E8M0_NAN, 127, byte - 127)
    q = (xb * pow2(-exp).unsqueeze(-1)).clamp(-448.0, 448.0)
    return q.reshape(x.shape).to(torch.float8_e4m3fn), byte.to(torch.uint8)


def _fp8_scaled(
    xg: torch.Tensor, use_ue8m0: bool, fp8_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """xg [..., G, g] fp32 -> (fp8 [..., G, g], scale fp32 [..., G])."""
    fmax = fp8_max(fp8_dtype)
    amax = xg.abs().amax(-1)
    # divide by a same-device tensor: a Python-scalar divisor takes PyTorch's reciprocal-multiply
    # path on CUDA (amax · (1/448)), which is not the correctly rounded quotient
    s = torch.maximum(
        amax / torch.full_like(amax, fmax), torch.full_like(amax, fp8_min_scale(fp8_dtype))
    )
    if use_ue8m0:
        finite = s.isfinite()
        s = torch.where(finite, pow2(ceil_log2(torch.where(finite, s, 1.0))), s)
    q = (xg / s.unsqueeze(-1)).clamp(-fmax, fmax).to(fp8_dtype)
    return q, s


def fp8_per_token_quant(
    x: torch.Tensor, use_ue8m0: bool, fp8_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (fp8 [..., K], scale fp32 [..., 1]); s = max(amax/FP8_MAX, 1/(FP8_MAX·512)),
    rounded up to a power of two when ``use_ue8m0``; q = fp8(clamp(x/s, ±FP8_MAX))."""
    q, s = _fp8_scaled(x.float().unsqueeze(-2), use_ue8m0, fp8_dtype)
    return q.squeeze(-2), s


def fp8_group_quant(
    x: torch.Tensor, group_size: int, use_ue8m0: bool, fp8_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (fp8 [..., K], scale fp32 [..., K/group_size]); per group."""
    q, s = _fp8_scaled(_blocks(x, group_size), use_ue8m0, fp8_dtype)
    return q.reshape(x.shape), s
