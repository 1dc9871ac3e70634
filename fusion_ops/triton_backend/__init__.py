"""The ``triton`` backend: launches the kernels of :mod:`.kernels` for CUDA/ROCm tensors.

Imported lazily by :mod:`fusion_ops.backends` the first time an op runs on a GPU tensor.
Inputs are validated by the op layer before they get here. ``float8_e4m3fnuz`` cannot be emitted
by Triton on NVIDIA (sm_90): on CUDA those calls run the reference backend (on the GPU).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton

from .. import formats
from .. import launch_policy as policy
from ..backends import register_impl
from ..launch_policy import next_power_of_2
from ..reference import cache as ref_cache
from ..reference.collective import all_reduce_sum
from ..reference.norm import NormNumerics, split_fused_params
from ..schemes import SCHEMES
from . import all_reduce
from . import kernels as k
from .calls import (
    NormFlags,
    chain_meta,
    norm_quant_args,
    norm_quant_meta,
    q_kv_meta,
    scheme_constants,
)
from .launch import Launcher

IS_HIP = torch.version.hip is not None
FNUZ = torch.float8_e4m3fnuz
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


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [M, K] with a unit last stride (a copy only when needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


_DEFAULT_NUMERICS = NormNumerics()


def norm_quant(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    scheme: str | None,
    params: tuple[Any, ...],
    write_y: bool,
    numerics: NormNumerics = _DEFAULT_NUMERICS,
    weightless: bool = False,
    launch: policy.NormLaunch | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Run the row kernel; returns (y, residual_out, q, scales), None for what it did not make.
    ``numerics``: the fused op's rounding flags (``return_normed`` is ``write_y``).
    ``weightless``: normalize without a weight (``weight`` is None). ``launch``: the policy's
    record for these rows unless given (benchmarks override fields of it)."""
    kdim = x.shape[-1]
    x2 = _rows(x)
    m = x2.shape[0]
    r2 = _rows(residual) if residual is not None else None
    res_out = torch.empty((m, kdim), dtype=x.dtype, device=x.device) if r2 is not None else None
    y = torch.empty((m, kdim), dtype=x.dtype, device=x.device) if write_y else None
    q = s = None
    if scheme is not None:
        q, s = SCHEMES[scheme].fake(x2, params)
    if m:
        if launch is None:
            launch = policy.norm_launch(
                kdim, m, device_facts(x.get_device()), scheme=scheme, params=params,
                residual=r2 is not None, has_weight=weight is not None, eps=eps,
            )  # fmt: skip
        consts = scheme_constants(scheme, params, launch.block_k)
        flags = NormFlags(
            residual=r2 is not None,
            normalize=weight is not None or weightless,
            write_y=write_y,
            weightless=weightless,
            numerics=numerics,
        )
        stride = x2.stride(0)
        _norm_quant_launch(
            (m,),
            norm_quant_args(
                x2,
                r2,
                weight,
                y,
                res_out,
                q,
                s,
                stride,
                stride if r2 is None else r2.stride(0),
                kdim,
                eps,
                consts,
            ),  # fmt: skip
            norm_quant_meta(launch, flags, consts),
        )
    lead = x.shape[:-1]
    if len(lead) != 1:
        y, res_out, q, s = (
            t.view(*lead, *t.shape[1:]) if t is not None else None for t in (y, res_out, q, s)
        )
    return y, res_out, q, s


