"""The ``aiter`` backend: fused norm+quant ops through AITER's Triton kernels (ROCm).

Loaded by :mod:`fusion_ops.backends` on ROCm when ``import aiter`` works. What AITER covers:

* ``rms_norm_mxfp4_quant`` → ``fused_rms_mxfp4_quant(x, w, eps)`` (return_normed=False)
* ``add_rms_norm_mxfp4_quant`` → ``fused_rms_mxfp4_quant(x, w, eps, res1=residual)`` (same)
* ``rms_norm_fp8_group_quant`` → ``fused_rms_fp8_group_quant(..., group_size=128)`` (group 128,
  fp32 scales)
* ``add_rms_norm_fp8_group_quant`` → the same with ``res1=residual``

Every other call (other schemes, UE8M0 scales, other group sizes, ``return_normed`` for MXFP4,
``weight_after_rounding`` / ``norm_unrounded_sum``) goes to the Triton backend. Numerics differ
from the contract (AITER's Triton source, amd-aiter 0.1.7):
AITER normalises the *unrounded* fp32 value (and the unrounded fp32 sum x + residual) instead of
quantizing the normed value rounded to x.dtype, so a code can differ where that rounding moves a
value across a rounding boundary; its FP8 group scale is ``max(amax, 1e-10)/FP8_MAX`` applied as a
multiplication by ``1/s`` (the contract: ``max(amax/FP8_MAX, 1/(FP8_MAX·512))`` and ``x/s``).
Measured tolerance: tests/gpu/test_aiter_glue.py. The RoPE + MLA-cache kernel
(``fused_qk_rope_cat_and_cache_mla``) writes a per-token ``[slots, heads, dim]`` cache, not the
584-byte ``dsv4_fp8`` block layout, so ``rope_mla_cache_write`` stays on Triton.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from .backends import implementation, register_impl
from .reference.norm import NormNumerics

_KERNELS: dict[str, Any] = {}


def import_source_tree(path: str) -> None:
    """Make ``aiter.ops.triton.*`` importable from an unpacked ``amd-aiter`` wheel at ``path``
    where ``import aiter`` cannot run (its ``__init__`` needs ROCm): the package and
    ``aiter.dtypes`` are stubbed. For exercising AITER's Triton source on NVIDIA (tests,
    benchmarks); on ROCm use the installed package."""
    import os
    import sys
    import types

    if "aiter" in sys.modules:
        return
    pkg = types.ModuleType("aiter")
    pkg.__path__ = [os.path.join(path, "aiter")]
    pkg.dtypes = types.SimpleNamespace(fp8=torch.float8_e4m3fn)  # aiter.dtypes reads rocminfo
    sys.modules["aiter"] = pkg
    for sub in ("aiter.ops", "aiter.ops.triton"):
        mod = types.ModuleType(sub)
        mod.__path__ = [os.path.join(path, *sub.split("."))]
        sys.modules[sub] = mod


def kernels() -> dict[str, Any]:
    """AITER's wrappers, imported on first use (``aiter.ops.triton.*``)."""
    if not _KERNELS:
        mx = importlib.import_module("aiter.ops.triton.fused_mxfp4_quant")
        fp8 = importlib.import_module("aiter.ops.triton.fused_fp8_quant")
        _KERNELS["mxfp4"] = mx.fused_rms_mxfp4_quant
        _KERNELS["fp8_group"] = fp8.fused_rms_fp8_group_quant
    return _KERNELS


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _other_numerics(f: NormNumerics) -> bool:
    """Rounding points AITER does not offer (fusion_ops.reference.norm): Triton runs those."""
    return f.weight_after_rounding or f.norm_unrounded_sum


def _full_flags(flags: tuple[Any, ...], residual: Any) -> tuple[Any, ...]:
    """Every trailing flag of the fused op, defaults filled in (direct calls may omit them)."""
    return tuple(NormNumerics(*flags))[: 3 if residual is not None else 2]


def _mxfp4(x, residual, w, eps, flags, op):  # type: ignore[no-untyped-def]
    flags = _full_flags(flags, residual)
    f = NormNumerics(*flags)
    if f.return_normed or _other_numerics(f):
        return implementation(op, "triton")(*_args(x, residual, w, eps), *flags)
    lead = x.shape[:-1]
    res = _rows(residual) if residual is not None else None
    (q, s), _, res_out = kernels()["mxfp4"](_rows(x), w, eps, res1=res)
    q, s = q.view(*lead, -1), s.contiguous().view(*lead, -1)
    empty = x.new_empty((0,))
    if residual is None:
        return q, s, empty
    return q, s, res_out.view(x.shape), empty


def _fp8_group(x, residual, w, eps, params, flags, op):  # type: ignore[no-untyped-def]
    group_size, use_ue8m0, fp8_dtype = params
    flags = _full_flags(flags, residual)
    f = NormNumerics(*flags)
    if group_size != 128 or use_ue8m0 or _other_numerics(f):
        return implementation(op, "triton")(*_args(x, residual, w, eps), *params, *flags)
    lead = x.shape[:-1]
    res = _rows(residual) if residual is not None else None
    (q, s), normed, _, res_out = kernels()["fp8_group"](
        _rows(x), w, eps, group_size=128, dtype_quant=fp8_dtype, res1=res,
        output_unquantized_inp1=f.return_normed,
    )  # fmt: skip
    q, s = q.view(*lead, -1), s.view(*lead, -1)
    normed = normed.view(x.shape) if f.return_normed else x.new_empty((0,))
    if residual is None:
        return q, s, normed
    return q, s, res_out.view(x.shape), normed


def _args(x, residual, w, eps):  # type: ignore[no-untyped-def]
    return (x, w, eps) if residual is None else (x, residual, w, eps)


# the trailing flags (return_normed, weight_after_rounding[, norm_unrounded_sum]) pass through
@register_impl("rms_norm_mxfp4_quant", "aiter")
def rms_norm_mxfp4_quant(x, weight, eps, *flags):  # type: ignore[no-untyped-def]
    return _mxfp4(x, None, weight, eps, flags, "rms_norm_mxfp4_quant")


@register_impl("add_rms_norm_mxfp4_quant", "aiter")
def add_rms_norm_mxfp4_quant(x, residual, weight, eps, *flags):  # type: ignore[no-untyped-def]
    return _mxfp4(x, residual, weight, eps, flags, "add_rms_norm_mxfp4_quant")


@register_impl("rms_norm_fp8_group_quant", "aiter")
def rms_norm_fp8_group_quant(x, weight, eps, group_size, use_ue8m0, fp8_dtype, *flags):  # type: ignore[no-untyped-def]
    params = (group_size, use_ue8m0, fp8_dtype)
    return _fp8_group(x, None, weight, eps, params, flags, "rms_norm_fp8_group_quant")


@register_impl("add_rms_norm_fp8_group_quant", "aiter")
def add_rms_norm_fp8_group_quant(
    x, residual, weight, eps, group_size, use_ue8m0, fp8_dtype, *flags
):  # type: ignore[no-untyped-def]
    params = (group_size, use_ue8m0, fp8_dtype)
    return _fp8_group(x, residual, weight, eps, params, flags, "add_rms_norm_fp8_group_quant")
