"""Helpers for users' pytest: compile with a fresh Inductor cache, count ops, assert replacement.

    from fusion_passes import FusionPass
    from fusion_passes.testing import run_compiled, assert_fully_replaced, assert_bitwise_equal

    p = FusionPass(keep_graphs=True)
    out = run_compiled(fn, *args, fusion_pass=p)        # raises PassDidNotRun on a warm cache
    assert p.match_table == {"rms_quant/mxfp4/bf16": 2}
    assert_fully_replaced(p, ["rms_norm", "mxfp4_quant"])
    assert_bitwise_equal(out, fn(*args))

A warm FX-graph cache serves the compiled graph without running post-grad passes: the pass then
counts 0 matches although the compiled code is fused. ``run_compiled`` compiles with caches
disabled and checks that the pass really saw a graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch._functorch.config

from .accounting import count_fusion_ops
from .fusion_pass import FusionPass


class PassDidNotRun(AssertionError):
    """The compile produced no graph for the pass (a warm cache served it, or no graph compiled)."""


@contextlib.contextmanager
def fresh_inductor() -> Iterator[None]:
    """Dynamo reset, and the caches that serve a compiled graph without running post-grad passes
    off (Inductor's FX graph cache, AOTAutograd's cache), for the duration.

    Inductor's code caches stay on: a generated kernel whose source was compiled before is
    loaded, not rebuilt by the C++ compiler (they never skip a pass: a graph the pass rewrote
    generates other source)."""
    torch._dynamo.reset()
    graph_caches = {"fx_graph_cache": False, "fx_graph_remote_cache": False}
    with (
        torch._inductor.config.patch(graph_caches),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        yield
    torch._dynamo.reset()


def compile_fn(
    fn: Callable[..., Any],
    fusion_pass: FusionPass | None,
    dynamic: bool | None = None,
    fullgraph: bool = True,
) -> Callable[..., Any]:
    """``torch.compile`` with the pass as ``post_grad_custom_post_pass`` (or without a pass)."""
    options = {"post_grad_custom_post_pass": fusion_pass} if fusion_pass is not None else {}
    return torch.compile(fn, options=options, dynamic=dynamic, fullgraph=fullgraph)


def run_compiled(
    fn: Callable[..., Any],
    *args: Any,
    fusion_pass: FusionPass | None,
    dynamic: bool | None = None,
    fullgraph: bool = True,
    fresh: bool = True,
    calls: Iterable[tuple[Any, ...]] = (),
) -> Any:
    """Compile ``fn``, run it on ``args`` (then on each of ``calls``), return the first output.

    With ``fresh`` (default) caches are off, so the pass runs. Either way, if a pass is given and
    saw no new graph, :class:`PassDidNotRun` is raised instead of a silent count of 0.
    """
    seen = len(fusion_pass.graphs) if fusion_pass is not None else 0
    ctx = fresh_inductor() if fresh else contextlib.nullcontext()
    with ctx:
        compiled = compile_fn(fn, fusion_pass, dynamic=dynamic, fullgraph=fullgraph)
        out = compiled(*args)
        for more in calls:
            compiled(*more)
    if fusion_pass is not None and len(fusion_pass.graphs) == seen:
        raise PassDidNotRun(
            "the fusion pass saw no graph: the compiled code came from a warm Inductor/AOTAutograd "
            "cache (post-grad passes do not run then) — compile under fusion_passes.testing."
            "fresh_inductor() or torch._inductor.config.patch(fx_graph_cache=False)"
        )
    return out


def op_counts(fusion_pass: FusionPass, stage: str = "after") -> dict[str, int]:
    """``fusion_ops`` op calls summed over every graph the pass saw (``stage``: before/after)."""
    if stage not in ("before", "after"):
        raise ValueError(f"op_counts: stage {stage!r}; expected 'before' or 'after'")
    total: dict[str, int] = {}
    for record in fusion_pass.graphs:
        counts = record.ops_before if stage == "before" else record.ops_after
        for name, n in counts.items():
            total[name] = total.get(name, 0) + n
    return total


def near_miss_reasons(fusion_pass: FusionPass, family: str) -> list[str]:
    """The reasons, in words, of every near miss of ``family`` over the graphs the pass saw."""
    return [m.reason for g in fusion_pass.graphs for m in g.near_misses if m.family == family]


def count_op(graph: torch.fx.Graph, op: str) -> int:
    """Calls of ``fusion_ops.<op>`` in ``graph`` (auto_functionalized v1 and v2 included)."""
    return count_fusion_ops(graph).get(op, 0)


def assert_fully_replaced(fusion_pass: FusionPass, ops: Iterable[str]) -> None:
    """Each op was in the graphs before the pass and none is left after it."""
    before, after = op_counts(fusion_pass, "before"), op_counts(fusion_pass, "after")
    problems = []
    for op in ops:
        if before.get(op, 0) == 0:
            problems.append(f"{op}: not in any graph before the pass (nothing to replace)")
        elif after.get(op, 0):
            problems.append(f"{op}: {before[op]} before → {after[op]} left after the pass")
    if problems:
        misses = [m.as_dict() for g in fusion_pass.graphs for m in g.near_misses]
        raise AssertionError(
            "not fully replaced:\n  " + "\n  ".join(problems) + f"\nnear misses: {misses}"
        )


def assert_ops_present(fusion_pass: FusionPass, ops: Iterable[str]) -> None:
    """Each op is in the graphs after the pass and was not before (the fused ops)."""
    before, after = op_counts(fusion_pass, "before"), op_counts(fusion_pass, "after")
    missing = [op for op in ops if not after.get(op) or before.get(op)]
    if missing:
        raise AssertionError(
            f"expected new after the pass: {missing}; before={before} after={after}"
        )


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    if t.dtype.is_floating_point:
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        return t.view(ints[t.element_size()])
    return t


def assert_bitwise_equal(actual: Any, expected: Any, name: str = "output") -> None:
    """Nested outputs are equal bit for bit (NaN payloads included; fp8 compared as bytes)."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            raise AssertionError(f"{name}: expected a tensor, got {type(actual).__name__}")
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            raise AssertionError(
                f"{name}: {actual.dtype}{tuple(actual.shape)} vs {expected.dtype}"
                f"{tuple(expected.shape)}"
            )
        diff = (_bits(actual) != _bits(expected)).sum().item()
        if diff:
            raise AssertionError(f"{name}: {diff} of {expected.numel()} elements differ bitwise")
        return
    if isinstance(expected, (tuple, list)):
        if len(actual) != len(expected):
            raise AssertionError(f"{name}: {len(actual)} items vs {len(expected)}")
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_bitwise_equal(a, e, f"{name}[{i}]")
        return
    if actual != expected:
        raise AssertionError(f"{name}: {actual!r} != {expected!r}")


