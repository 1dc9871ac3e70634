"""The ``triton`` backend: launches the kernels of :mod:`.kernels` for CUDA/ROCm tensors.

Imported lazily by :mod:`fusion_ops.backends` the first time an op runs on a GPU tensor.
Inputs are validated by the op layer before they get here. ``float8_e4m3fnuz`` cannot be emitted
by Triton on NVIDIA (sm_90): on CUDA those calls run the reference backend (on the GPU).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
import triton

from .. import formats
from ..backends import register_impl
from ..reference import cache as ref_cache
from ..reference.collective import all_reduce_sum
from ..reference.norm import NormNumerics, split_fused_params
from ..schemes import SCHEMES
from . import all_reduce
from . import kernels as k
from .launch import Launcher, next_power_of_2

IS_HIP = torch.version.hip is not None
FNUZ = torch.float8_e4m3fnuz
_SCHEME_IDS = {
    "mxfp4": k.SCHEME_MXFP4,
    "mxfp8": k.SCHEME_MXFP8,
    "fp8_per_token": k.SCHEME_FP8,
    "fp8_group": k.SCHEME_FP8,
}
PDL_ENV = "FUSION_OPS_PDL"
PREFETCH_ENV = "FUSION_OPS_PDL_PREFETCH_WEIGHT"

# every kernel launches through its cached compiled binary (see .launch)
_norm_quant_launch = Launcher(k.norm_quant_kernel)
_q_kv_launch = Launcher(k.q_kv_norm_quant_kernel)
_rope_launch = Launcher(k.rope_kernel)
_cache_write_launch = Launcher(k.cache_write_kernel)
_rope_cache_launch = Launcher(k.rope_cache_kernel)
_norm_rope_cache_launch = Launcher(k.norm_rope_cache_kernel)
_qnorm_rope_cache_launch = Launcher(k.qnorm_rope_cache_kernel)
_dequant_dsv4_launch = Launcher(k.dequant_dsv4_kernel)
_gather_rows_launch = Launcher(k.gather_rows_kernel)


@functools.cache
def _pdl_supported(device_index: int) -> bool:
    """Programmatic dependent launch: NVIDIA sm_90+ only (never on ROCm), unless
    FUSION_OPS_PDL=0. Read once per device."""
    if IS_HIP or os.environ.get(PDL_ENV, "1") == "0" or not _triton_has_pdl():
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _triton_has_pdl() -> bool:
    """The ``launch_pdl`` option and ``gdc_wait`` exist (Triton 3.4+; 3.6 verified)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.cache
def _prefetch_weight(device_index: int) -> bool:
    """With PDL, norm kernels load their weight before the PDL wait (kernels._pdl_start_with_weight)
    unless FUSION_OPS_PDL_PREFETCH_WEIGHT=0. Read once per device."""
    return _pdl_supported(device_index) and os.environ.get(PREFETCH_ENV, "1") != "0"


# from this eps on, kernels._inv_rms by FMA corrections equals the correctly rounded steps
INV_RMS_BY_FMA_MIN_EPS = 2.0**-40


def inv_rms_by_fma(*eps: float) -> bool:
    """The norm kernels' INV_BY_FMA for a launch with these eps (speed only: the same bits): on
    NVIDIA (the seeds are PTX) when every eps is at least 2⁻⁴⁰, where the FMA steps equal the
    correctly rounded ones on every fp32 sum of squares (tests/gpu/test_inv_rms_steps.py)."""
    return not IS_HIP and min(eps) >= INV_RMS_BY_FMA_MIN_EPS


# from this many rows on, rows of 4097–8192 columns without a residual take 4 warps, not 8
MANY_ROWS = 2048


def _num_warps(block: int, rows: int = 2, residual: bool = False) -> int:
    """Warps per row program; the standalone and fused norm kernels use the same value for the
    same (row width, row count, residual or not), so their sums of squares reduce alike. A lone
    row (decode) gets twice the warps: it is latency-bound and has the GPU to itself. Rows of
    4097–8192 columns without a residual take 4 warps from MANY_ROWS rows on: more programs per
    SM, measured faster for the block-quant kernels there and level for the plain norm; with a
    residual 8 stay faster (H100, benchmarks/RESULTS.md)."""
    base = 4 if block <= 2048 else 8 if block <= 8192 else 16
    if rows == 1:
        return min(base * 2, 32)
    if warps_depend_on_row_count(block, residual) and rows >= MANY_ROWS:
        return 4
    return base


