"""Building blocks: quantized linears, RoPE tables, hyper-connections.

Every quantized GEMM's activation goes through the real ``fusion_ops`` quant op (the op the
fusion passes see). The GEMM after it is either emulated (``gemm="emulated"``, the definition:
the codes dequantized in plain torch, multiplied with bf16 weights) or, after
:meth:`QuantLinear.to_native`, what a server runs: FP8 weights and ``torch._scaled_mm`` where the
device has a kernel for the scheme (:func:`fusion_ops.linear.scaled_mm_kind`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn

import fusion_ops  # noqa: F401  (defines torch.ops.fusion_ops)
from fusion_ops import linear

ops = torch.ops.fusion_ops
GROUP = 128  # FP8 block linears quantize activations per 1x128


def quant_config(scheme: str, fp8_dtype: torch.dtype) -> linear.ActQuantConfig:
    """The model's activation quant of ``scheme``: FP8 groups of 1×128, fp32 (not UE8M0) scales."""
    return linear.ActQuantConfig(scheme, GROUP, False, fp8_dtype)


def quantize(x: torch.Tensor, scheme: str, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The standalone activation quant op of ``scheme`` (what the passes fuse with a norm)."""
    return quant_config(scheme, fp8_dtype).quantize(x)


def dequantize(q: torch.Tensor, s: torch.Tensor, scheme: str, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize` in plain torch (GEMM emulation)."""
    return linear.dequantize(q, s, scheme, dtype, GROUP)


@dataclass(frozen=True)
class TensorParallel:
    """Row-parallel output projections (attention's wo_b, the experts' down projections): rank
    ``rank`` of ``world`` multiplies its slice of the input features, giving a partial sum of
    the output; :meth:`all_reduce` (the functional collective torch.compile traces) sums the
    partials, right before the next add + RMSNorm. Everything else is computed on every rank
    (the weights are the full, seeded ones; each rank reads its slice)."""

    group_name: str
    rank: int
    world: int

    def shard(self, n: int) -> slice:
        if n % self.world:
            raise ValueError(f"TensorParallel: {n} features do not split over {self.world} ranks")
        size = n // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(x, "sum", self.group_name)


class QuantLinear(nn.Module):
    """y = quant(x) · Wᵀ, weight [out, in]: emulated (dequantized codes @ bf16 weight) until
    :meth:`to_native`. With ``tp``: this rank's partial sum over its slice of the input features."""

    def __init__(self, in_features: int, out_features: int, scheme: str, fp8_dtype: torch.dtype):
        super().__init__()
        self.scheme, self.config = scheme, quant_config(scheme, fp8_dtype)
        self.kind: str | None = None  # the torch._scaled_mm in use (None: emulated)
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def to_native(self, tp: TensorParallel | None = None) -> None:
        """Store the weight as FP8 (this rank's slice of its input features with ``tp``) for the
        device's ``torch._scaled_mm``, if it has one for the scheme; else stay emulated."""
        self.kind = linear.scaled_mm_kind(self.config, self.weight)
        if self.kind is None:
            return
        weight = self.weight if tp is None else self.weight[:, tp.shard(self.weight.shape[1])]
        codes, scale = linear.quantize_weight(weight, self.kind)
        del self.weight
        self.register_buffer("weight_fp8", codes)
        self.register_buffer("weight_scale", scale)

    def forward(self, x: torch.Tensor, tp: TensorParallel | None = None) -> torch.Tensor:
        return self.forward_quantized(*self.config.quantize(x), x.dtype, tp)

    def forward_quantized(
        self,
        q: torch.Tensor,
        s: torch.Tensor,
        dtype: torch.dtype,
        tp: TensorParallel | None = None,
    ) -> torch.Tensor:
        """The GEMM on an already quantized activation (codes ``q``, scales ``s``)."""
        if self.kind is None:
            xq = dequantize(q, s, self.scheme, dtype)
            if tp is None:
                return xq @ self.weight.t()
            cols = tp.shard(xq.shape[-1])
            return xq[..., cols] @ self.weight[:, cols].t()
        if tp is not None:  # this rank's columns of the codes, and their scales
            cols = tp.shard(q.shape[-1])
            q = q[..., cols].contiguous()
            if self.kind == "blockwise":
                s = s[..., cols.start // GROUP : cols.stop // GROUP]
        return linear.scaled_mm(q, s, self.weight_fp8, self.weight_scale, self.kind, dtype)


def rope_table(max_pos: int, rope_dim: int, theta: float) -> torch.Tensor:
    """cos_sin_cache [max_pos, rope_dim] = [cos | sin], fp32 (plain RoPE; YaRN omitted)."""
    inv_freq = theta ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=1).float()


def weightless_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


class HyperConnection(nn.Module):
    """mHC seam: mixes the 4 residual streams into a layer input and back (fp32 math).

    pre  = sigmoid(mix[0:4]·s0 + b) + hc_eps        layer_in = Σ_i pre_i · R_i
    post = 2·sigmoid(mix[4:8]·s1 + b)                R' = post · out + combᵀ · R
    comb = sinkhorn(softmax(mix[8:24]·s2 + b) + eps) (alternating column/row normalisation)
    where mix = (flatten(R) @ fnᵀ) · rsqrt(mean(flatten(R)²) + eps).
    """

    def __init__(self, hidden: int, mult: int, iters: int, eps: float) -> None:
        super().__init__()
        self.mult, self.iters, self.eps = mult, iters, eps
        n_mix = 2 * mult + mult * mult
        self.fn = nn.Parameter(torch.empty(n_mix, mult * hidden), requires_grad=False)
        self.base = nn.Parameter(torch.zeros(n_mix), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(3), requires_grad=False)

    def pre(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.mult
        flat = streams.flatten(1).float()  # [T, m·D]
        mix = (flat @ self.fn.t()) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.eps)
        pre = torch.sigmoid(mix[:, :m] * self.scale[0] + self.base[:m]) + self.eps
        post = 2.0 * torch.sigmoid(mix[:, m : 2 * m] * self.scale[1] + self.base[m : 2 * m])
        logits = mix[:, 2 * m :].unflatten(1, (m, m)) * self.scale[2] + self.base[2 * m :].view(
            m, m
        )
        comb = torch.softmax(logits, dim=-1) + self.eps
        for _ in range(self.iters):
            comb = comb / comb.sum(-2, keepdim=True)
            comb = comb / comb.sum(-1, keepdim=True)
        layer_in = (pre.unsqueeze(-1) * streams.float()).sum(1).to(streams.dtype)
        return layer_in, post, comb

    def post(
        self, out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
    ) -> torch.Tensor:
        mixed = torch.einsum("tij,tid->tjd", comb, streams.float())
        return (post.unsqueeze(-1) * out.float().unsqueeze(1) + mixed).to(streams.dtype)


def init_(
    params: Iterable[tuple[str, nn.Parameter]],
    generator: torch.Generator,
    dtype_of: Callable[[str], torch.dtype],
) -> None:
    """Seeded random weights, in the order given: N(0, 1/fan_in) for matrices, 1 ± 0.1 for norm
    weights; each drawn in fp32 and stored as ``dtype_of(name)`` at once (one fp32 copy at a
    time)."""
    for name, p in params:
        if name.endswith("norm_weight"):
            p.data = 1 + 0.1 * torch.randn(p.shape, generator=generator)
        elif p.dim() >= 2:
            p.data = torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1])
        elif name.endswith(("base", "bias", "ape")):
            p.data = 0.1 * torch.randn(p.shape, generator=generator)
        elif name.endswith("sink"):
            p.data = torch.randn(p.shape, generator=generator)
        p.data = p.data.to(dtype_of(name))
