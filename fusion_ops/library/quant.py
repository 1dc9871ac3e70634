"""Quant ops, generated per scheme (:mod:`fusion_ops.schemes`): ``<s>_quant`` and the fused
``rms_norm_<s>_quant``, ``add_rms_norm_<s>_quant``, ``q_kv_rms_norm_<s>_quant``,
``all_reduce_add_rms_norm_<s>_quant``."""

from __future__ import annotations

from typing import Any

import torch

from ..reference import collective as ref_collective
from ..reference import norm as ref_norm
from ..reference.norm import split_fused_params
from ..schemes import SCHEMES, QuantScheme
from .define import define
from .norm import (
    check_add_norm,
    check_ar_add_norm,
    check_norm,
    check_q_kv,
    quick_add_norm,
    quick_norm,
    quick_q_kv,
)


def _normed_or_empty(y: torch.Tensor, return_normed: bool) -> torch.Tensor:
    return y if return_normed else y.new_empty((0,))


_NORM_FLAGS = "bool return_normed=False, bool weight_after_rounding=False"


def _define_scheme(s: QuantScheme) -> None:
    """``<s>_quant``, ``rms_norm_<s>_quant``, ``add_rms_norm_<s>_quant`` and its tensor-parallel
    form ``all_reduce_add_rms_norm_<s>_quant`` (x summed over ``group_name`` first).

    The fused ops end with flags (:class:`fusion_ops.reference.norm.NormNumerics`):
    ``return_normed`` (also return the unquantized normed value, for graphs where it has other
    users, e.g. a router gate; else an empty tensor in that place), ``weight_after_rounding``
    and, for the add op, ``norm_unrounded_sum`` (other libraries' rounding points, see
    :mod:`fusion_ops.reference.norm`). Params below are ``(*scheme_params, *flags)``.
    """

    def quant_ref(x: torch.Tensor, *params: Any) -> Any:
        return s.reference(x, *params)

    def rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float, *p: Any) -> Any:
        params, f = split_fused_params(p, add=False)
        y = ref_norm.rms_norm(x, w, eps, f.weight_after_rounding)
        return (*s.reference(y, *params), _normed_or_empty(y, f.return_normed))

    def add_rms_ref(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, *p: Any) -> Any:
        params, f = split_fused_params(p, add=True)
        y, residual_out = ref_norm.fused_add_rms_norm(
            x, r, w, eps, f.weight_after_rounding, f.norm_unrounded_sum
        )
        return (*s.reference(y, *params), residual_out, _normed_or_empty(y, f.return_normed))

    def ar_add_rms_ref(
        x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, group: str, *p: Any
    ) -> Any:
        return add_rms_ref(ref_collective.all_reduce_sum(x, group), r, w, eps, *p)

    def check_rms(x: torch.Tensor, w: torch.Tensor, eps: float, *p: Any) -> None:
        check_norm(s.rms_op, x, w, eps)
        s.check(s.rms_op, x, split_fused_params(p, add=False)[0])

    def check_add_rms(
        x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, *p: Any
    ) -> None:
        check_add_norm(s.add_rms_op, x, r, w, eps)
        s.check(s.add_rms_op, x, split_fused_params(p, add=True)[0])

    def check_ar_add_rms(
        x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, group: str, *p: Any
    ) -> None:
        check_ar_add_norm(s.ar_add_rms_op, x, r, w, eps, group)
        s.check(s.ar_add_rms_op, x, split_fused_params(p, add=True)[0])

    def fake_normed(x: torch.Tensor, return_normed: bool) -> torch.Tensor:
        if return_normed:
            return torch.empty_like(x, memory_format=torch.contiguous_format)
        return x.new_empty((0,))

    def fake_rms(x: torch.Tensor, w: torch.Tensor, eps: float, *p: Any) -> Any:
        params, f = split_fused_params(p, add=False)
        return (*s.fake(x, params), fake_normed(x, f.return_normed))

    def fake_add_rms(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, *p: Any) -> Any:
        params, f = split_fused_params(p, add=True)
        residual_out = torch.empty_like(x, memory_format=torch.contiguous_format)
        return (*s.fake(x, params), residual_out, fake_normed(x, f.return_normed))

    define(
        s.quant_op,
        f"(Tensor x{s.params_schema}) -> (Tensor, Tensor)",
        lambda x, *p: s.check(s.quant_op, x, p),
        lambda x, *p: s.fake(x, p),
        quant_ref,
        quick=lambda x, *p: s.quick(x, p),
    )
    define(
        s.rms_op,
        f"(Tensor x, Tensor weight, float eps{s.params_schema}, {_NORM_FLAGS})"
        " -> (Tensor, Tensor, Tensor)",
        check_rms,
        fake_rms,
        rms_ref,
        quick=lambda x, w, eps, *p: quick_norm(x, w, eps) and s.quick(x, p[:-2]),
    )
    define(
        s.add_rms_op,
        f"(Tensor x, Tensor residual, Tensor weight, float eps{s.params_schema}, {_NORM_FLAGS}, "
        "bool norm_unrounded_sum=False) -> (Tensor, Tensor, Tensor, Tensor)",
        check_add_rms,
        fake_add_rms,
        add_rms_ref,
        quick=lambda x, r, w, eps, *p: quick_add_norm(x, r, w, eps) and s.quick(x, p[:-3]),
    )

    def q_kv_ref(q, qw, q_eps, kv, kvw, kv_eps, *p):  # type: ignore[no-untyped-def]
        return (*rms_ref(q, qw, q_eps, *p), ref_norm.rms_norm(kv, kvw, kv_eps))

    def check_q_kv_quant(q, qw, q_eps, kv, kvw, kv_eps, *p):  # type: ignore[no-untyped-def]
        check_q_kv(s.q_kv_rms_op, q, qw, q_eps, kv, kvw, kv_eps)
        s.check(s.q_kv_rms_op, q, split_fused_params(p, add=False)[0])

    define(
        s.q_kv_rms_op,
        f"(Tensor q, Tensor q_weight, float q_eps, Tensor kv, Tensor kv_weight, float kv_eps"
        f"{s.params_schema}, {_NORM_FLAGS}) -> (Tensor, Tensor, Tensor, Tensor)",
        check_q_kv_quant,
        lambda q, qw, q_eps, kv, kvw, kv_eps, *p: (
            *fake_rms(q, qw, q_eps, *p),
            torch.empty_like(kv, memory_format=torch.contiguous_format),
        ),
        q_kv_ref,
        quick=lambda q, qw, q_eps, kv, kvw, kv_eps, *p: (
            quick_q_kv(q, qw, q_eps, kv, kvw, kv_eps) and s.quick(q, p[:-2])
        ),
    )
    define(
        s.ar_add_rms_op,
        f"(Tensor x, Tensor residual, Tensor weight, float eps, str group_name{s.params_schema}, "
        f"{_NORM_FLAGS}, bool norm_unrounded_sum=False) -> (Tensor, Tensor, Tensor, Tensor)",
        check_ar_add_rms,
        lambda x, r, w, eps, group, *p: fake_add_rms(x, r, w, eps, *p),
        ar_add_rms_ref,
    )


for _scheme in SCHEMES.values():
    _define_scheme(_scheme)
