"""Reference RMSNorm and fused-add RMSNorm (fp32 math, one rounding to x.dtype)."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = (x · rsqrt(mean(x²) + eps)) · weight, computed in fp32, rounded once to x.dtype."""
    xf = x.float()
    inv_rms = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (xf * inv_rms * weight.float()).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual_out = round_to_x_dtype(x + residual) (fp32 add); y = rms_norm(residual_out)."""
    residual_out = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(residual_out, weight, eps), residual_out