def ulp(reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each value of ``reference`` (fp64; subnormal
    values get the smallest normal's)."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(reference.double().abs().clamp_min(info.tiny)))
    return torch.exp2(exponent) * info.eps


def excess_ulps(fused: torch.Tensor, unfused: torch.Tensor, reference: torch.Tensor) -> float:
    """How much further from ``reference`` (an fp64 evaluation of the same math) ``fused`` is
    than ``unfused``, at worst over the elements, in units in the last place of their dtype."""
    if fused.dtype != unfused.dtype or fused.shape != unfused.shape:
        raise ValueError(
            f"excess_ulps: fused {fused.dtype}{tuple(fused.shape)} vs unfused "
            f"{unfused.dtype}{tuple(unfused.shape)}"
        )
    ref = reference.double()
    gap = (fused.double() - ref).abs() - (unfused.double() - ref).abs()
    return float((gap / ulp(ref, fused.dtype)).max()) if gap.numel() else 0.0


def assert_within_tolerance(
    fused: torch.Tensor,
    unfused: torch.Tensor,
    reference: torch.Tensor,
    ulps: float | None = None,
    name: str = "normed",
) -> None:
    """The tolerant-numerics contract on a normed value: ``fused`` is at most ``ulps`` (default
    :data:`patterns.plain_norms.BOUND_ULPS`) units in the last place further from the fp64
    ``reference`` than ``unfused`` (the compile without the pass) is, everywhere."""
    from patterns.plain_norms import BOUND_ULPS

    bound = BOUND_ULPS if ulps is None else ulps
    excess = excess_ulps(fused, unfused, reference)
    if not excess <= bound:
        differ = int((_bits(fused) != _bits(unfused)).sum())
        raise AssertionError(
            f"{name}: {excess:.3g} ulps further from the fp64 reference than the compile "
            f"without the pass (bound {bound}); {differ} of {fused.numel()} elements differ"
        )
