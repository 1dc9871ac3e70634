"""Reference rotary embedding on the last ``rope_dim`` dims of a head vector."""

from __future__ import annotations

import torch


def rope(
    positions: torch.Tensor,
    x: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rope_dim: int,
    is_neox: bool,
) -> torch.Tensor:
    """Rotate x[..., D-rope_dim:] (x [T, ..., D], positions [T]); other dims are copied.

    cos_sin_cache [max_pos, rope_dim] = [cos | sin] (half = rope_dim/2 each). fp32 math,
    one rounding to x.dtype. For pair (a, b) with angle i:
    a' = a·cos_i − b·sin_i,  b' = b·cos_i + a·sin_i.
    GPT-J pairs interleaved dims (2i, 2i+1); NeoX pairs (i, i + half).
    """
    d = x.shape[-1]
    half = rope_dim // 2
    cs = cos_sin_cache[positions.long()].float()  # [T, rope_dim]
    cs = cs.reshape(cs.shape[0], *([1] * (x.dim() - 2)), rope_dim)
    cos, sin = cs[..., :half], cs[..., half:]
    tail = x[..., d - rope_dim :].float()
    if is_neox:
        a, b = tail[..., :half], tail[..., half:]
        rotated = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    else:
        a, b = tail[..., 0::2], tail[..., 1::2]
        rotated = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    out = x.clone(memory_format=torch.contiguous_format)
    out[..., d - rope_dim :] = rotated.to(x.dtype)
    return out