def warps_depend_on_row_count(block: int, residual: bool) -> bool:
    """Whether _num_warps (hence a row's rounding) changes with the row count beyond one row;
    FusionPass(inductor_launch=True) lowers such a launch only for a known row count."""
    return 4096 < block <= 8192 and not residual


def _pieces(kdim: int, block_k: int, rows: int, scheme: str | None, params: tuple[Any, ...],
            residual: bool) -> tuple[int, int, int]:  # fmt: skip
    """norm_quant_kernel's PIECE0..2 (speed only: every choice gives the same bytes): for a
    block-quant scheme without a residual on many padded rows, the row as up to three
    power-of-two pieces of at least 256 columns (7168: 4096, 2048, 1024), the last one masked
    past ``kdim``; (0, 0, 0), one padded block, otherwise. Measured on the H100 at 7168 columns
    (benchmarks/RESULTS.md): faster for MXFP4 / MXFP8 from 2048 rows and FP8 groups from 1024,
    slower with a residual and for the norm alone."""
    group = {"mxfp4": 32, "mxfp8": 32, "fp8_group": params[0] if params else 0}.get(scheme or "")
    min_rows = 1024 if scheme == "fp8_group" else MANY_ROWS
    if not group or residual or rows < min_rows or kdim == block_k:
        return (0, 0, 0)
    rest, out = -(-kdim // 256) * 256, []
    while rest > 0 and len(out) < 2:
        out.append(1 << (rest.bit_length() - 1))
        rest -= out[-1]
    if rest > 0:
        out.append(next_power_of_2(rest))
    if len(out) == 1 or min(out) % group:  # one piece: no better than the padded block
        return (0, 0, 0)
    return (*out, *(0,) * (3 - len(out)))  # type: ignore[return-value]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [M, K] with a unit last stride (a copy only when needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@functools.cache
def scheme_constants(
    scheme: str | None, params: tuple[Any, ...], block_k: int
) -> Mapping[str, Any]:
    """norm_quant_kernel's scheme-dependent arguments (SCHEME, GROUP, UE8M0, fp8_max, min_scale)
    for ``scheme`` (None: norm only) and its op parameters; shared by this backend's launches
    and by FusionPass(inductor_launch=True), which must launch the same kernel alike."""
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


def _norm_quant(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    scheme: str | None,
    params: tuple[Any, ...],
    write_y: bool,
    numerics: NormNumerics = _DEFAULT_NUMERICS,
    weightless: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """Run the row kernel; returns (y, residual_out, q, scales), None for what it did not make.
    ``numerics``: the fused op's rounding flags (``return_normed`` is ``write_y``).
    ``weightless``: normalize without a weight (``weight`` is None)."""
    kdim = x.shape[-1]
    x2 = _rows(x)
    m = x2.shape[0]
    empty = torch.empty
    r2 = _rows(residual) if residual is not None else x2
    res_out = empty((m, kdim), dtype=x.dtype, device=x.device) if residual is not None else None
    y = empty((m, kdim), dtype=x.dtype, device=x.device) if write_y else None
    q = s = None
    if scheme is not None:
        q, s = SCHEMES[scheme].fake(x2, params)
    block_k = next_power_of_2(kdim)
    if m:
        w = weight if weight is not None else x2
        device = x.get_device()
        pdl = _pdl_supported(device)
        scheme_consts = scheme_constants(scheme, params, block_k)
        pieces = _pieces(kdim, block_k, m, scheme, params, residual is not None)
        _norm_quant_launch(
            (m,),
            (
                x2,
                r2,
                w,
                y if y is not None else x2,
                res_out if res_out is not None else x2,
                q if q is not None else x2,
                s if s is not None else x2,
                x2.stride(0),
                r2.stride(0),
                kdim,
                eps,
                scheme_consts["fp8_max"],
                scheme_consts["min_scale"],
            ),
            (
                ("HAS_RES", residual is not None),
                ("DO_NORM", weight is not None or weightless),
                ("WRITE_Y", write_y),
                ("SCHEME", scheme_consts["SCHEME"]),
                ("GROUP", scheme_consts["GROUP"]),
                ("UE8M0", scheme_consts["UE8M0"]),
                ("BLOCK_K", block_k),
                ("USE_PDL", pdl),
                ("WEIGHT_AFTER_ROUNDING", numerics.weight_after_rounding),
                ("UNROUNDED_SUM", numerics.norm_unrounded_sum),
                ("WEIGHTLESS", weightless),
                ("PIECE0", pieces[0]),
                ("PIECE1", pieces[1]),
                ("PIECE2", pieces[2]),
                ("PREFETCH_W", weight is not None and _prefetch_weight(device)),
                ("INV_BY_FMA", inv_rms_by_fma(eps)),
                ("num_warps", _num_warps(block_k, m, residual is not None)),
                ("launch_pdl", pdl),
            ),
        )
    lead = x.shape[:-1]
    if len(lead) != 1:
        y, res_out, q, s = (
            t.view(*lead, *t.shape[1:]) if t is not None else None for t in (y, res_out, q, s)
        )
    return y, res_out, q, s


def _q_kv_rows_per_program(block_q: int, rows: int, quant: bool, q_in_pieces: bool = False) -> int:
    """Rows per q_kv program: 2 for many short rows (each program then loads its weights once
    for both), 1 otherwise (speed only: the same bytes). Measured on the H100 at q_lora
    1024 / 1536 + kv 512 (benchmarks/RESULTS.md): 2 is faster from 2048 rows, and from 1024 rows
    at 1024 columns without a quant; slower at 1024 rows otherwise. Wider rows: not measured, 1.
    q's rows in pieces (_pieces): 1, as the standalone pieces kernel takes them."""
    if block_q > 2048 or q_in_pieces:
        return 1
    return 2 if rows >= (1024 if block_q <= 1024 and not quant else 2048) else 1


def _q_kv_load_choices(
    block_q: int, rows: int, quant: bool, prefetch_w: bool, inv_by_fma: bool
) -> tuple[bool, bool]:
    """(PREFETCH_W, INV_BY_FMA) of a q_kv launch, from the launchers' defaults (speed only: the
    same bytes). Measured on the H100 at q_lora 1024 + kv 512 without a quant, in three processes
    alike (benchmarks/q_kv_launch_choices.py, RESULTS.md): at 768–1024 rows the weight loaded
    after the PDL wait is 0.1–0.35 µs faster, at 1025–1536 rows the division steps 0.2–0.25 µs;
    outside those bands, and at other widths, the defaults are as fast or faster."""
    if block_q == 1024 and not quant:
        if 768 <= rows <= 1024:
            return False, inv_by_fma
        if 1024 < rows <= 1536:
            return prefetch_w, False
    return prefetch_w, inv_by_fma


def _q_kv_norm(
    q: torch.Tensor,
    q_weight: torch.Tensor,
    q_eps: float,
    kv: torch.Tensor,
    kv_weight: torch.Tensor,
    kv_eps: float,
    scheme: str | None,
    params: tuple[Any, ...],
    numerics: NormNumerics = _DEFAULT_NUMERICS,
) -> tuple[torch.Tensor | None, ...]:
    """Both norms in one launch; returns (q_normed or None, codes, scales, kv_normed), None for
    what it did not make (q_normed is made without a scheme or with ``return_normed``).

    One launch has one warp count, and the warp count sets a row's sum order: when the two
    standalone launches would use different counts (rows of very different widths), the two
    norms run as those two launches, so the result never depends on the pairing."""
    k_q, k_kv = q.shape[-1], kv.shape[-1]
    q2, kv2 = _rows(q), _rows(kv)
    m = q2.shape[0]
    block_q, block_kv = next_power_of_2(k_q), next_power_of_2(k_kv)
    warps = _num_warps(block_q, m)
    write_y = scheme is None or numerics.return_normed
    if warps != _num_warps(block_kv, m):
        y, _, codes, scales = _norm_quant(
            q, None, q_weight, q_eps, scheme, params, write_y, numerics
        )
        return y, codes, scales, _norm_quant(kv, None, kv_weight, kv_eps, None, (), True)[0]
    y = torch.empty((m, k_q), dtype=q.dtype, device=q.device) if write_y else None
    kv_out = torch.empty((m, k_kv), dtype=kv.dtype, device=kv.device)
    codes = scales = None
    if scheme is not None:
        codes, scales = SCHEMES[scheme].fake(q2, params)
    if m:
        pdl = _pdl_supported(q.get_device())
        consts = scheme_constants(scheme, params, block_q)
        pieces = _pieces(k_q, block_q, m, scheme, params, False)
        rows = _q_kv_rows_per_program(block_q, m, scheme is not None, pieces[0] > 0)
        prefetch_w, inv_by_fma = _q_kv_load_choices(
            block_q, m, scheme is not None, _prefetch_weight(q.get_device()),
            inv_rms_by_fma(q_eps, kv_eps),
        )  # fmt: skip
        _q_kv_launch(
            ((m + rows - 1) // rows, 2),
            (
                q2,
                q_weight,
                y if y is not None else q2,
                codes if codes is not None else q2,
                scales if scales is not None else q2,
                kv2,
                kv_weight,
                kv_out,
                m,
                q2.stride(0),
                kv2.stride(0),
                k_q,
                k_kv,
                q_eps,
                kv_eps,
                consts["fp8_max"],
                consts["min_scale"],
            ),
            (
                ("WRITE_Y", write_y),
                ("SCHEME", consts["SCHEME"]),
                ("GROUP", consts["GROUP"]),
                ("UE8M0", consts["UE8M0"]),
                ("BLOCK_Q", block_q),
                ("BLOCK_KV", block_kv),
                ("USE_PDL", pdl),
                ("WEIGHT_AFTER_ROUNDING", numerics.weight_after_rounding),
                ("ROWS", rows),
                ("PREFETCH_W", prefetch_w),
                ("PIECE0", pieces[0]),
                ("PIECE1", pieces[1]),
                ("PIECE2", pieces[2]),
                ("INV_BY_FMA", inv_by_fma),
                ("num_warps", warps),
                ("launch_pdl", pdl),
            ),
        )
    lead = q.shape[:-1]
    if len(lead) != 1:
        y, codes, scales, kv_out = (
            t.view(*lead, *t.shape[1:]) if t is not None else None
            for t in (y, codes, scales, kv_out)
        )
    return y, codes, scales, kv_out


@register_impl("q_kv_rms_norm", "triton")
def q_kv_rms_norm(q, q_weight, q_eps, kv, kv_weight, kv_eps):  # type: ignore[no-untyped-def]
    y, _, _, kv_out = _q_kv_norm(q, q_weight, q_eps, kv, kv_weight, kv_eps, None, ())
    return y, kv_out


def _fnuz_on_nvidia(params: tuple[Any, ...]) -> bool:
    return not IS_HIP and bool(params) and params[-1] == FNUZ


# --- registration ------------------------------------------------------------------------------
@register_impl("rms_norm", "triton")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm_quant(x, None, weight, eps, None, (), True)[0]


@register_impl("weightless_rms_norm", "triton")
def weightless_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm_quant(x, None, None, eps, None, (), True, weightless=True)[0]


@register_impl("fused_add_rms_norm", "triton")
def fused_add_rms_norm(x, residual, weight, eps):  # type: ignore[no-untyped-def]
    y, residual_out, _, _ = _norm_quant(x, residual, weight, eps, None, (), True)
    return y, residual_out


def _register_scheme(name: str) -> None:
    s = SCHEMES[name]

    def quant(x: torch.Tensor, *params: Any) -> Any:
        if _fnuz_on_nvidia(params):
            return s.reference(x, *params)
        _, _, q, scales = _norm_quant(x, None, None, 0.0, name, params, False)
        return q, scales

    def rms(x: torch.Tensor, w: torch.Tensor, eps: float, *p: Any) -> Any:
        params, f = split_fused_params(p, add=False)
        if _fnuz_on_nvidia(params):
            y = _norm_quant(x, None, w, eps, None, (), True, f)[0]  # the norm kernel alone
            return (*s.reference(y, *params), y if f.return_normed else y.new_empty((0,)))
        y, _, q, scales = _norm_quant(x, None, w, eps, name, params, f.return_normed, f)
        return q, scales, y if f.return_normed else x.new_empty((0,))

    def add_rms(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, *p: Any) -> Any:
        params, f = split_fused_params(p, add=True)
        if _fnuz_on_nvidia(params):
            y, res, _, _ = _norm_quant(x, r, w, eps, None, (), True, f)
            normed = y if f.return_normed else y.new_empty((0,))
            return (*s.reference(y, *params), res, normed)
        y, residual_out, q, scales = _norm_quant(x, r, w, eps, name, params, f.return_normed, f)
        return q, scales, residual_out, y if f.return_normed else x.new_empty((0,))

    def ar_add_rms(
        x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, group: str, *p: Any
    ) -> Any:
        params, f = split_fused_params(p, add=True)
        if not _fnuz_on_nvidia(params):
            q, scales = s.fake(x.reshape(-1, x.shape[-1]), params)
            done = _all_reduce_norm_quant(x, r, w, eps, group, name, params, f, q, scales)
            if done is not None:
                y, residual_out = done
                normed = y if y is not None else x.new_empty((0,))
                return (
                    q.view(*x.shape[:-1], -1),
                    scales.view(*x.shape[:-1], -1),
                    residual_out,
                    normed,
                )
        return add_rms(all_reduce_sum(x, group), r, w, eps, *p)

    def q_kv(q, qw, q_eps, kv, kvw, kv_eps, *p):  # type: ignore[no-untyped-def]
        params, f = split_fused_params(p, add=False)
        if _fnuz_on_nvidia(params):
            return (*rms(q, qw, q_eps, *p), rms_norm(kv, kvw, kv_eps))
        y, codes, scales, kv_out = _q_kv_norm(q, qw, q_eps, kv, kvw, kv_eps, name, params, f)
        return codes, scales, y if f.return_normed else q.new_empty((0,)), kv_out

    register_impl(s.quant_op, "triton")(quant)
    register_impl(s.q_kv_rms_op, "triton")(q_kv)
    register_impl(s.rms_op, "triton")(rms)
    register_impl(s.add_rms_op, "triton")(add_rms)
    register_impl(s.ar_add_rms_op, "triton")(ar_add_rms)


def _all_reduce_norm_quant(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_name: str,
    scheme: str | None,
    params: tuple[Any, ...],
    numerics: NormNumerics,
    q: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """The one-shot kernel (see :mod:`.all_reduce`): (normed or None, residual_out) shaped like
    x, or None when the call must take the all-reduce + fused-kernel path."""
    block_k = next_power_of_2(x.shape[-1])
    m = x.numel() // max(x.shape[-1], 1)
    write_y = scheme is None or numerics.return_normed
    done = all_reduce.one_shot(
        x,
        residual,
        weight,
        eps,
        group_name,
        write_y,
        scheme_constants(scheme, params, block_k),
        q,
        scales,
        numerics,
        _num_warps(block_k, m, residual is not None),
        _pdl_supported(x.get_device()),
        inv_rms_by_fma(eps),
    )
    if done is None:
        return None
    y, residual_out = done
    return (y.view(x.shape) if y is not None else None), residual_out.view(x.shape)


@register_impl("all_reduce_fused_add_rms_norm", "triton")
def all_reduce_fused_add_rms_norm(x, residual, weight, eps, group_name):  # type: ignore[no-untyped-def]
    done = _all_reduce_norm_quant(x, residual, weight, eps, group_name, None, (), _DEFAULT_NUMERICS)
    if done is not None:
        return done
    return fused_add_rms_norm(all_reduce_sum(x, group_name), residual, weight, eps)


for _name in SCHEMES:
    _register_scheme(_name)


def _fp32_table(cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """The rope table as the kernels read it (fp32, contiguous). Tested before converting: in
    compiled code even a no-op ``.float()`` reaches the dispatcher as ``aten::to``, which the
    CUDA replay must refuse (fusion_ops.native), so the rope ops would never replay."""
    if cos_sin_cache.dtype == torch.float32 and cos_sin_cache.is_contiguous():
        return cos_sin_cache
    return cos_sin_cache.float().contiguous()


def _heads_view(x: torch.Tensor) -> torch.Tensor:
    """x [T, ..., D] as [T, H, D] with a unit last stride."""
    t, d = x.shape[0], x.shape[-1]
    v = x.reshape(t, -1, d) if x.dim() != 3 else x
    return v if v.stride(-1) == 1 else v.contiguous()


@register_impl("rope", "triton")
def rope(positions, x, cos_sin_cache, rope_dim, is_neox):  # type: ignore[no-untyped-def]
    xv = _heads_view(x)
    t, h, d = xv.shape
    out = torch.empty((t, h, d), dtype=x.dtype, device=x.device)
    if t:
        _rope_launch(
            (t, h),
            (
                positions,
                xv,
                out,
                _fp32_table(cos_sin_cache),
                xv.stride(0),
                xv.stride(1),
                h,
            ),
            (
                ("D", d),
                ("ROPE", rope_dim),
                ("IS_NEOX", is_neox),
                ("BLOCK_D", next_power_of_2(d)),
                ("enable_fp_fusion", False),
            ),
        )
    return out.view(x.shape)


def _kv_rows(kv: torch.Tensor) -> torch.Tensor:
    return kv if kv.stride(-1) == 1 else kv.contiguous()


@register_impl("mla_cache_write", "triton")
def mla_cache_write(kv, kv_cache, slot_mapping, layout):  # type: ignore[no-untyped-def]
    kv2 = _kv_rows(kv)
    t, d = kv2.shape
    if t:
        _cache_write_launch(
            (t,),
            (
                kv2,
                kv2.stride(0),
                kv_cache,
                slot_mapping,
                kv_cache.stride(0),
                kv_cache.shape[0] * kv_cache.shape[1],
            ),
            (
                ("BS", kv_cache.shape[1]),
                ("D", d),
                ("DSV4", layout == "dsv4_fp8"),
                ("BLOCK_D", next_power_of_2(d)),
                ("num_warps", 4),
            ),
        )


def _rope_cache(
    positions, q, kv, cos_sin_cache, kv_cache, slot_mapping, rope_dim, is_neox, layout, q_eps
):  # type: ignore[no-untyped-def]
    """Both ropes and the kv write in one launch, grid (tokens, heads + 1); with ``q_eps`` (not
    None) each q head is first normed without a weight (qnorm_rope_cache_kernel)."""
    qv, kv2 = _heads_view(q), _kv_rows(kv)
    t, h, d = qv.shape
    q_out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    kv_out = torch.empty(kv2.shape, dtype=kv.dtype, device=kv.device)
    if not t:
        return q_out.view(q.shape), kv_out
    block = next_power_of_2(d)
    rows = (positions, qv, kv2, q_out, kv_out, _fp32_table(cos_sin_cache), kv_cache, slot_mapping)
    strides = (qv.stride(0), qv.stride(1), kv2.stride(0))
    cache = (kv_cache.stride(0), kv_cache.shape[0] * kv_cache.shape[1], h)
    geometry = (
        ("BS", kv_cache.shape[1]),
        ("D", d),
        ("ROPE", rope_dim),
        ("IS_NEOX", is_neox),
        ("DSV4", layout == "dsv4_fp8"),
        ("BLOCK_D", block),
    )
    if q_eps is None:
        flags = (("enable_fp_fusion", False),)
        _rope_cache_launch((t, h + 1), (*rows, *strides, *cache), (*geometry, *flags))
    else:
        pdl = _pdl_supported(q.get_device())
        flags = (
            ("HIP", IS_HIP),
            ("USE_PDL", pdl),
            ("INV_BY_FMA", inv_rms_by_fma(q_eps)),
            # the standalone weightless norm's warps for its t·h rows: same sums
            ("num_warps", _num_warps(block, t * h)),
            ("launch_pdl", pdl),
        )
        _qnorm_rope_cache_launch((t, h + 1), (*rows, *strides, q_eps, *cache), (*geometry, *flags))
    return q_out.view(q.shape), kv_out


@register_impl("rope_mla_cache_write", "triton")
def rope_mla_cache_write(
    positions, q, kv, cos_sin_cache, kv_cache, slot_mapping, rope_dim, is_neox, layout
):  # type: ignore[no-untyped-def]
    args = (positions, q, kv, cos_sin_cache, kv_cache, slot_mapping, rope_dim, is_neox, layout)
    return _rope_cache(*args, q_eps=None)


@register_impl("qnorm_rope_mla_cache_write", "triton")
def qnorm_rope_mla_cache_write(
    positions, q, q_eps, kv, cos_sin_cache, kv_cache, slot_mapping, rope_dim, is_neox, layout
):  # type: ignore[no-untyped-def]
    args = (positions, q, kv, cos_sin_cache, kv_cache, slot_mapping, rope_dim, is_neox, layout)
    return _rope_cache(*args, q_eps=q_eps)


@register_impl("rms_norm_rope_mla_cache_write", "triton")
def rms_norm_rope_mla_cache_write(
    positions,
    x,
    weight,
    eps,
    cos_sin_cache,
    kv_cache,
    slot_mapping,
    rope_dim,
    is_neox,
    layout,
    out_dtype=None,
):  # type: ignore[no-untyped-def]
    x2 = _rows(x)
    t, d = x2.shape
    kv_out = torch.empty((t, d), dtype=out_dtype or x.dtype, device=x.device)
    if t:
        block = next_power_of_2(d)
        pdl = _pdl_supported(x.get_device())
        _norm_rope_cache_launch(
            (t,),
            (
                positions,
                x2,
                weight,
                kv_out,
                _fp32_table(cos_sin_cache),
                kv_cache,
                slot_mapping,
                x2.stride(0),
                eps,
                kv_cache.stride(0),
                kv_cache.shape[0] * kv_cache.shape[1],
            ),
            (
                ("BS", kv_cache.shape[1]),
                ("D", d),
                ("ROPE", rope_dim),
                ("IS_NEOX", is_neox),
                ("DSV4", layout == "dsv4_fp8"),
                ("BLOCK_D", block),
                ("HIP", IS_HIP),
                ("USE_PDL", pdl),
                ("INV_BY_FMA", inv_rms_by_fma(eps)),
                ("num_warps", _num_warps(block, t)),  # the standalone norm's: same sums
                ("launch_pdl", pdl),
            ),
        )
    return kv_out


def _dequant(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, layout: str, fp8_dtype: torch.dtype | None
) -> torch.Tensor:
    nb, bs, row = kv_cache.shape
    n = block_ids.shape[0]
    to_fp8 = fp8_dtype is not None
    fmax = formats.fp8_max(fp8_dtype) if to_fp8 else 0.0
    if layout == "dsv4_fp8":
        out = torch.empty(
            (n * bs, 512), device=kv_cache.device, dtype=fp8_dtype if to_fp8 else torch.bfloat16
        )
        tok = min(bs, 16)
        if n and bs % tok == 0:
            _dequant_dsv4_launch(
                (n, bs // tok),
                (kv_cache, block_ids, out, kv_cache.stride(0), nb, fmax),
                (("BS", bs), ("TOK", tok), ("TO_FP8", to_fp8), ("num_warps", 4)),
            )
            return out
        return _reference_dequant(kv_cache, block_ids, layout, fp8_dtype)
    out = torch.empty(
        (n * bs, row), device=kv_cache.device, dtype=fp8_dtype if to_fp8 else kv_cache.dtype
    )
    if n:
        block = 4096
        _gather_rows_launch(
            (n, triton.cdiv(bs * row, block)),
            (kv_cache, block_ids, out, kv_cache.stride(0), nb, fmax),
            (("TO_FP8", to_fp8), ("ROW", bs * row), ("BLOCK", block), ("num_warps", 4)),
        )
    return out


def _reference_dequant(kv_cache, block_ids, layout, fp8_dtype):  # type: ignore[no-untyped-def]
    if fp8_dtype is None:
        return ref_cache.dequant_cache(kv_cache, block_ids, layout)
    return ref_cache.dequant_cache_fp8(kv_cache, block_ids, layout, fp8_dtype)


@register_impl("dequant_cache", "triton")
def dequant_cache(kv_cache, block_ids, layout):  # type: ignore[no-untyped-def]
    return _dequant(kv_cache, block_ids, layout, None)


@register_impl("dequant_cache_fp8", "triton")
def dequant_cache_fp8(kv_cache, block_ids, layout, fp8_dtype):  # type: ignore[no-untyped-def]
    if fp8_dtype == FNUZ and not IS_HIP:
        return _reference_dequant(kv_cache, block_ids, layout, fp8_dtype)
    return _dequant(kv_cache, block_ids, layout, fp8_dtype)
