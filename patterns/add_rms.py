"""add_rms: plain ``x + residual`` → ``rms_norm``  ⇒  ``fused_add_rms_norm`` (no quant after it).

Every transformers decoder layer ends its attention and MLP halves with ``residual + h``, then
the next norm. ``rms_norm`` reads the sum as a stored tensor of x's dtype: aten's add of two
16-bit tensors is the fp32 sum rounded once, which is exactly the fused op's ``residual_out``,
and the fused op normalizes that rounded sum, so the rewrite is exact. Runs after the
norm+quant families (a norm that feeds a quant op becomes ``add_rms_norm_<scheme>_quant``
there) and before ``ar_add_rms_quant`` (which folds an all-reduce into the fused op).

Two specs: the sum used later (the residual stream; the fused op's ``residual_out`` replaces
it) or not. Must not fire (the fused op's validation refuses): operands of different dtypes or
shapes (a broadcast), an add with ``alpha``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import NearMiss, PatternSpec, dtype_name, find_calls, op_name, val

NAME = "add_rms"
STANDALONE_OPS = ("rms_norm",)
FUSED_OPS = ("fused_add_rms_norm",)
ops = torch.ops.fusion_ops
aten = torch.ops.aten
EXAMPLE_EPS = 1e-6


def _spec(keep_residual: bool) -> PatternSpec:
    def search(x, residual, weight, eps):  # type: ignore[no-untyped-def]
        total = aten.add.Tensor(x, residual)
        y = ops.rms_norm.default(total, weight, eps)
        return (y, total) if keep_residual else y

    def replace(x, residual, weight, eps):  # type: ignore[no-untyped-def]
        y, residual_out = ops.fused_add_rms_norm.default(x, residual, weight, eps)
        return (y, residual_out) if keep_residual else y

    def example_inputs() -> list[torch.Tensor]:
        x = torch.empty(4, 256, dtype=torch.bfloat16)
        return [x, torch.empty_like(x), torch.empty(256, dtype=torch.bfloat16)]

    variant = "plain_add" + ("" if keep_residual else "_residual_unused")
    return PatternSpec(NAME, variant, search, replace, example_inputs, {"eps": EXAMPLE_EPS})


def pattern_specs(schemes: Sequence[str]) -> list[PatternSpec]:
    # the sum unused elsewhere first: the first pattern that matches an anchor wins
    return [_spec(keep_residual=False), _spec(keep_residual=True)]


def prepare(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    return 0


def rewrite(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    return 0  # no graph rewrite after the matchers


def label(node: torch.fx.Node) -> str | None:
    """'add_rms/plain_add/<x dtype>' for a ``fused_add_rms_norm`` this family creates."""
    if op_name(node) != "fused_add_rms_norm":
        return None
    return f"{NAME}/plain_add/{dtype_name(val(node.args[0]).dtype)}"


def near_misses(graph: torch.fx.Graph, schemes: Sequence[str]) -> list[NearMiss]:
    """Every ``rms_norm`` left that reads a plain add, with why."""
    out = []
    for norm in find_calls(graph, "rms_norm"):
        total = norm.args[0]
        if not isinstance(total, torch.fx.Node) or total.target is not aten.add.Tensor:
            continue
        out.append(NearMiss(NAME, norm.name, "rms_norm", _explain(total)))
    return out


def _explain(total: torch.fx.Node) -> str:
    if total.kwargs:
        return f"the add has keyword arguments {sorted(total.kwargs)} (alpha): not a plain sum"
    a, b = (val(t) for t in total.args[:2])
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return "the add has a scalar operand: not a residual sum"
    if a.dtype != b.dtype:
        return f"the add's operands differ in dtype ({dtype_name(a.dtype)}, {dtype_name(b.dtype)})"
    if a.shape != b.shape:
        return f"the add broadcasts ({tuple(a.shape)} + {tuple(b.shape)}): not a residual sum"
    return "structure matched a registered pattern but its re-check failed"
