"""Inputs of the rope → cache-write tests (shared by the pass-family, pass-behaviour and
source-spelling tests): a fused q|kv projection, positions, a rope table, a cache whose bytes
the write must leave alone outside its slots, and slots with a skipped (-1) entry."""

from __future__ import annotations

import torch

import fusion_ops


def target_cache(layout: str, g: torch.Generator) -> torch.Tensor:
    """3 blocks × 4 slots of random bytes (values), which the write must leave alone outside
    its slots."""
    if layout == "dsv4_fp8":
        cache = fusion_ops.alloc_mla_cache(3, 4)
        return cache.random_(0, 256, generator=g)
    return torch.randn(3, 4, 512, generator=g).to(torch.bfloat16)


def rope_case(layout: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t, heads = 6, 2
    proj = torch.randn(t, heads * 512 + 512, generator=g).to(torch.bfloat16)
    cos_sin = torch.randn(32, 64, generator=g)
    cache = target_cache(layout, g)
    positions = torch.randint(0, 32, (t,), generator=g)
    slots = torch.tensor([7, -1, 0, 11, 3, 5])
    return proj, positions, cos_sin, cache, slots
