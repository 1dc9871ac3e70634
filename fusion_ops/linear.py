"""Our activation quant in front of a model's linears, torchao-style: ``quantize_(model, config)``.

    from fusion_ops.linear import ActQuantConfig, quantize_
    quantize_(model, ActQuantConfig("fp8_group"))           # every nn.Linear, in place
    model = torch.compile(model, options={"post_grad_custom_post_pass": FusionPass(...)})

Each selected ``nn.Linear`` becomes an :class:`ActQuantLinear`: the standalone quant op of the
scheme (``torch.ops.fusion_ops.<scheme>_quant``, what the fusion passes fuse with the norm in
front of it), then the GEMM on the quantized activation:

* ``torch._scaled_mm`` where the GPU has a kernel for the scheme (CUDA, compute capability
  ≥ 8.9, ``float8_e4m3fn``): FP8 per token × FP8 per output channel (row-wise), FP8 1×128
  groups × 128×128 weight blocks (DeepSeek's block FP8; needs K and N divisible by 128). The
  weight is quantized once, here, and stored as FP8 with its scales.
* otherwise (CPU; MXFP4/MXFP8, which have no GEMM before Blackwell; ``float8_e4m3fnuz``): the
  activation is dequantized (:func:`dequantize`) and multiplied with the weight as it was.

The quant op's codes are the same either way; only the GEMM differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import library  # noqa: F401  (defines torch.ops.fusion_ops)
from .formats import FP4_VALUES, MX_BLOCK
from .schemes import SCHEMES

ops = torch.ops.fusion_ops
#: the weight block of block-wise FP8 GEMMs (activation groups of 1×WEIGHT_BLOCK)
WEIGHT_BLOCK = 128
#: block-wise FP8 GEMMs run on at least this many rows (fewer are padded with zero codes)
MIN_BLOCKWISE_ROWS = 16
#: ... and on a multiple of this many rows (their column-major scales stay 16-byte aligned)
BLOCKWISE_ROW_MULTIPLE = 4


@dataclass(frozen=True)
class ActQuantConfig:
    """Which activation quant the linears get.

    Args:
        scheme: ``mxfp4``, ``mxfp8``, ``fp8_per_token`` or ``fp8_group``.
        group_size: FP8 group size (``fp8_group``; 128 is DeepSeek's and the block GEMM's).
        use_ue8m0: FP8 scales rounded up to powers of two.
        fp8_dtype: ``torch.float8_e4m3fn`` (NVIDIA, MI355X) or ``torch.float8_e4m3fnuz`` (MI300).
    """

    scheme: str
    group_size: int = 128
    use_ue8m0: bool = False
    fp8_dtype: torch.dtype = torch.float8_e4m3fn

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(
                f"ActQuantConfig: scheme {self.scheme!r}; expected one of {list(SCHEMES)}"
            )
        if self.fp8_dtype not in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
            raise ValueError(
                f"ActQuantConfig: fp8_dtype {self.fp8_dtype}; expected torch.float8_e4m3fn or "
                "torch.float8_e4m3fnuz"
            )

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The standalone quant op of the scheme on ``x`` [..., K]."""
        if self.scheme in ("mxfp4", "mxfp8"):
            return getattr(ops, f"{self.scheme}_quant")(x)
        if self.scheme == "fp8_group":
            return ops.fp8_group_quant(x, self.group_size, self.use_ue8m0, self.fp8_dtype)
        return ops.fp8_per_token_quant(x, self.use_ue8m0, self.fp8_dtype)