def q_kv_norm(
    q: torch.Tensor,
    q_weight: torch.Tensor,
    q_eps: float,
    kv: torch.Tensor,
    kv_weight: torch.Tensor,
    kv_eps: float,
    scheme: str | None,
    params: tuple[Any, ...],
    numerics: NormNumerics = _DEFAULT_NUMERICS,
    launch: policy.QKvLaunch | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Both norms in one launch; returns (q_normed or None, codes, scales, kv_normed), None for
    what it did not make (q_normed is made without a scheme or with ``return_normed``).

    One launch has one warp count, and the warp count sets a row's sum order: when the two
    standalone launches would use different counts (rows of very different widths; the record
    is not ``paired``), the two norms run as those two launches, so the result never depends on
    the pairing. ``launch``: the policy's record for these rows unless given."""
    k_q, k_kv = q.shape[-1], kv.shape[-1]
    q2, kv2 = _rows(q), _rows(kv)
    m = q2.shape[0]
    write_y = scheme is None or numerics.return_normed
    if launch is None:
        facts = device_facts(q.get_device()) if m else policy.NO_PDL
        launch = policy.q_kv_launch(
            k_q, k_kv, m, facts, scheme=scheme, params=params, q_eps=q_eps, kv_eps=kv_eps
        )
    if not launch.paired:
        y, _, codes, scales = norm_quant(
            q, None, q_weight, q_eps, scheme, params, write_y, numerics
        )
        return y, codes, scales, norm_quant(kv, None, kv_weight, kv_eps, None, (), True)[0]
    y = torch.empty((m, k_q), dtype=q.dtype, device=q.device) if write_y else None
    kv_out = torch.empty((m, k_kv), dtype=kv.dtype, device=kv.device)
    codes = scales = None
    if scheme is not None:
        codes, scales = SCHEMES[scheme].fake(q2, params)
    if m:
        consts = scheme_constants(scheme, params, launch.block_q)
        _q_kv_launch(
            launch.grid(m),
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
            q_kv_meta(launch, write_y, numerics.weight_after_rounding, consts),
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
    y, _, _, kv_out = q_kv_norm(q, q_weight, q_eps, kv, kv_weight, kv_eps, None, ())
    return y, kv_out


def _fnuz_on_nvidia(params: tuple[Any, ...]) -> bool:
    return not IS_HIP and bool(params) and params[-1] == FNUZ


# --- registration ------------------------------------------------------------------------------
@register_impl("rms_norm", "triton")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return norm_quant(x, None, weight, eps, None, (), True)[0]


@register_impl("weightless_rms_norm", "triton")
def weightless_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return norm_quant(x, None, None, eps, None, (), True, weightless=True)[0]


@register_impl("fused_add_rms_norm", "triton")
def fused_add_rms_norm(x, residual, weight, eps):  # type: ignore[no-untyped-def]
    y, residual_out, _, _ = norm_quant(x, residual, weight, eps, None, (), True)
    return y, residual_out


def _register_scheme(name: str) -> None:
    s = SCHEMES[name]

    def quant(x: torch.Tensor, *params: Any) -> Any:
        if _fnuz_on_nvidia(params):
            return s.reference(x, *params)
        _, _, q, scales = norm_quant(x, None, None, 0.0, name, params, False)
        return q, scales

    def rms(x: torch.Tensor, w: torch.Tensor, eps: float, *p: Any) -> Any:
        params, f = split_fused_params(p, add=False)
        if _fnuz_on_nvidia(params):
            y = norm_quant(x, None, w, eps, None, (), True, f)[0]  # the norm kernel alone
            return (*s.reference(y, *params), y if f.return_normed else y.new_empty((0,)))
        y, _, q, scales = norm_quant(x, None, w, eps, name, params, f.return_normed, f)
        return q, scales, y if f.return_normed else x.new_empty((0,))

    def add_rms(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, *p: Any) -> Any:
        params, f = split_fused_params(p, add=True)
        if _fnuz_on_nvidia(params):
            y, res, _, _ = norm_quant(x, r, w, eps, None, (), True, f)
            normed = y if f.return_normed else y.new_empty((0,))
            return (*s.reference(y, *params), res, normed)
        y, residual_out, q, scales = norm_quant(x, r, w, eps, name, params, f.return_normed, f)
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
        y, codes, scales, kv_out = q_kv_norm(q, qw, q_eps, kv, kvw, kv_eps, name, params, f)
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
    write_y = scheme is None or numerics.return_normed
    consts = scheme_constants(scheme, params, next_power_of_2(x.shape[-1]))
    done = all_reduce.one_shot(
        x, residual, weight, eps, group_name, write_y, consts, q, scales, numerics,
        device_facts(x.get_device()),
    )  # fmt: skip
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
        # the standalone weightless norm's warps for its t·h rows: same sums
        launch = policy.chain_launch(d, t * h, device_facts(q.get_device()), q_eps)
        flags = chain_meta(launch, IS_HIP)
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
        launch = policy.chain_launch(d, t, device_facts(x.get_device()), eps)
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
                ("BLOCK_D", launch.block_k),
                *chain_meta(launch, IS_HIP),  # the standalone norm's warps: same sums
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
        tok = min(bs, policy.DEQUANT_DSV4_TOKENS)
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
        block = policy.GATHER_BLOCK
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
