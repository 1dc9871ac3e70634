"""Graph canonicalization before matching: the spellings a pattern does not need to know.

Run by the pass before the matchers, through each family's ``prepare(graph, schemes)``. Every
rewrite here is exact (same values, same bytes), so it is safe whether or not a fusion follows.

* **Views between the ops of a fusion.** A row-wise op (quant, cast, rope) commutes with a view
  that keeps the rows: ``quant(y.reshape(-1, K)) == quant(y) (then the same reshape)`` when the
  view leaves the last dim unchanged, because reshape/view/squeeze/unsqueeze keep row-major
  element order, so each row of the view is a row of ``y``. :func:`sink_below_views` moves the
  consumer above the view chain and replays the chain on each of its outputs (the last dim
  replaced by the output's own); :func:`hoist_views_above` moves a view chain from a row-wise
  producer's output to its input. A view that changes the last dim mixes rows: left alone.
* **Program order of independent ops.** Inductor binds the further outputs of a multi-output
  pattern to the first matching user, in user-insertion order, without backtracking
  (``MultiOutputPattern._match_from_anchors``); :func:`move_user_last` lets a family put the
  node that must not be picked first at the end of that order.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .base import val

aten = torch.ops.aten
#: view ops whose size argument (args[1]) names every output dim
SIZED_VIEWS = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
#: view ops with a dim argument; replayed with the same dims on tensors of the same rank
DIM_VIEWS = (aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims)
VIEW_OPS = SIZED_VIEWS + DIM_VIEWS


def is_view(node: Any) -> bool:
    is_call = isinstance(node, torch.fx.Node) and node.op == "call_function"
    return is_call and node.target in VIEW_OPS


def view_chain(node: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """(source, views) with ``node = views[-1](…views[0](source))``; no views: (node, [])."""
    views = []
    while is_view(node):
        views.append(node)
        node = node.args[0]
    return node, views[::-1]


def _same(a: Any, b: Any) -> bool:
    return statically_known_true(a == b)


def keeps_rows(view: torch.fx.Node) -> bool:
    """The view leaves the last dim unchanged, and a squeeze/unsqueeze does not touch it."""
    src, out = val(view.args[0]), val(view)
    if src is None or out is None or src.dim() == 0 or out.dim() == 0:
        return False
    if not _same(src.shape[-1], out.shape[-1]):
        return False
    if view.target is aten.unsqueeze.default:
        return view.args[1] % out.dim() < out.dim() - 1
    if view.target in (aten.squeeze.dim, aten.squeeze.dims):
        dims = view.args[1] if isinstance(view.args[1], Sequence) else [view.args[1]]
        return all(d % src.dim() < src.dim() - 1 for d in dims)
    return True


def _fake_call(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The fake value of ``target(*args)`` from the args' fake values."""
    args_v, kwargs_v = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    leaves = [a for a in torch.utils._pytree.tree_leaves((args_v, kwargs_v))]
    mode = torch._guards.detect_fake_mode(leaves)
    with mode if mode is not None else contextlib.nullcontext():
        return target(*args_v, **kwargs_v)


def call(graph: torch.fx.Graph, target: Any, args: tuple[Any, ...], kwargs=None) -> torch.fx.Node:
    """A new call node (at the graph's insertion point) with its fake value filled in."""
    kwargs = dict(kwargs or {})
    node = graph.call_function(target, args, kwargs)
    node.meta["val"] = _fake_call(target, args, kwargs)
    return node


def replay_views(
    graph: torch.fx.Graph,
    views: Sequence[torch.fx.Node],
    source: torch.fx.Node,
    rows_differ: bool = False,
) -> torch.fx.Node:
    """``views`` applied to ``source`` (same ops and arguments). With ``rows_differ`` (an
    output whose rows have another length, e.g. packed codes or scales), each sized view gets
    ``source``'s row length as its last dim (an int, or ``sym_size(source, -1)`` when symbolic)."""
    row = val(source).shape[-1]
    if rows_differ and not isinstance(row, int):
        row = call(graph, aten.sym_size.int, (source, val(source).dim() - 1))
    node = source
    for view in views:
        rest = list(view.args[1:])
        if rows_differ and view.target in SIZED_VIEWS:
            rest[0] = [*view.args[1][:-1], row]
        node = call(graph, view.target, (node, *rest), view.kwargs)
    return node


def erase_if_unused(nodes: Sequence[torch.fx.Node]) -> None:
    """Erase ``nodes`` (given in program order) that are left without users, last first."""
    for node in reversed(nodes):
        if not node.users and node.graph is not None:
            node.graph.erase_node(node)