def dequantize(
    q: torch.Tensor, s: torch.Tensor, scheme: str, dtype: torch.dtype, group_size: int = 128
) -> torch.Tensor:
    """The inverse of a quant op in plain torch: codes × scales, rounded to ``dtype``."""
    if scheme == "fp8_per_token":
        return (q.float() * s).to(dtype)
    if scheme == "fp8_group":
        k = q.shape[-1]
        blocks = q.float().unflatten(-1, (k // group_size, group_size)) * s.unsqueeze(-1)
        return blocks.flatten(-2).to(dtype)
    scale = torch.exp2(s.float() - 127).unsqueeze(-1)  # E8M0 per 32 values
    if scheme == "mxfp8":
        vals = q.float()
    else:  # mxfp4: two E2M1 codes per byte, even element in the low nibble
        codes = torch.stack((q & 0xF, q >> 4), dim=-1).flatten(-2).long()
        lut = torch.tensor(FP4_VALUES, device=q.device)
        vals = lut[codes & 7] * (1 - 2 * (codes >> 3)).float()
    k = vals.shape[-1]
    return (vals.unflatten(-1, (k // MX_BLOCK, MX_BLOCK)) * scale).flatten(-2).to(dtype)


def scaled_mm_kind(config: ActQuantConfig, weight: torch.Tensor) -> str | None:
    """``"rowwise"``/``"blockwise"``: the ``torch._scaled_mm`` this weight and scheme get; None:
    dequantize the activation instead (no kernel for the scheme or device)."""
    if weight.device.type != "cuda" or config.fp8_dtype != torch.float8_e4m3fn:
        return None
    if torch.version.hip is not None or torch.cuda.get_device_capability(weight.device) < (8, 9):
        return None
    n, k = weight.shape
    if config.scheme == "fp8_per_token" and not config.use_ue8m0:
        return "rowwise" if k % 16 == 0 and n % 16 == 0 else None
    if config.scheme == "fp8_group" and config.group_size == WEIGHT_BLOCK:
        blocks = k % WEIGHT_BLOCK == 0 and n % WEIGHT_BLOCK == 0
        return "blockwise" if blocks else None
    return None


def grouped_kind(config: ActQuantConfig, device: torch.device) -> str | None:
    """``"rowwise"``: the experts' GEMM of this scheme runs as ``torch._scaled_grouped_mm`` (FP8
    per token × FP8 per output channel, Hopper and later); None: dequantize the activation and
    run ``torch._grouped_mm`` in bf16 (no grouped kernel for 1×128 groups or MX scales)."""
    if device.type != "cuda" or config.fp8_dtype != torch.float8_e4m3fn:
        return None
    if torch.version.hip is not None or torch.cuda.get_device_capability(device) < (9, 0):
        return None
    return "rowwise" if config.scheme == "fp8_per_token" and not config.use_ue8m0 else None


def quantize_weight(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3fn codes of ``weight`` [..., N, K] and their fp32 scales: ``rowwise`` one per
    output channel, [..., N]; ``blockwise`` one per 128×128 block, [..., N/128, K/128]."""
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    wf = weight.float()
    if kind == "rowwise":
        scale = wf.abs().amax(-1).clamp_min(1e-12) / fp8_max  # [..., N]
        return (wf / scale.unsqueeze(-1)).to(torch.float8_e4m3fn), scale
    *lead, n, k = wf.shape
    blocks = wf.reshape(*lead, n // WEIGHT_BLOCK, WEIGHT_BLOCK, k // WEIGHT_BLOCK, WEIGHT_BLOCK)
    scale = blocks.abs().amax((-3, -1)).clamp_min(1e-12) / fp8_max  # [..., N/128, K/128]
    full = scale.repeat_interleave(WEIGHT_BLOCK, -2).repeat_interleave(WEIGHT_BLOCK, -1)
    return (wf / full).to(torch.float8_e4m3fn), scale


def scaled_mm(
    q: torch.Tensor,
    s: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    kind: str,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch._scaled_mm`` of the quantized activation (codes ``q`` [..., K], scales ``s``) and
    a weight from :func:`quantize_weight` [N, K] → [..., N] in ``out_dtype``."""
    lead, n = q.shape[:-1], weight_fp8.shape[0]
    q2, s2 = q.reshape(-1, q.shape[-1]), s.reshape(-1, s.shape[-1])
    rows = q2.shape[0]
    if kind == "rowwise":
        sa, sb = s2.contiguous(), weight_scale.view(1, n)  # [M, 1], [1, N]
    else:  # block-wise: activation scales column-major, weight scales transposed
        # cuBLAS (torch 2.11, H200) has no block-wise kernel under 16 rows, nor for a row count
        # that is not a multiple of 4 (the column-major scales' columns must be 16-byte
        # aligned): CUBLAS_STATUS_NOT_SUPPORTED. Pad with rows of zero codes.
        pad = (
            max(MIN_BLOCKWISE_ROWS, -(-rows // BLOCKWISE_ROW_MULTIPLE) * BLOCKWISE_ROW_MULTIPLE)
            - rows
        )
        q2 = nn.functional.pad(q2.view(torch.uint8), (0, 0, 0, pad)).view(q2.dtype)
        sa = nn.functional.pad(s2, (0, 0, 0, pad), value=1.0).t().contiguous().t()
        sb = weight_scale.t()
    y = torch._scaled_mm(q2, weight_fp8.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=out_dtype)
    return y[:rows].reshape(*lead, n)


def scaled_grouped_mm(
    q: torch.Tensor,
    s: torch.Tensor,
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Rows of ``q`` [M, K] (per-token scales ``s`` [M, 1]) grouped by expert (``offs``: int32
    cumulative ends) times each expert's row-wise FP8 weight [E, N, K] (scales [E, N])."""
    return torch._scaled_grouped_mm(
        q,
        weight_fp8.transpose(-2, -1),
        scale_a=s.reshape(-1).contiguous(),
        scale_b=weight_scale,
        offs=offs,
        out_dtype=out_dtype,
    )


class ActQuantLinear(nn.Module):
    """``y = x Wᵀ + b`` with x quantized by our quant op first (:mod:`fusion_ops.linear`)."""

    def __init__(self, linear: nn.Linear, config: ActQuantConfig) -> None:
        super().__init__()
        self.config = config
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)
        self.kind = scaled_mm_kind(config, weight)
        if self.kind is None:
            self.weight = nn.Parameter(weight, requires_grad=False)
            return
        codes, scale = quantize_weight(weight, self.kind)
        self.register_buffer("weight_fp8", codes)
        self.register_buffer("weight_scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s = self.config.quantize(x)
        if self.kind is None:
            xd = dequantize(q, s, self.config.scheme, x.dtype, self.config.group_size)
            return nn.functional.linear(xd, self.weight, self.bias)
        return scaled_mm(q, s, self.weight_fp8, self.weight_scale, self.kind, x.dtype, self.bias)

    def extra_repr(self) -> str:
        gemm = f"torch._scaled_mm {self.kind}" if self.kind else "dequantized activation"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scheme={self.config.scheme}, gemm={gemm}"
        )


def quantize_(
    model: nn.Module,
    config: ActQuantConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` for which ``filter_fn(module, fqn)``
    is true (default: all whose in_features the scheme can quantize) by an
    :class:`ActQuantLinear`; returns ``model`` (torchao's ``quantize_`` convention)."""

    def default_filter(module: nn.Module, fqn: str) -> bool:
        k = module.in_features
        return k % (config.group_size if config.scheme == "fp8_group" else MX_BLOCK) == 0 or (
            config.scheme == "fp8_per_token"
        )

    keep = filter_fn or default_filter
    for fqn, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            child_fqn = f"{fqn}.{name}" if fqn else name
            if type(child) is nn.Linear and keep(child, child_fqn):
                setattr(module, name, ActQuantLinear(child, config))
    return model
