"""What the launch policy needs to know of the device (read once per device), and row views."""

from __future__ import annotations

import functools
import os

import torch

from .. import launch_policy as policy

IS_HIP = torch.version.hip is not None
FNUZ = torch.float8_e4m3fnuz
PDL_ENV = "FUSION_OPS_PDL"
PREFETCH_ENV = "FUSION_OPS_PDL_PREFETCH_WEIGHT"


@functools.cache
def device_facts(device_index: int) -> policy.DeviceFacts:
    """What the launch policy needs to know of a device, read once per device. PDL: NVIDIA
    sm_90+ only (never on ROCm), unless FUSION_OPS_PDL=0; the weight prefetch: with PDL, unless
    FUSION_OPS_PDL_PREFETCH_WEIGHT=0."""
    pdl = (
        not IS_HIP
        and os.environ.get(PDL_ENV, "1") != "0"
        and _triton_has_pdl()
        and torch.cuda.get_device_capability(device_index)[0] >= 9
    )
    return policy.DeviceFacts(
        hip=IS_HIP,
        pdl=pdl,
        prefetch_weight=pdl and os.environ.get(PREFETCH_ENV, "1") != "0",
        sm_count=torch.cuda.get_device_properties(device_index).multi_processor_count,
    )


def _triton_has_pdl() -> bool:
    """The ``launch_pdl`` option and ``gdc_wait`` exist (Triton 3.4+; 3.6 verified)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [M, K] with a unit last stride (a copy only when needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()
