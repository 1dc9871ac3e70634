"""Exact scalar building blocks of the reference numerics (fp32 tensors in, exact results out).

Exponents are derived from the float's bits (via ``frexp``), never from a ``log2`` whose last-ulp
behaviour differs between libm, CUDA and Triton.
"""

from __future__ import annotations

import math

import torch


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2**e for integer-valued e (any int or float dtype), exactly, as fp32 (e in [-149, 127])."""
    return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e.to(torch.int32))


def ceil_log2(y: torch.Tensor) -> torch.Tensor:
    """ceil(log2(y)) as int32 for finite y > 0 (exact). y = m·2^p, m in [0.5, 1)."""
    m, p = torch.frexp(y.float())
    return torch.where(m == 0.5, p - 1, p).to(torch.int32)


def ceil_log2_ratio(a: torch.Tensor, divisor: float) -> torch.Tensor:
    """ceil(log2(a / divisor)) as int32 for finite a > 0, exact (no rounding of the quotient).

    With a = m·2^p and divisor = md·2^pd (m, md in [0.5, 1)), a/divisor = (m/md)·2^(p−pd) and
    m/md lies in (0.5, 2): the ceiling is p − pd, plus 1 when m > md.
    """
    md, pd = math.frexp(divisor)
    m, p = torch.frexp(a.float())
    return (p - pd + (m > md).to(p.dtype)).to(torch.int32)


def exponent_field(y: torch.Tensor) -> torch.Tensor:
    """The 8-bit biased exponent of fp32 ``y`` (0 for zero/subnormal, 255 for inf/NaN), int32."""
    return (y.float().view(torch.int32) >> 23) & 0xFF
