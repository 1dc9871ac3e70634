"""Inputs and comparisons shared by the GPU kernel tests: activations with special values,
the scheme parameter grid, and a bitwise comparison that ignores NaN payloads."""

from __future__ import annotations

import torch

FN = torch.float8_e4m3fn
DEV = "cuda"
EPS = 1e-6


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
    return t.view(ints[t.element_size()]) if t.dtype.is_floating_point else t


def assert_same(a, b, name: str) -> None:
    if isinstance(a, (tuple, list)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{name}[{i}]")
        return
    assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
    differ = bits(a) != bits(b)
    if a.dtype.is_floating_point:  # NaN payload/sign is not part of the contract
        differ &= ~(a.float().isnan() & b.float().isnan())
    diff = differ.sum().item()
    assert diff == 0, f"{name}: {diff} of {a.numel()} elements differ"


def activations(tokens: int, k: int, dtype: torch.dtype, seed: int, specials: bool = True):
    g = torch.Generator(device=DEV).manual_seed(seed)
    spread = torch.logspace(-4, 4, k, device=DEV)[torch.randperm(k, device=DEV, generator=g)]
    x = (torch.randn(tokens, k, device=DEV, generator=g) * spread).to(dtype)
    if specials and tokens >= 4:
        x[0, :32] = 0.0
        x[1, 3] = float("nan")
        x[2, 70] = float("inf")
        x[3, 5] = -float("inf")
        x[3, 64:96] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4, device=DEV)
    return x


SCHEME_PARAMS = [
    ("mxfp4", ()),
    ("mxfp8", ()),
    ("fp8_per_token", (False, FN)),
    ("fp8_per_token", (True, FN)),
    ("fp8_group", (128, False, FN)),
    ("fp8_group", (128, True, FN)),
    ("fp8_group", (64, False, FN)),
]
