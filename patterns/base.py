"""What every fusion family provides: pattern specs, a label for each fused node, near-miss reasons.

A :class:`PatternSpec` is one ``register_replacement`` call: the search function, its replacement
(same outputs, same order), example inputs (built under fake tensors by the pass), and the scalar
arguments that are wildcards (``eps``, ``group_size``, ``rope_dim``: the pattern fires for any
value and hands the graph's value to the fused op). Custom ops are opaque in the graph, so one
pattern matches every input dtype; bool/str/dtype arguments are enumerated, one spec each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2

HOPS = (auto_functionalized, auto_functionalized_v2)


@dataclass(frozen=True)
class PatternSpec:
    family: str
    variant: str  # e.g. "mxfp4", "fp8_group_ue8m0_e4m3fn", "gptj_dsv4_fp8_v2"
    search: Callable[..., Any]
    replace: Callable[..., Any]
    example_inputs: Callable[[], Sequence[Any]]  # called under FakeTensorMode
    scalar_workaround: dict[str, float | int] = field(default_factory=dict)
    # an extra condition on the match (torch._inductor.pattern_matcher.Match) before it fires
    check: Callable[[Any], bool] | None = None

    @property
    def name(self) -> str:
        return f"{self.family}/{self.variant}"


@dataclass(frozen=True)
class GraphPatternSpec:
    """One ``register_graph_pattern`` call: a pattern and a handler that rewrites each match in
    place. For folds whose replacement depends on the matched consumer's own arguments (an
    all-reduce folded into whichever fused add-norm op reads it), which ``register_replacement``
    would need one traced spec per argument combination for. ``check`` is the extra_check."""

    family: str
    variant: str
    pattern: Any  # torch._inductor.pattern_matcher.PatternExpr
    handler: Callable[..., None]
    check: Callable[[Any], bool]

    @property
    def name(self) -> str:
        return f"{self.family}/{self.variant}"


@dataclass(frozen=True)
class NearMiss:
    family: str
    node: str
    op: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"family": self.family, "node": self.node, "op": self.op, "reason": self.reason}


@runtime_checkable
class Family(Protocol):
    """The module-level interface of each ``patterns.<family>`` module: every hook is stated
    (a family without a use for one returns 0), and the pass calls them in this order per graph:
    ``prepare`` (all families), the matchers of ``pattern_specs``, ``rewrite`` (all families),
    then ``label`` on each new node and ``near_misses`` on the result."""

    NAME: str
    STANDALONE_OPS: tuple[str, ...]  # fusion_ops op names the fusion removes
    FUSED_OPS: tuple[str, ...]  # fusion_ops op names it introduces

    def pattern_specs(self, schemes: Sequence[str]) -> list[PatternSpec | GraphPatternSpec]: ...

    def label(self, node: torch.fx.Node) -> str | None: ...

    def near_misses(self, graph: torch.fx.Graph, schemes: Sequence[str]) -> list[NearMiss]: ...

    def prepare(self, graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
        """Exact canonicalization before matching (:mod:`patterns.canonical`); rewrites done."""
        ...

    def rewrite(self, graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
        """A graph rewrite after every family's matcher (a horizontal fusion); rewrites done."""
        ...


# --- fx helpers shared by the families -----------------------------------------------------------
def functional_call(op: Any, v2: bool, kwargs: dict[str, Any], mutated: str = "kv_cache") -> Any:
    """``op`` in the functional form torch.compile gives a mutating op, for patterns: ``kwargs``
    in schema order (the order is part of a match, pitfall P2). v1:
    ``auto_functionalized(op, **kwargs)``; v2: the mutated argument left out, then
    ``_<mutated>_base_index=0, _all_bases=[it]``."""
    if not v2:
        return auto_functionalized(op, **kwargs)
    rest = {k: v for k, v in kwargs.items() if k != mutated}
    bases = {f"_{mutated}_base_index": 0, "_all_bases": [kwargs[mutated]]}
    return auto_functionalized_v2(op, **rest, **bases)


def op_name(node: torch.fx.Node) -> str | None:
    """``fusion_ops`` op name called by ``node``, directly or through auto_functionalized(_v2)."""
    if node.op != "call_function":
        return None
    target = node.target
    if target in HOPS:
        target = node.args[0]
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "fusion_ops":
        return target._opname
    return None


def op_args(node: torch.fx.Node) -> dict[str, Any]:
    """Arguments of a fusion_ops call by schema name (for HOP calls: the non-mutated kwargs)."""
    if node.target in HOPS:
        return dict(node.kwargs)
    schema = node.target._schema
    out = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    out.update({a.name: v for a, v in zip(schema.arguments, node.args, strict=False)})
    out.update(node.kwargs)
    return out


def val(node: Any) -> Any:
    """The fake value of an fx node (or the literal itself)."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )


def users_by_op(node: torch.fx.Node) -> list[str]:
    """Readable list of what consumes ``node`` (through getitem)."""
    names = []
    for user in node.users:
        names.append(op_name(user) or getattr(user.target, "__name__", str(user.target)))
    return names


def find_calls(graph: torch.fx.Graph, name: str) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if op_name(n) == name]
