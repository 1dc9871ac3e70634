"""fusion_ops: the standalone and fused ops of fusion-passes, in ``torch.ops.fusion_ops``.

Importing this package defines every op (see :mod:`fusion_ops.library` for the list and
:mod:`fusion_ops.schemes` for the quant schemes). Backends: ``reference`` (torch, any device),
``triton`` (CUDA/ROCm GPUs), ``aiter`` (ROCm with ``import aiter``); selection and override in
:mod:`fusion_ops.backends`.
"""

from __future__ import annotations

import torch

from . import formats
from .backends import last_backend, select_backend, set_backend, use_backend
from .formats import CACHE_LAYOUTS, DSV4_SLOT_BYTES, dsv4_padded_block_bytes
from .library import OP_SCHEMAS, ops
from .schemes import SCHEMES, QuantScheme


def alloc_mla_cache(
    num_blocks: int,
    block_size: int,
    layout: str = "dsv4_fp8",
    head_dim: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    padded: bool = False,
) -> torch.Tensor:
    """A zeroed MLA KV cache in ``layout`` (see :mod:`fusion_ops.formats`).

    ``dsv4_fp8``: uint8 ``[num_blocks, block_size, 584]``; with ``padded=True`` the block stride is
    vLLM's (block_size·584 rounded up to a multiple of 576). ``bf16``: ``[num_blocks, block_size,
    head_dim]`` of ``dtype``.
    """
    if layout == "bf16":
        return torch.zeros(num_blocks, block_size, head_dim, dtype=dtype, device=device)
    if layout != "dsv4_fp8":
        raise ValueError(f"alloc_mla_cache: layout {layout!r}; expected one of {CACHE_LAYOUTS}")
    stride = dsv4_padded_block_bytes(block_size) if padded else block_size * DSV4_SLOT_BYTES
    base = torch.zeros(num_blocks, stride, dtype=torch.uint8, device=device)
    return base.as_strided((num_blocks, block_size, DSV4_SLOT_BYTES), (stride, DSV4_SLOT_BYTES, 1))


__all__ = [
    "CACHE_LAYOUTS",
    "OP_SCHEMAS",
    "SCHEMES",
    "QuantScheme",
    "alloc_mla_cache",
    "formats",
    "last_backend",
    "ops",
    "select_backend",
    "set_backend",
    "use_backend",
]
