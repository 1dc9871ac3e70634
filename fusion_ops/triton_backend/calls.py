"""Calling conventions of the row kernels, written once: a launch record
(:mod:`fusion_ops.launch_policy`) and what the op computes → the kernel's runtime arguments and its
constexprs / launch options.

The eager launchers, the Inductor lowering (:mod:`fusion_passes.inductor_launch`) and the compile
check build their launches here, so the three cannot spell a kernel's arguments differently.
``tests/test_launch_policy.py`` checks every builder's names against the kernel's signature.
Values may be tensors, FX nodes or numbers: the builders only place them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from .. import formats
from ..launch_policy import AllReduceLaunch, NormLaunch, QKvLaunch
from ..reference.norm import NormNumerics
from . import kernels as k

Meta = tuple[tuple[str, Any], ...]  # constexprs then launch options, as Launcher takes them

_SCHEME_IDS = {
    "mxfp4": k.SCHEME_MXFP4,
    "mxfp8": k.SCHEME_MXFP8,
    "fp8_per_token": k.SCHEME_FP8,
    "fp8_group": k.SCHEME_FP8,
}


@functools.cache
def scheme_constants(
    scheme: str | None, params: tuple[Any, ...], block_k: int
) -> Mapping[str, Any]:
    """The row kernels' scheme-dependent arguments (SCHEME, GROUP, UE8M0, fp8_max, min_scale) for
    ``scheme`` (None: norm only) and its op parameters."""
    scheme_id, group, ue8m0, fp8 = k.SCHEME_NONE, 1, False, torch.float8_e4m3fn
    if scheme is not None:
        scheme_id = _SCHEME_IDS[scheme]
        if scheme_id == k.SCHEME_FP8:
            ue8m0, fp8 = bool(params[-2]), params[-1]
            # per-token: one group of the padded row
            group = params[0] if scheme == "fp8_group" else block_k
    return MappingProxyType(  # cached: read-only
        {
            "SCHEME": scheme_id,
            "GROUP": group,
            "UE8M0": ue8m0,
            "fp8_max": formats.fp8_max(fp8),
            "min_scale": formats.fp8_min_scale(fp8),
        }
    )


_DEFAULT_NUMERICS = NormNumerics()


@dataclass(frozen=True)
class NormFlags:
    """What a norm_quant_kernel launch computes (the launch record says how it is launched)."""

    residual: bool = False  # x + r first (writes residual_out)
    normalize: bool = True  # False: quant alone (DO_NORM)
    write_y: bool = True  # write the normed value
    weightless: bool = False  # normalize without a weight
    numerics: NormNumerics = _DEFAULT_NUMERICS


# --- norm_quant_kernel --------------------------------------------------------------------------
NORM_QUANT_ARGS = (
    "x_ptr", "r_ptr", "w_ptr", "y_ptr", "res_ptr", "q_ptr", "s_ptr",
    "x_stride", "r_stride", "K", "eps", "fp8_max", "min_scale",
)  # fmt: skip


def norm_quant_args(
    x: Any,
    residual: Any,
    weight: Any,
    y: Any,
    residual_out: Any,
    q: Any,
    scales: Any,
    x_stride: Any,
    r_stride: Any,
    kdim: Any,
    eps: float,
    consts: Mapping[str, Any],
) -> tuple[Any, ...]:
    """Runtime arguments in the kernel's order; a pointer the launch does not read or write
    (None) is given x's."""
    return (
        x,
        x if residual is None else residual,
        x if weight is None else weight,
        x if y is None else y,
        x if residual_out is None else residual_out,
        x if q is None else q,
        x if scales is None else scales,
        x_stride,
        r_stride,
        kdim,
        eps,
        consts["fp8_max"],
        consts["min_scale"],
    )


def norm_quant_meta(launch: NormLaunch, flags: NormFlags, consts: Mapping[str, Any]) -> Meta:
    """Constexprs and launch options of norm_quant_kernel."""
    return (
        ("HAS_RES", flags.residual),
        ("DO_NORM", flags.normalize),
        ("WRITE_Y", flags.write_y),
        ("SCHEME", consts["SCHEME"]),
        ("GROUP", consts["GROUP"]),
        ("UE8M0", consts["UE8M0"]),
        ("BLOCK_K", launch.block_k),
        ("USE_PDL", launch.use_pdl),
        ("WEIGHT_AFTER_ROUNDING", flags.numerics.weight_after_rounding),
        ("UNROUNDED_SUM", flags.numerics.norm_unrounded_sum),
        ("WEIGHTLESS", flags.weightless),
        ("PIECE0", launch.pieces[0]),
        ("PIECE1", launch.pieces[1]),
        ("PIECE2", launch.pieces[2]),
        ("PREFETCH_W", launch.prefetch_weight),
        ("INV_BY_FMA", launch.inv_by_fma),
        ("SPLIT", launch.split),
        ("INT_AMAX", launch.int_amax),
        ("num_warps", launch.num_warps),
        ("launch_pdl", launch.use_pdl),
    )


