"""Number formats and the DeepSeek-V4 KV-cache byte layout (constants only, no torch ops).

DeepSeek-V4 cache slot, layout ``dsv4_fp8`` (vLLM 0.33.0's fp8_ds_mla): 584 bytes per
token = 448 B FP8 e4m3fn NoPE (latent dims 0..447, seven 64-wide tiles) + 128 B bf16 RoPE (dims
448..511) + 8 B UE8M0 scales (tiles 0..6, then one pad byte written 0). Not interleaved per token:
a block of ``bs`` tokens holds the 576 data bytes of every token first, then the 8 scale bytes of
every token::

    [t·576, t·576 + 448)          token t NoPE, e4m3fn (tile k = bytes 64k .. 64k+63)
    [t·576 + 448, t·576 + 576)    token t RoPE, 64 × bf16 (little-endian)
    [bs·576 + t·8, +7)            token t scale bytes of tiles 0..6
    bs·576 + t·8 + 7              pad (0)

In this package a ``dsv4_fp8`` cache is a uint8 tensor ``[num_blocks, block_size, 584]`` whose
block ``b`` is read as the flat byte string ``kv_cache[b].view(-1)`` (so ``[b, t, :]`` is NOT token
t's slot). Blocks must be contiguous inside; the block stride may be larger than
``block_size·584`` (vLLM pads a 64-token block from 37376 to 37440 bytes):
:func:`fusion_ops.alloc_mla_cache` allocates either form.

Layout ``bf16`` stores the head vector as is (DeepSeek-V2/V3 style): ``[num_blocks, block_size,
head_dim]`` of the vector's dtype, token ``t`` of block ``b`` at ``[b, t, :]``.
"""

from __future__ import annotations

import functools

import torch

# --- MX formats (OCP Microscaling) -------------------------------------------------------------
MX_BLOCK = 32
E8M0_NAN = 255
# E2M1 magnitudes of codes 0..7 and the rounding midpoints between them (ties go up: away from 0)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

# --- FP8 ---------------------------------------------------------------------------------------
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


@functools.cache
def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value: 448 for e4m3fn, 240 for e4m3fnuz."""
    return float(torch.finfo(dtype).max)


@functools.cache
def fp8_min_scale(dtype: torch.dtype) -> float:
    """Lower bound of a dynamic FP8 scale: 1 / (FP8_MAX · 512) (vLLM's rule)."""
    return 1.0 / (fp8_max(dtype) * 512.0)


# --- DeepSeek-V4 cache slot --------------------------------------------------------------------
DSV4_HEAD_DIM = 512
DSV4_NOPE_DIM = 448
DSV4_ROPE_DIM = 64
DSV4_TILE = 64
DSV4_TILES = DSV4_NOPE_DIM // DSV4_TILE  # 7
DSV4_DATA_BYTES = DSV4_NOPE_DIM + 2 * DSV4_ROPE_DIM  # 576
DSV4_SCALE_BYTES = 8
DSV4_SLOT_BYTES = DSV4_DATA_BYTES + DSV4_SCALE_BYTES  # 584
DSV4_TILE_AMAX_FLOOR = 1e-4  # tile amax floor ⇒ smallest exponent −22 (scale byte 105)
DSV4_FP8 = torch.float8_e4m3fn

CACHE_LAYOUTS = ("dsv4_fp8", "bf16")


def dsv4_padded_block_bytes(block_size: int) -> int:
    """vLLM's block stride: block_size·584 rounded up to a multiple of 576 (64 tokens → 37440)."""
    return -(-block_size * DSV4_SLOT_BYTES // DSV4_DATA_BYTES) * DSV4_DATA_BYTES
