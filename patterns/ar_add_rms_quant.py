"""ar_add_rms_quant: tensor-parallel ``all_reduce → fused_add_rms_norm [→ quant]`` ⇒ one op.

How torch.compile traces tensor-parallel code (``funcol.all_reduce(x, "sum", group)`` or
``dist.all_reduce`` on a functional graph)::

    s = wait_tensor(_c10d_functional.all_reduce(x, "sum", group_name))
    add_rms_norm_<scheme>_quant(s, residual, w, eps, *p)
        ⇒ all_reduce_add_rms_norm_<scheme>_quant(x, residual, w, eps, group_name, *p)
    fused_add_rms_norm(s, residual, w, eps)
        ⇒ all_reduce_fused_add_rms_norm(x, residual, w, eps, group_name)

The family runs after ``add_rms_quant`` and folds the all-reduce into whichever add-norm op reads
it: every scheme, every numerics flag, ``+normed``, every source that family fuses (our ops,
vLLM IR's, plain ``x + r``) come for free, and the fused op's bytes are the unfused graph's by
definition (:mod:`fusion_ops.reference.collective`). The sum may sit in the ``residual`` place
(``x + residual`` is commutative in fp32). With ``add_rms_quant`` disabled only the no-quant
form fires.

Views between the all-reduce and the norm are moved onto the all-reduce's input first
(:func:`prepare`: exact, a sum over ranks is elementwise). Must not fire: a reduction other
than sum; the reduced value with any other user (e.g. the
in-place ``dist.all_reduce(x)`` form copies it back into x) or read twice by the norm; a quant
scheme that is not enabled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch._inductor.pattern_matcher as pm

from fusion_ops import SCHEMES

from . import canonical
from . import quant_variants as qv
from .base import GraphPatternSpec, NearMiss, dtype_name, op_name, users_by_op, val

NAME = "ar_add_rms_quant"
NO_QUANT = "ar_add_rms"  # the variant label of the no-quant form
STANDALONE_OPS = ("fused_add_rms_norm", *(s.add_rms_op for s in SCHEMES.values()))
FUSED_OPS = (
    "all_reduce_fused_add_rms_norm",
    *(s.ar_add_rms_op for s in SCHEMES.values()),
)
AR_PREFIX = "all_reduce_"
_c10d = torch.ops._c10d_functional
ops = torch.ops.fusion_ops


def _add_norm_ops(schemes: Sequence[str]) -> set[str]:
    """The add-norm ops an all-reduce folds into."""
    return {"fused_add_rms_norm", *(SCHEMES[s].add_rms_op for s in schemes)}


_ALL_ADD_OPS = _add_norm_ops(tuple(SCHEMES))


def _reduced_pattern() -> pm.PatternExpr:
    reduce = pm.CallFunction(
        _c10d.all_reduce.default, pm.KeywordArg("x"), "sum", pm.KeywordArg("group_name"), _users=1
    )
    return pm.CallFunction(_c10d.wait_tensor.default, reduce)


def _consumer(wait: torch.fx.Node, schemes: Sequence[str]) -> tuple[torch.fx.Node, int] | None:
    """(the add-norm op reading ``wait``, the place it reads it: 0 x, 1 residual), or None when
    the fold would not be exact."""
    if len(wait.users) != 1:
        return None
    user = next(iter(wait.users))
    if op_name(user) not in _add_norm_ops(schemes) or user.kwargs:
        return None
    places = [i for i, a in enumerate(user.args) if a is wait]
    if len(places) != 1 or places[0] > 1:
        return None
    return user, places[0]


def pattern_specs(schemes: Sequence[str]) -> list[GraphPatternSpec]:
    def check(match: pm.Match) -> bool:
        return _consumer(match.output_node(), schemes) is not None

    def fold(match: pm.Match, x: torch.fx.Node, group_name: str) -> None:
        wait = match.output_node()
        found = _consumer(wait, schemes)
        assert found is not None  # check() passed
        norm, place = found
        graph = wait.graph
        args = list(norm.args)
        args[place] = args[1 - place]  # x + residual == residual + x in fp32
        args[0] = x
        fused = getattr(ops, AR_PREFIX + op_name(norm)).default
        with graph.inserting_before(norm):
            new = graph.call_function(fused, (*args[:4], group_name, *args[4:]))
        new.meta.update(norm.meta)  # eager_input_vals: rebuilt by FusionPass for new nodes
        norm.replace_all_uses_with(new)
        reduce = wait.args[0]
        for node in (norm, wait, reduce):
            graph.erase_node(node)

    return [GraphPatternSpec(NAME, "all_reduce_sum", _reduced_pattern(), fold, check)]


def prepare(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    """``norm(views(wait(all_reduce(x))))`` → ``norm(wait(all_reduce(views(x))))``: a sum over
    ranks is elementwise, so it commutes with any view (e.g. an all-reduce of ``[B, T, H]``
    normed as ``[-1, H]``). Done where the chain (each view used once) reaches an add-norm op or
    an add (the plain ``x + r`` source); the number rewritten."""
    done = 0
    for reduce in [n for n in graph.nodes if n.target is _c10d.all_reduce.default]:
        wait = next(iter(reduce.users)) if len(reduce.users) == 1 else None
        if wait is None or wait.target is not _c10d.wait_tensor.default:
            continue
        views = canonical.single_use_views(wait)
        if not views or not any(_reads_reduced(u) for u in views[-1].users):
            continue
        with graph.inserting_before(views[-1]):  # every size argument is defined by then
            x = canonical.replay_views(graph, views, reduce.args[0])
            moved = canonical.call(graph, reduce.target, (x, *reduce.args[1:]), reduce.kwargs)
            waited = canonical.call(graph, wait.target, (moved,))
        views[-1].replace_all_uses_with(waited)
        canonical.erase_if_unused([reduce, wait, *views])
        done += 1
    return done


def _reads_reduced(node: torch.fx.Node) -> bool:
    """An add-norm op (ours, vLLM IR's) or an add: what the fold can start from."""
    return (
        qv.is_norm(node, add=True)
        or op_name(node) in _ALL_ADD_OPS
        or node.target is torch.ops.aten.add.Tensor
    )


def rewrite(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    return 0  # no graph rewrite after the matchers


def label(node: torch.fx.Node) -> str | None:
    """'ar_add_rms_quant/<scheme label>[+normed]/<dtype>', '…/ar_add_rms/<dtype>' for the
    no-quant op."""
    if op_name(node) == "all_reduce_fused_add_rms_norm":
        return f"{NAME}/{NO_QUANT}/{dtype_name(val(node.args[0]).dtype)}"
    return qv.label_of_fused(NAME, AR_PREFIX + "add_rms_norm_", node)


def near_misses(graph: torch.fx.Graph, schemes: Sequence[str]) -> list[NearMiss]:
    """Every all-reduce left whose result reaches an add-norm op, with why it was not folded."""
    out = []
    for node in graph.nodes:
        if node.target is not _c10d.all_reduce.default:
            continue
        waits = [u for u in node.users if u.target is _c10d.wait_tensor.default]
        if not waits:
            continue
        wait = waits[0]
        is_norm = lambda u: qv.is_norm(u, add=True) or op_name(u) in _ALL_ADD_OPS  # noqa: E731
        norms = canonical.consumers_through_views(wait, is_norm)
        if not norms:
            continue
        out.append(NearMiss(NAME, node.name, "all_reduce", _why(node, wait, norms[0], schemes)))
    return out


def _why(reduce: torch.fx.Node, wait: torch.fx.Node, norm: torch.fx.Node, schemes: Any) -> str:
    reduce_op = reduce.args[1]
    if reduce_op != "sum":
        return f"reduce op {reduce_op!r}: only 'sum' is fused"
    if norm not in wait.users:
        return (
            "views between the all-reduce and the norm have other users "
            f"({', '.join(users_by_op(wait))}); the fused op does not return the reduced value"
        )
    if len(reduce.users) != 1 or len(wait.users) != 1:
        return (
            f"the reduced value has {len(wait.users)} users ({', '.join(users_by_op(wait))}); "
            "the fused op does not return it"
        )
    name = op_name(norm)
    if name is None:
        return (
            "it feeds vLLM IR's fused_add_rms_norm with no quant op after it "
            "(no fused op has its numerics)"
        )
    if name not in _add_norm_ops(schemes):
        return f"quant op {name!r} is not enabled in this pass (enabled: {list(schemes)})"
    if norm.kwargs or [a is wait for a in norm.args].count(True) != 1:
        return "the norm reads the reduced value in more than one place"
    return "the norm reads the reduced value as its weight"
