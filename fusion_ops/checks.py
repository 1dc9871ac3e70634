"""Input validation shared by every op: errors name the op, the argument and the expectation."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _fmt(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_dtype(op: str, arg: str, t: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    if t.dtype not in allowed:
        raise TypeError(
            f"fusion_ops.{op}: argument '{arg}' has dtype {_fmt([t.dtype])}; expected one of "
            f"{_fmt(allowed)}"
        )


def check_same_dtype(op: str, arg: str, t: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"fusion_ops.{op}: argument '{arg}' has dtype {_fmt([t.dtype])}; expected the dtype of "
            f"'{ref_arg}' ({_fmt([ref.dtype])})"
        )


def check_dim(op: str, arg: str, t: torch.Tensor, dims: int | tuple[int, ...]) -> None:
    dims_t = (dims,) if isinstance(dims, int) else dims
    if t.dim() not in dims_t:
        raise ValueError(
            f"fusion_ops.{op}: argument '{arg}' has {t.dim()} dims (shape {tuple(t.shape)}); "
            f"expected {' or '.join(map(str, dims_t))}"
        )


def check_min_dim(op: str, arg: str, t: torch.Tensor, min_dim: int) -> None:
    if t.dim() < min_dim:
        raise ValueError(
            f"fusion_ops.{op}: argument '{arg}' has {t.dim()} dims (shape {tuple(t.shape)}); "
            f"expected at least {min_dim}"
        )


def check(op: str, arg: str, condition: bool, expectation: str | Callable[[], str]) -> None:
    """Generic check: ``expectation`` says what was expected and what was found (a callable is
    formatted only when the check fails: ops run this on every call)."""
    if not condition:
        text = expectation() if callable(expectation) else expectation
        raise ValueError(f"fusion_ops.{op}: argument '{arg}': {text}")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"fusion_ops.{op}: tensors are on different devices: {devices}")


CHECK_INDICES_ENV = "FUSION_OPS_CHECK_INDICES"


def _value_checks_possible(t: torch.Tensor) -> bool:
    """Range checks read values: on a GPU that is a device sync per check (measured to dominate a
    decode step), so there they run only with FUSION_OPS_CHECK_INDICES=1 — the GPU kernels
    themselves skip out-of-range slots and mask out-of-range blocks/positions. Never under fake
    tensors or CUDA-graph capture."""
    if isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta":
        return False
    if t.device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return False
        return os.environ.get(CHECK_INDICES_ENV, "0") == "1"
    return True


def check_index_range(
    op: str, arg: str, t: torch.Tensor, upper: int, allow_negative: bool = False
) -> None:
    """Every value of ``t`` lies in [0, upper) (negative values allowed when ``allow_negative``)."""
    check_dtype(op, arg, t, INDEX_DTYPES)
    if t.numel() == 0 or not _value_checks_possible(t):
        return
    hi = int(t.max())
    lo = int(t.min())
    if hi >= upper:
        raise ValueError(
            f"fusion_ops.{op}: argument '{arg}' holds {hi}; expected values < {upper}"
            + (" (negative values are skipped)" if allow_negative else "")
        )
    if lo < 0 and not allow_negative:
        raise ValueError(f"fusion_ops.{op}: argument '{arg}' holds {lo}; expected values >= 0")


def check_fp8_dtype(op: str, arg: str, dtype: torch.dtype) -> None:
    if dtype not in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        raise TypeError(
            f"fusion_ops.{op}: argument '{arg}' is {dtype}; expected torch.float8_e4m3fn (CUDA, "
            "gfx950) or torch.float8_e4m3fnuz (gfx942)"
        )
