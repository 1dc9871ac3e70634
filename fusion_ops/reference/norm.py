"""Reference RMSNorm and fused-add RMSNorm (fp32 math, one rounding to x.dtype by default).

Two optional numerics reproduce other libraries' rounding points exactly (vLLM IR's
``rms_norm`` / ``fused_add_rms_norm``, vLLM's vllm/ir/ops/layernorm.py):

* ``weight_after_rounding``: the normed value is rounded to the weight's dtype, multiplied by
  the weight in that dtype, then rounded to x's dtype (``(n.to(w.dtype) * w).to(x.dtype)``).
  With an fp32 weight this is the default's single rounding.
* ``norm_unrounded_sum`` (add only): the norm reads the fp32 sum ``x + residual`` itself, not
  its rounding to x's dtype (``residual_out`` is rounded either way).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class NormNumerics(NamedTuple):
    """The trailing flags of a fused norm+quant op, after its scheme parameters."""

    return_normed: bool = False
    weight_after_rounding: bool = False
    norm_unrounded_sum: bool = False  # fused-add ops only


def split_fused_params(p: tuple[Any, ...], add: bool) -> tuple[tuple[Any, ...], NormNumerics]:
    """``(*scheme_params, *flags)`` of a fused norm+quant op → (scheme_params, NormNumerics)."""
    n_flags = 3 if add else 2
    return tuple(p[:-n_flags]), NormNumerics(*p[-n_flags:])


def _normalize(
    xf: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype, after: bool
) -> torch.Tensor:
    n = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if after:
        return (n.to(weight.dtype) * weight).to(dtype)
    return (n * weight.float()).to(dtype)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, weight_after_rounding: bool = False
) -> torch.Tensor:
    """y = (x · rsqrt(mean(x²) + eps)) · weight, computed in fp32, rounded once to x.dtype."""
    return _normalize(x.float(), weight, eps, x.dtype, weight_after_rounding)


def weightless_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x · rsqrt(mean(x²) + eps) over the last dim, no weight (DeepSeek-V4's per-head q
    norm), computed in fp32, rounded once to x.dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    weight_after_rounding: bool = False,
    norm_unrounded_sum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual_out = round_to_x_dtype(x + residual) (fp32 add); y = rms_norm(residual_out)."""
    total = x.float() + residual.float()
    residual_out = total.to(x.dtype)
    normed_input = total if norm_unrounded_sum else residual_out.float()
    return _normalize(normed_input, weight, eps, x.dtype, weight_after_rounding), residual_out


def q_kv_rms_norm(
    q: torch.Tensor,
    q_weight: torch.Tensor,
    q_eps: float,
    kv: torch.Tensor,
    kv_weight: torch.Tensor,
    kv_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent RMSNorms (the q_kv_norm fused op's definition): each is :func:`rms_norm`."""
    return rms_norm(q, q_weight, q_eps), rms_norm(kv, kv_weight, kv_eps)
