"""RMSNorm ops: ``rms_norm``, ``weightless_rms_norm``, ``fused_add_rms_norm``, ``q_kv_rms_norm``,
``all_reduce_fused_add_rms_norm``, and the norm validators the fused ops share."""

from __future__ import annotations

import torch

from .. import checks
from ..reference import collective as ref_collective
from ..reference import norm as ref_norm
from .define import define


def check_norm(
    op: str, x: torch.Tensor, weight: torch.Tensor, eps: float, prefix: str = ""
) -> None:
    """``prefix``: the argument names' prefix (``q_`` → 'q', 'q_weight', 'q_eps')."""
    xa, wa, ea = (prefix.rstrip("_") or "x"), f"{prefix}weight", f"{prefix}eps"
    checks.check_min_dim(op, xa, x, 1)
    checks.check_dtype(op, xa, x, checks.FLOAT_DTYPES)
    checks.check_dtype(op, wa, weight, checks.FLOAT_DTYPES)
    checks.check_dim(op, wa, weight, 1)
    checks.check(
        op,
        wa,
        weight.shape[0] == x.shape[-1],
        lambda: f"has {weight.shape[0]} elements; expected {xa}'s last dim {x.shape[-1]}",
    )
    checks.check(op, ea, eps >= 0, lambda: f"got {eps}; expected >= 0")
    checks.check_same_device(op, **{xa: x, wa: weight})


def check_add_norm(
    op: str, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    check_norm(op, x, weight, eps)
    checks.check_same_dtype(op, "residual", residual, "x", x)
    checks.check(
        op,
        "residual",
        residual.shape == x.shape,
        lambda: f"has shape {tuple(residual.shape)}; expected x's shape {tuple(x.shape)}",
    )


_FLOATS = frozenset(checks.FLOAT_DTYPES)


def quick_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> bool:
    """Every check of check_norm passes (one expression: this runs on every call)."""
    return (
        x.dtype in _FLOATS
        and weight.dtype in _FLOATS
        and weight.dim() == 1
        and x.dim() >= 1
        and weight.shape[0] == x.shape[-1]
        and eps >= 0
        and weight.device == x.device
    )


define(
    "rms_norm",
    "(Tensor x, Tensor weight, float eps) -> Tensor",
    lambda x, w, eps: check_norm("rms_norm", x, w, eps),
    lambda x, w, eps: torch.empty_like(x, memory_format=torch.contiguous_format),
    ref_norm.rms_norm,
    quick=quick_norm,
)


def check_weightless_norm(op: str, x: torch.Tensor, eps: float, x_arg: str = "x") -> None:
    checks.check_min_dim(op, x_arg, x, 1)
    checks.check_dtype(op, x_arg, x, checks.FLOAT_DTYPES)
    ea = "eps" if x_arg == "x" else f"{x_arg}_eps"
    checks.check(op, ea, eps >= 0, lambda: f"got {eps}; expected >= 0")


define(
    "weightless_rms_norm",
    "(Tensor x, float eps) -> Tensor",
    lambda x, eps: check_weightless_norm("weightless_rms_norm", x, eps),
    lambda x, eps: torch.empty_like(x, memory_format=torch.contiguous_format),
    ref_norm.weightless_rms_norm,
    quick=lambda x, eps: x.dtype in _FLOATS and x.dim() >= 1 and eps >= 0,
)


def quick_add_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> bool:
    """Every check of check_add_norm passes."""
    return (
        quick_norm(x, weight, eps)
        and residual.dtype == x.dtype
        and residual.shape == x.shape
        and residual.device == x.device
    )


define(
    "fused_add_rms_norm",
    "(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
    lambda x, r, w, eps: check_add_norm("fused_add_rms_norm", x, r, w, eps),
    lambda x, r, w, eps: (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    ),
    ref_norm.fused_add_rms_norm,
    quick=quick_add_norm,
)


def check_group(op: str, group_name: str) -> None:
    checks.check(
        op,
        "group_name",
        isinstance(group_name, str) and ref_collective.group_exists(group_name),
        lambda: f"got {group_name!r}; expected the name of an initialized process group",
    )


def _ar_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return ref_norm.fused_add_rms_norm(
        ref_collective.all_reduce_sum(x, group_name), residual, weight, eps
    )


def check_ar_add_norm(op: str, x, r, w, eps, group_name) -> None:  # type: ignore[no-untyped-def]
    check_add_norm(op, x, r, w, eps)
    check_group(op, group_name)


define(
    "all_reduce_fused_add_rms_norm",
    "(Tensor x, Tensor residual, Tensor weight, float eps, str group_name) -> (Tensor, Tensor)",
    lambda x, r, w, eps, g: check_ar_add_norm("all_reduce_fused_add_rms_norm", x, r, w, eps, g),
    lambda x, r, w, eps, g: (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    ),
    _ar_fused_add_rms_norm,
)


def check_q_kv(op, q, q_weight, q_eps, kv, kv_weight, kv_eps) -> None:  # type: ignore[no-untyped-def]
    check_norm(op, q, q_weight, q_eps, prefix="q_")
    check_norm(op, kv, kv_weight, kv_eps, prefix="kv_")
    checks.check(
        op,
        "kv",
        kv.shape[:-1] == q.shape[:-1],
        lambda: (
            f"has shape {tuple(kv.shape)}; expected the leading dims of 'q' {tuple(q.shape[:-1])}"
            " (one row per row of q)"
        ),
    )
    checks.check_same_device(op, q=q, kv=kv)


def quick_q_kv(q, q_weight, q_eps, kv, kv_weight, kv_eps) -> bool:  # type: ignore[no-untyped-def]
    """Every check of check_q_kv passes."""
    return (
        quick_norm(q, q_weight, q_eps)
        and quick_norm(kv, kv_weight, kv_eps)
        and kv.shape[:-1] == q.shape[:-1]
        and kv.device == q.device
    )


define(
    "q_kv_rms_norm",
    "(Tensor q, Tensor q_weight, float q_eps, Tensor kv, Tensor kv_weight, float kv_eps)"
    " -> (Tensor, Tensor)",
    lambda q, qw, qe, kv, kvw, kve: check_q_kv("q_kv_rms_norm", q, qw, qe, kv, kvw, kve),
    lambda q, qw, qe, kv, kvw, kve: (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(kv, memory_format=torch.contiguous_format),
    ),
    ref_norm.q_kv_rms_norm,
    quick=quick_q_kv,
)
