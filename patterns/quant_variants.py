"""The quant-scheme variants the norm+quant families register, and the labels of their matches.

A variant fixes the scheme's bool/dtype parameters (enumerated) and leaves ``group_size`` a
wildcard. Shared by :mod:`patterns.rms_quant` and :mod:`patterns.add_rms_quant`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fusion_ops import SCHEMES

from . import canonical
from .base import PatternSpec, dtype_name, op_args, op_name, val

FP8_NAMES = {torch.float8_e4m3fn: "e4m3fn", torch.float8_e4m3fnuz: "e4m3fnuz"}
EXAMPLE_GROUP = 128  # example value of the group_size wildcard
EXAMPLE_EPS = 1e-6  # example value of the eps wildcard


@dataclass(frozen=True)
class QuantVariant:
    scheme: str
    use_ue8m0: bool | None = None
    fp8_dtype: torch.dtype | None = None

    @property
    def name(self) -> str:
        return scheme_label(self.scheme, None, self.use_ue8m0, self.fp8_dtype)

    @property
    def has_group(self) -> bool:
        return self.scheme == "fp8_group"

    def params(self, group_size: Any = None) -> tuple[Any, ...]:
        """Trailing op arguments (``group_size`` is the pattern's wildcard argument)."""
        if self.fp8_dtype is None:
            return ()
        fixed = (self.use_ue8m0, self.fp8_dtype)
        return (group_size, *fixed) if self.has_group else fixed

    def quant(self) -> Callable[..., Any]:
        return getattr(torch.ops.fusion_ops, SCHEMES[self.scheme].quant_op).default


def variants(schemes: Sequence[str]) -> list[QuantVariant]:
    out = []
    for scheme in schemes:
        if scheme in ("mxfp4", "mxfp8"):
            out.append(QuantVariant(scheme))
        else:
            for ue8m0, fp8 in itertools.product((False, True), FP8_NAMES):
                out.append(QuantVariant(scheme, ue8m0, fp8))
    return out


def scheme_label(
    scheme: str, group_size: int | None, use_ue8m0: bool | None, fp8_dtype: torch.dtype | None
) -> str:
    """'mxfp4', 'fp8_per_token_e4m3fn', 'fp8_group128_ue8m0_e4m3fnuz', ..."""
    if fp8_dtype is None:
        return scheme
    head = scheme if group_size is None else f"{scheme}{group_size}"
    return "_".join([head, *(["ue8m0"] if use_ue8m0 else []), FP8_NAMES[fp8_dtype]])


def label_of_call(scheme: str, node: torch.fx.Node) -> str:
    """Label of a quant/fused-quant call from its arguments."""
    args = op_args(node)
    return scheme_label(
        scheme, args.get("group_size"), args.get("use_ue8m0"), args.get("fp8_dtype")
    )


def scheme_of_op(name: str, prefix: str) -> str | None:
    """'rms_norm_fp8_group_quant' with prefix 'rms_norm_' -> 'fp8_group'."""
    for scheme in SCHEMES:
        if name == f"{prefix}{scheme}_quant":
            return scheme
    return None


def vllm_ir_available() -> bool:
    """vLLM IR's norm ops can be defined here (``import vllm.ir`` works; imported on first use)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        importlib.import_module("vllm.ir")
    except Exception:  # noqa: BLE001 - a broken vLLM install: no vLLM IR patterns
        return False
    return hasattr(torch.ops, "vllm_ir") and hasattr(torch.ops.vllm_ir, "fused_add_rms_norm")


@functools.cache
def sources() -> tuple[str, ...]:
    """Norm op sources the norm+quant families match: ours, and vLLM IR's where it imports."""
    return ("fusion_ops", "vllm_ir") if vllm_ir_available() else ("fusion_ops",)


def is_norm(node: torch.fx.Node, add: bool) -> bool:
    """``node`` calls a matched source's ``fused_add_rms_norm`` (``add``) or ``rms_norm``."""
    if node.op != "call_function":
        return False
    return any(node.target is _norm_ops(src)[int(add)] for src in sources())


def _norm_ops(source: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(rms_norm, fused_add_rms_norm) of a source: our ops or vLLM IR's."""
    ns = torch.ops.fusion_ops if source == "fusion_ops" else torch.ops.vllm_ir
    return ns.rms_norm.default, ns.fused_add_rms_norm.default


def norm_quant_spec(
    family: str,
    v: QuantVariant,
    add: bool,
    keep_normed: bool,
    keep_residual: bool = True,
    source: str = "fusion_ops",
) -> PatternSpec:
    """The spec of ``[fused_add_]rms_norm → quant`` for one variant.

    ``keep_normed``: the normed value has users outside the pattern, so the pattern returns it
    and the fused op is called with ``return_normed=True``. ``keep_residual`` (add only): the
    residual output is used later (False: the last layer, where it is not). ``source``:
    ``fusion_ops`` (our norm ops), ``vllm_ir`` (vLLM IR's, whose rounding points the fused op
    then reproduces: ``weight_after_rounding``, and for the add ``norm_unrounded_sum``) or, for
    the add, ``plain_add`` (``x + residual`` in plain torch then our ``rms_norm``: the custom op
    reads the sum as a stored, rounded tensor, which is the fused op's ``residual_out``, so the
    rewrite is exact by construction).
    """
    scheme = SCHEMES[v.scheme]
    quant = v.quant()
    fused = getattr(torch.ops.fusion_ops, scheme.add_rms_op if add else scheme.rms_op).default
    rms, norm = _norm_ops("vllm_ir" if source == "vllm_ir" else "fusion_ops")
    numerics = () if source != "vllm_ir" else ((True, True) if add else (True,))

    def outputs(q: Any, s: Any, y: Any, residual_out: Any) -> tuple[Any, ...]:
        out = (q, s)
        if add and keep_residual:
            out += (residual_out,)
        return out + ((y,) if keep_normed else ())

    def search_impl(tensors: tuple[Any, ...], eps: float, group_size: int) -> Any:
        if source == "plain_add":  # x + residual in plain torch, then our rms_norm
            x, residual, weight = tensors
            residual_out = torch.ops.aten.add.Tensor(x, residual)
            y = torch.ops.fusion_ops.rms_norm.default(residual_out, weight, eps)
        elif add:
            y, residual_out = norm(*tensors, eps)
        else:
            y, residual_out = rms(*tensors, eps), None
        q, s = quant(y, *v.params(group_size))
        return outputs(q, s, y, residual_out)

    def replace_impl(tensors: tuple[Any, ...], eps: float, group_size: int) -> Any:
        res = fused(*tensors, eps, *v.params(group_size), keep_normed, *numerics)
        q, s = res[0], res[1]
        return outputs(q, s, res[-1], res[2] if add else None)

    # register_replacement reads argument names off the signature: spell them out
    if add and v.has_group:

        def search(x, residual, weight, eps, group_size):  # type: ignore[no-untyped-def]
            return search_impl((x, residual, weight), eps, group_size)

        def replace(x, residual, weight, eps, group_size):  # type: ignore[no-untyped-def]
            return replace_impl((x, residual, weight), eps, group_size)
    elif add:

        def search(x, residual, weight, eps):  # type: ignore[no-untyped-def]
            return search_impl((x, residual, weight), eps, 0)

        def replace(x, residual, weight, eps):  # type: ignore[no-untyped-def]
            return replace_impl((x, residual, weight), eps, 0)
    elif v.has_group:

        def search(x, weight, eps, group_size):  # type: ignore[no-untyped-def]
            return search_impl((x, weight), eps, group_size)

        def replace(x, weight, eps, group_size):  # type: ignore[no-untyped-def]
            return replace_impl((x, weight), eps, group_size)
    else:

        def search(x, weight, eps):  # type: ignore[no-untyped-def]
            return search_impl((x, weight), eps, 0)

        def replace(x, weight, eps):  # type: ignore[no-untyped-def]
            return replace_impl((x, weight), eps, 0)

    def example_inputs() -> list[torch.Tensor]:
        x = torch.empty(4, 256, dtype=torch.bfloat16)
        w = torch.empty(256, dtype=torch.bfloat16)
        return [x, torch.empty_like(x), w] if add else [x, w]

    wildcards: dict[str, float | int] = {"eps": EXAMPLE_EPS}
    if v.has_group:
        wildcards["group_size"] = EXAMPLE_GROUP
    variant = v.name + ("" if keep_residual else "_residual_unused")
    variant += "+normed" if keep_normed else ""
    variant += "" if source == "fusion_ops" else f"+{source}"
    return PatternSpec(family, variant, search, replace, example_inputs, wildcards)


def label_of_fused(family: str, prefix: str, node: torch.fx.Node) -> str | None:
    """'<family>/<scheme label>[+normed]/<x dtype>' for a fused norm+quant node, else None."""
    scheme = scheme_of_op(op_name(node) or "", prefix)
    if scheme is None:
        return None
    args = op_args(node)
    normed = "+normed" if args.get("return_normed") else ""
    source = "+vllm_ir" if args.get("weight_after_rounding") else ""
    dtype = dtype_name(val(node.args[0]).dtype)
    return f"{family}/{label_of_call(scheme, node)}{normed}{source}/{dtype}"


def sink_quant_views(
    graph: torch.fx.Graph, schemes: Sequence[str], is_normed: Callable[[torch.fx.Node], bool]
) -> int:
    """Move each enabled quant op that reads a view of a normed value (``is_normed``) above the
    views (:func:`patterns.canonical.sink_below_views`); the number moved."""
    quant_ops = {getattr(torch.ops.fusion_ops, SCHEMES[s].quant_op).default for s in schemes}
    quants = [n for n in graph.nodes if n.op == "call_function" and n.target in quant_ops]
    return sum(canonical.sink_below_views(q, is_normed) for q in quants)


def merge_duplicate_quants(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    """Calls of one enabled quant op on the same input with the same parameters become one (the
    op is a pure function: exact). Two quantized linears reading one normed value (an MLA
    layer's q-lora and kv projections, an MLP's gate and up) then leave one quant op for the
    norm to fuse with, instead of a fused op that also returns the normed value for the other.
    The number merged."""
    quant_ops = {getattr(torch.ops.fusion_ops, SCHEMES[s].quant_op).default for s in schemes}
    first: dict[tuple[Any, ...], torch.fx.Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in quant_ops:
            continue
        key = (node.target, node.args, tuple(sorted(node.kwargs.items())))
        try:
            kept = first.setdefault(key, node)
        except TypeError:  # an unhashable argument: leave it
            continue
        if kept is not node:
            node.replace_all_uses_with(kept)
            graph.erase_node(node)
            merged += 1
            items: dict[Any, torch.fx.Node] = {}
            for user in list(kept.users):  # one getitem per output, as a pattern expects
                if user.target is operator.getitem:
                    first_item = items.setdefault(user.args[1], user)
                    if first_item is not user:
                        user.replace_all_uses_with(first_item)
                        graph.erase_node(user)
    return merged
