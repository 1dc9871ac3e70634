"""The ``triton`` backend: launches the kernels of :mod:`.kernels` for CUDA/ROCm tensors.

Imported lazily by :mod:`fusion_ops.backends` the first time an op runs on a GPU tensor.
Inputs are validated by the op layer before they get here. ``float8_e4m3fnuz`` cannot be emitted
by Triton on NVIDIA (sm_90): on CUDA those calls run the reference backend (on the GPU).

Modules: :mod:`.device` (device facts), :mod:`.norms` and :mod:`.rope_cache` (the launchers,
one per op, registered on import), :mod:`.calls` (each kernel's calling convention),
:mod:`.launch` (the cached-binary launcher), :mod:`.all_reduce` (the symmetric-memory
workspace), :mod:`.kernels` (the Triton code).
"""

from __future__ import annotations

from . import norms, rope_cache  # noqa: F401  (register the launchers)
from .device import FNUZ, IS_HIP, device_facts
from .norms import norm_quant, q_kv_norm

__all__ = ["FNUZ", "IS_HIP", "device_facts", "norm_quant", "q_kv_norm"]
