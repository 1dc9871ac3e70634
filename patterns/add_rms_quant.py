"""add_rms_quant: ``fused_add_rms_norm → <scheme>_quant``  ⇒  ``add_rms_norm_<scheme>_quant``.

The fused op returns ``(q, scales, residual_out)``: the residual stream keeps flowing. Two specs
per variant: residual_out used later (the usual case) and unused (the last layer).
Must not fire: the normed output has another user; a cast between norm and quant; scheme off.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch

from fusion_ops import SCHEMES

from . import quant_variants as qv
from .base import NearMiss, PatternSpec, dtype_name, find_calls, op_name, val
from .rms_quant import explain_norm_output

NAME = "add_rms_quant"
STANDALONE_OPS = ("fused_add_rms_norm", *(s.quant_op for s in SCHEMES.values()))
FUSED_OPS = tuple(s.add_rms_op for s in SCHEMES.values())
ops = torch.ops.fusion_ops


def _spec(v: qv.QuantVariant, keep_residual: bool) -> PatternSpec:
    quant = v.quant()
    fused = getattr(ops, SCHEMES[v.scheme].add_rms_op).default
    n_out = 3 if keep_residual else 2

    def search(x: Any, residual: Any, weight: Any, eps: float, group_size: int = 0) -> Any:
        y, residual_out = ops.fused_add_rms_norm.default(x, residual, weight, eps)
        q, s = quant(y, *v.params(group_size))
        return (q, s, residual_out)[:n_out]

    def replace(x: Any, residual: Any, weight: Any, eps: float, group_size: int = 0) -> Any:
        return fused(x, residual, weight, eps, *v.params(group_size))[:n_out]

    wildcards: dict[str, float | int] = {"eps": qv.EXAMPLE_EPS}
    if v.has_group:
        wildcards["group_size"] = qv.EXAMPLE_GROUP
    else:  # drop the unused group_size parameter from the traced signature
        search = _without_group(search)
        replace = _without_group(replace)

    def example_inputs() -> list[torch.Tensor]:
        x = torch.empty(4, 256, dtype=torch.bfloat16)
        return [x, torch.empty_like(x), torch.empty(256, dtype=torch.bfloat16)]

    suffix = "" if keep_residual else "_residual_unused"
    return PatternSpec(NAME, v.name + suffix, search, replace, example_inputs, wildcards)


def _without_group(fn: Any) -> Any:
    def wrapped(x: Any, residual: Any, weight: Any, eps: float) -> Any:
        return fn(x, residual, weight, eps)

    return wrapped


def pattern_specs(schemes: Sequence[str]) -> list[PatternSpec]:
    variants = qv.variants(schemes)
    return [_spec(v, keep) for keep in (True, False) for v in variants]


def label(node: torch.fx.Node) -> str | None:
    scheme = qv.scheme_of_op(op_name(node) or "", "add_rms_norm_")
    if scheme is None:
        return None
    return f"{NAME}/{qv.label_of_call(scheme, node)}/{dtype_name(val(node.args[0]).dtype)}"


def near_misses(graph: torch.fx.Graph, schemes: Sequence[str]) -> list[NearMiss]:
    out = []
    for node in find_calls(graph, "fused_add_rms_norm"):
        normed = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if not normed:
            reason = "its normed output (item 0) is unused"
        else:
            reason = explain_norm_output(normed[0], schemes)
        out.append(NearMiss(NAME, node.name, "fused_add_rms_norm", reason))
    return out
