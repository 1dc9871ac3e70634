"""DeepSeek-V4 configuration and presets (dims as vLLM 0.33.0's vllm/models/deepseek_v4 reads
them from the model config)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

LAYER_KINDS = {1: "swa", 4: "csa", 128: "hca"}  # compress ratio -> layer kind
ACT_QUANTS = ("mxfp4", "mxfp8", "fp8_group", "fp8_per_token")
GEMMS = ("emulated", "native")


@dataclass(frozen=True)
class DSV4Config:
    name: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    compress_ratios: tuple[int, ...]  # per layer: 1 sliding-window only, 4 CSA, 128 HCA
    n_routed_experts: int
    n_activated_experts: int
    moe_inter_size: int
    routed_scaling_factor: float
    head_dim: int = 512
    rope_dim: int = 64  # the last 64 of the 512 latent dims
    window: int = 128
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    max_position: int = 4096
    block_size: int = 64  # tokens per KV-cache block (SWA) / entries per block (compressed)
    residual: str = "mhc"  # "mhc" (V4 hyper-connections) or "add" (V3/R1 residual stream)
    # routed + shared expert input quant: mxfp4 | mxfp8 | fp8_group | fp8_per_token
    act_quant: str = "mxfp8"
    linear_quant: str = "fp8_group"  # FP8 1x128 block linears (attention projections, wo_b)
    # GEMMs: "emulated" (the definition: dequantized activation × bf16 weight, dense experts) or
    # "native" (what a server runs: FP8 weights and torch._scaled_mm / _scaled_grouped_mm where
    # the device has the kernel, routed experts through a grouped GEMM; see dsv4_model.layers)
    gemm: str = "emulated"
    fp8_dtype: torch.dtype = torch.float8_e4m3fn  # keys cast for attention; FP8 linears
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.residual not in ("mhc", "add"):
            raise ValueError(f"DSV4Config.residual={self.residual!r}; expected 'mhc' or 'add'")
        if self.act_quant not in ACT_QUANTS:
            raise ValueError(
                f"DSV4Config.act_quant={self.act_quant!r}; expected one of {ACT_QUANTS}"
            )
        if self.gemm not in GEMMS:
            raise ValueError(f"DSV4Config.gemm={self.gemm!r}; expected one of {GEMMS}")
        if self.n_heads % self.o_groups:
            raise ValueError("DSV4Config: n_heads must be a multiple of o_groups")
        if len(self.compress_ratios) != self.n_layers:
            raise ValueError("DSV4Config: compress_ratios needs one entry per layer")
        unknown = set(self.compress_ratios) - set(LAYER_KINDS)
        if unknown:
            raise ValueError(f"DSV4Config: compress ratios {unknown}; expected 1, 4 or 128")

    def layer_kind(self, i: int) -> str:
        return LAYER_KINDS[self.compress_ratios[i]]

    def replace(self, **changes: object) -> DSV4Config:
        return dataclasses.replace(self, **changes)


def _released_ratios(n_layers: int, first: tuple[int, ...]) -> tuple[int, ...]:
    """Released per-layer list: the given first layers, then even → CSA (4), odd → HCA (128)."""
    rest = tuple(4 if i % 2 == 0 else 128 for i in range(len(first), n_layers))
    return (first + rest)[:n_layers]


def tiny(**changes: object) -> DSV4Config:
    """CPU tests: one layer of each kind, real 512 = 448 + 64 heads and 584-byte cache slots."""
    cfg = DSV4Config(
        name="tiny",
        vocab_size=512,
        hidden_size=256,
        n_layers=3,
        n_heads=4,
        q_lora_rank=128,
        o_groups=2,
        o_lora_rank=64,
        compress_ratios=(1, 4, 128),
        n_routed_experts=4,
        n_activated_experts=2,
        moe_inter_size=128,
        routed_scaling_factor=1.5,
        window=16,
        block_size=16,
        max_position=1024,
    )
    return cfg.replace(**changes)


def flash(n_layers: int = 4, **changes: object) -> DSV4Config:
    """V4-Flash dims (hidden 4096, 64 heads, 256 experts), ``n_layers`` of the released list."""
    cfg = DSV4Config(
        name="flash",
        vocab_size=129280,
        hidden_size=4096,
        n_layers=n_layers,
        n_heads=64,
        q_lora_rank=1024,
        o_groups=8,
        o_lora_rank=1024,
        compress_ratios=_released_ratios(n_layers, (1, 1)),
        n_routed_experts=256,
        n_activated_experts=6,
        moe_inter_size=2048,
        routed_scaling_factor=1.5,
    )
    return cfg.replace(**changes)


def pro(n_layers: int = 4, **changes: object) -> DSV4Config:
    """V4-Pro dims (hidden 7168, 128 heads, 384 experts), ``n_layers`` of the released list."""
    cfg = DSV4Config(
        name="pro",
        vocab_size=129280,
        hidden_size=7168,
        n_layers=n_layers,
        n_heads=128,
        q_lora_rank=1536,
        o_groups=16,
        o_lora_rank=1024,
        compress_ratios=_released_ratios(n_layers, (128, 128)),
        n_routed_experts=384,
        n_activated_experts=6,
        moe_inter_size=3072,
        routed_scaling_factor=2.5,
    )
    return cfg.replace(**changes)


PRESETS = {"tiny": tiny, "flash": flash, "pro": pro}
