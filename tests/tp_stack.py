"""The tensor-parallel stack the TP tests compile (CPU gloo and 2-GPU NCCL alike): row-parallel
GEMMs, each followed by a functional all-reduce, add + RMSNorm and a quant, with the matches
the pass must report derived from how the stack is built."""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

from dsv4_model.layers import dequantize
from patterns.ar_add_rms_quant import NAME

ops = torch.ops.fusion_ops
EPS = 1e-6
HIDDEN = 256
FN = torch.float8_e4m3fn

# the TP stack below: one row-parallel GEMM + all-reduce + add-norm per entry; the quant that
# reads the norm (None: none), and whether the normed value has another user (a router GEMM)
STACK: list[tuple[str | None, bool]] = [
    ("mxfp4", False),
    ("fp8_group", False),
    ("mxfp8", True),
    (None, False),  # the final norm: no quant
]


def _quant(x: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    if scheme == "fp8_group":
        return ops.fp8_group_quant(x, 128, False, FN)
    return getattr(ops, f"{scheme}_quant")(x)


def tp_stack(x, residual, weights, norm_w, router, group_name):  # type: ignore[no-untyped-def]
    """Each layer: x_shard @ W_shardᵀ (a partial sum) → all-reduce → add + RMSNorm → quant, the
    next layer's input the dequantized activation (GEMM emulation)."""
    outs = []
    for (scheme, routed), w in zip(STACK, weights, strict=True):
        partial = x @ w.t()
        reduced = funcol.all_reduce(partial, "sum", group_name)
        normed, residual = ops.fused_add_rms_norm(reduced, residual, norm_w, EPS)
        if scheme is None:
            outs.append(normed)
            continue
        q, s = _quant(normed, scheme)
        outs += [q, s]
        if routed:
            outs.append(normed @ router.t())
        x = dequantize(q, s, scheme, normed.dtype)
    return (*outs, residual)


def expected_matches(dtype: str = "bf16") -> dict[str, int]:
    out: dict[str, int] = {}
    for scheme, routed in STACK:
        if scheme is None:
            label = "ar_add_rms"
        else:
            label = "fp8_group128_e4m3fn" if scheme == "fp8_group" else scheme
            label += "+normed" if routed else ""
        key = f"{NAME}/{label}/{dtype}"
        out[key] = out.get(key, 0) + 1
    return out


def inputs(rank: int, tokens: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    shared = torch.Generator().manual_seed(7)  # residual and norm weight: same on every rank
    x = torch.randn(tokens, HIDDEN, generator=g).to(torch.bfloat16)
    weights = [(torch.randn(HIDDEN, HIDDEN, generator=g) / 16).to(torch.bfloat16) for _ in STACK]
    residual = torch.randn(tokens, HIDDEN, generator=shared).to(torch.bfloat16)
    norm_w = (1 + 0.1 * torch.randn(HIDDEN, generator=shared)).to(torch.bfloat16)
    router = torch.randn(8, HIDDEN, generator=shared).to(torch.bfloat16)
    return x, residual, weights, norm_w, router