# --- q_kv_norm_quant_kernel ---------------------------------------------------------------------
Q_KV_ARGS = (
    "q_ptr", "qw_ptr", "y_ptr", "codes_ptr", "scales_ptr", "kv_ptr", "kvw_ptr", "kv_out_ptr",
    "M", "q_stride", "kv_stride", "K_Q", "K_KV", "q_eps", "kv_eps", "fp8_max", "min_scale",
)  # fmt: skip


def q_kv_meta(
    launch: QKvLaunch, write_y: bool, weight_after_rounding: bool, consts: Mapping[str, Any]
) -> Meta:
    """Constexprs and launch options of q_kv_norm_quant_kernel."""
    return (
        ("WRITE_Y", write_y),
        ("SCHEME", consts["SCHEME"]),
        ("GROUP", consts["GROUP"]),
        ("UE8M0", consts["UE8M0"]),
        ("BLOCK_Q", launch.block_q),
        ("BLOCK_KV", launch.block_kv),
        ("USE_PDL", launch.use_pdl),
        ("WEIGHT_AFTER_ROUNDING", weight_after_rounding),
        ("ROWS", launch.rows_per_program),
        ("PREFETCH_W", launch.prefetch_weight),
        ("PIECE0", launch.pieces[0]),
        ("PIECE1", launch.pieces[1]),
        ("PIECE2", launch.pieces[2]),
        ("INV_BY_FMA", launch.inv_by_fma),
        ("Q_SPLIT", launch.q_split),
        ("INT_AMAX", launch.int_amax),
        ("num_warps", launch.num_warps),
        ("launch_pdl", launch.use_pdl),
    )


# --- all_reduce_norm_quant_kernel ---------------------------------------------------------------
ALL_REDUCE_ARGS = (
    "x_ptr", "buf_ptrs", "state_ptr", "red_ptr", "r_ptr", "w_ptr", "y_ptr", "res_ptr", "q_ptr",
    "s_ptr", "x_stride", "r_stride", "M", "K", "eps", "fp8_max", "min_scale", "rank", "slot_elems",
)  # fmt: skip


def all_reduce_meta(
    launch: AllReduceLaunch,
    world: int,
    element_bits: int,
    aligned: bool,
    write_y: bool,
    numerics: NormNumerics,
    consts: Mapping[str, Any],
) -> Meta:
    """Constexprs and launch options of all_reduce_norm_quant_kernel."""
    return (
        ("WORLD", world),
        ("BITS", element_bits),
        ("HAS_RES", True),
        ("DO_NORM", True),
        ("WRITE_Y", write_y),
        ("SCHEME", consts["SCHEME"]),
        ("GROUP", consts["GROUP"]),
        ("UE8M0", consts["UE8M0"]),
        ("BLOCK_K", launch.block_k),
        ("WEIGHT_AFTER_ROUNDING", numerics.weight_after_rounding),
        ("UNROUNDED_SUM", numerics.norm_unrounded_sum),
        ("ALIGNED", aligned),
        ("USE_PDL", launch.use_pdl),
        ("SPLIT", launch.split),
        ("INV_BY_FMA", launch.inv_by_fma),
        ("num_warps", launch.num_warps),
        ("launch_pdl", launch.use_pdl),
    )


# --- norm + rope + cache-write chains -----------------------------------------------------------
def chain_meta(launch: NormLaunch, hip: bool) -> Meta:
    """The flags and launch options norm_rope_cache_kernel and qnorm_rope_cache_kernel share
    (after their geometry constexprs)."""
    return (
        ("HIP", hip),
        ("USE_PDL", launch.use_pdl),
        ("INV_BY_FMA", launch.inv_by_fma),
        ("num_warps", launch.num_warps),
        ("launch_pdl", launch.use_pdl),
    )


def split_meta(kernel: Any, meta: Meta) -> tuple[dict[str, Any], dict[str, Any]]:
    """``meta`` as (constexprs, launch options) of ``kernel`` (a JITFunction)."""
    names = set(kernel.arg_names)
    constexprs = {n: v for n, v in meta if n in names}
    return constexprs, {n: v for n, v in meta if n not in names}
