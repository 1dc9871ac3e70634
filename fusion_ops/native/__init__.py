"""C++ CPU kernels of ``rms_norm`` and ``fused_add_rms_norm`` (``norm_cpu.cpp``).

They run the reference math as the same ATen calls in the same order, without the Python
interpreter in the op call: the op costs about what its ATen calls cost (the Python kernel adds
argument filling, validation and backend selection, and ~2 µs per ATen call made from Python).
Bad input and a forced non-reference backend go to the op's Python kernel (registered as the
hidden op ``fusion_ops::_python_<name>``), so messages and ``FUSION_OPS_BACKEND`` /
``use_backend`` / ``last_backend`` behave as before.

The library is built on first import with torch's JIT extension builder (a C++ compiler and
``ninja`` are needed; about 40 s on 2 cores, once) and cached in torch's extension directory
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). ``FUSION_OPS_NATIVE=0`` skips
it; a failed build warns and leaves the Python kernels in place.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

#: the ops with a C++ CPU kernel; the index is the op's number in norm_cpu.cpp's NativeOp
NATIVE_OPS = ("rms_norm", "fused_add_rms_norm")
ENV_VAR = "FUSION_OPS_NATIVE"
_SOURCE = Path(__file__).with_name("norm_cpu.cpp")


def load() -> bool:
    """Build (once) and load the C++ CPU kernels; False when disabled or the build failed."""
    if os.environ.get(ENV_VAR, "1").strip() == "0":
        return False
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name="fusion_ops_native",
            sources=[str(_SOURCE)],
            extra_cflags=["-O2"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, an unsupported platform
        warnings.warn(
            f"fusion_ops: the C++ CPU kernels of {', '.join(NATIVE_OPS)} were not built ({e}); "
            f"their Python kernels run instead (set {ENV_VAR}=0 to skip the build)",
            stacklevel=2,
        )
        return False
    return True


def set_python_forced(forced: bool) -> None:
    """Tell the C++ kernels that a backend other than ``reference`` is forced by the API."""
    torch.ops.fusion_ops_native.set_python_forced(forced)


def last_run_ns(op_name: str) -> int:
    """CLOCK_MONOTONIC ns of the C++ kernel's last run of ``op_name`` (0: never)."""
    return torch.ops.fusion_ops_native.last_native_run_ns(NATIVE_OPS.index(op_name))
