"""Launchers of the row kernels: RMSNorm (+ add) (+ quant), q_kv_norm, and the tensor-parallel
all-reduce + norm ops, registered as the ``triton`` implementations of their ops."""

from __future__ import annotations

from typing import Any

import torch

from .. import launch_policy as policy
from ..backends import register_impl
from ..launch_policy import next_power_of_2
from ..reference.collective import all_reduce_sum
from ..reference.norm import NormNumerics, split_fused_params
from ..schemes import SCHEMES
from . import all_reduce
from . import kernels as k
from .calls import NormFlags, norm_quant_args, norm_quant_meta, q_kv_meta, scheme_constants
from .device import FNUZ, IS_HIP, device_facts, rows
from .launch import Launcher

_norm_quant_launch = Launcher(k.norm_quant_kernel)
_q_kv_launch = Launcher(k.q_kv_norm_quant_kernel)


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
    x2 = rows(x)
    m = x2.shape[0]
    r2 = rows(residual) if residual is not None else None
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
            launch.grid(m),
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
    q2, kv2 = rows(q), rows(kv)
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