def sink_below_views(consumer: torch.fx.Node, is_source: Callable[[torch.fx.Node], bool]) -> bool:
    """``consumer(views(y), *rest)`` → ``views'(consumer(y, *rest))`` for a row-wise consumer
    whose outputs keep the input's leading dims (quant ops: tuple outputs read through
    getitem; casts: one tensor). Done only when ``is_source(y)`` and every view keeps rows.
    True when rewritten."""
    y, views = view_chain(consumer.args[0])
    if not views or not is_source(y) or not all(keeps_rows(v) for v in views):
        return False
    tuple_out = isinstance(val(consumer), (tuple, list))
    outputs = list(consumer.users) if tuple_out else [consumer]
    if tuple_out and not all(u.target is operator.getitem for u in outputs):
        return False
    in_len = val(y).shape[-1]
    differ = [not _same(val(o).shape[-1], in_len) for o in outputs]
    graph = consumer.graph
    with graph.inserting_before(consumer):
        moved = call(graph, consumer.target, (y, *consumer.args[1:]), consumer.kwargs)
        for out, rows_differ in zip(outputs, differ, strict=True):
            item = call(graph, operator.getitem, (moved, out.args[1])) if tuple_out else moved
            out.replace_all_uses_with(replay_views(graph, views, item, rows_differ))
    erase_if_unused([*views, consumer, *(outputs if tuple_out else [])])
    return True


def hoist_views_above(producer: torch.fx.Node, input_index: int, keep_first: bool = True) -> bool:
    """``views(producer(…, x, …))`` → ``producer(…, views(x), …)`` for a producer whose output
    has its input's shape and whose only user is the chain (each view used once), where the
    chain's result has the producer's last dim and, with ``keep_first``, its first dim (rope:
    tokens, head dim; a row-wise norm needs only the last): views keep row-major order, so each
    row stays whole (and with its token). True when rewritten."""
    views = single_use_views(producer)
    if not views or len(views[-1].users) == 0:
        return False
    start, end = val(producer), val(views[-1])
    if start.dim() == 0 or end.dim() == 0:
        return False
    if keep_first and not _same(start.shape[0], end.shape[0]):
        return False
    if not _same(start.shape[-1], end.shape[-1]):
        return False
    graph = producer.graph
    with graph.inserting_before(views[-1]):  # every size argument is defined by then
        x = replay_views(graph, views, producer.args[input_index])
        args = list(producer.args)
        args[input_index] = x
        moved = call(graph, producer.target, tuple(args), producer.kwargs)
    views[-1].replace_all_uses_with(moved)
    erase_if_unused([producer, *views])
    return True


def single_use_views(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The chain of views hanging off ``node`` where each link is the only user of the one
    before (``views[-1]`` may have several users)."""
    views = []
    while len(node.users) == 1 and is_view(next(iter(node.users))):
        node = next(iter(node.users))
        views.append(node)
    return views


def consumers_through_views(
    node: torch.fx.Node, is_consumer: Callable[[torch.fx.Node], bool]
) -> list[torch.fx.Node]:
    """Consumers of ``node`` reached directly or through views that keep rows."""
    out, stack = [], [node]
    while stack:
        for user in stack.pop().users:
            if is_consumer(user):
                out.append(user)
            elif is_view(user) and keeps_rows(user):
                stack.append(user)
    return out


def blocking_view(
    node: torch.fx.Node, is_consumer: Callable[[torch.fx.Node], bool]
) -> torch.fx.Node | None:
    """The first view on a view path from ``node`` to a consumer that does not keep rows
    (why :func:`sink_below_views` left it), else None."""
    stack = [u for u in node.users if is_view(u)]
    while stack:
        view = stack.pop()
        users = list(view.users)
        if any(is_consumer(u) for u in users) or any(is_view(u) for u in users):
            if not keeps_rows(view):
                return view
            stack.extend(u for u in users if is_view(u))
    return None


def describe_view(view: torch.fx.Node) -> str:
    src, out = val(view.args[0]), val(view)
    name = getattr(view.target, "__name__", str(view.target))
    return f"{name} {tuple(src.shape)} -> {tuple(out.shape)}"


def move_user_last(node: torch.fx.Node, user: torch.fx.Node) -> None:
    """Put ``user`` at the end of ``node.users`` (the order Inductor tries anchors in)."""
    if user in node.users:
        node.users[user] = node.users.pop(user)
