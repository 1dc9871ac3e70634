"""rms_quant: ``rms_norm → <scheme>_quant``  ⇒  ``rms_norm_<scheme>_quant``.

The normed value may have other users (a router gate next to the expert quant): the fused op
then also returns it (``return_normed=True``, label suffix ``+normed``). Must not fire (and does
not): a cast sits between the norm and the quant (a dtype change); the scheme is not enabled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusion_ops import SCHEMES

from . import canonical, plain_norms
from . import quant_variants as qv
from .base import NearMiss, PatternSpec, dtype_name, find_calls, op_name, users_by_op, val

NAME = "rms_quant"
STANDALONE_OPS = ("rms_norm", *(s.quant_op for s in SCHEMES.values()))
FUSED_OPS = tuple(s.rms_op for s in SCHEMES.values())
ops = torch.ops.fusion_ops


def pattern_specs(schemes: Sequence[str]) -> list[PatternSpec]:
    # plain before +normed: the first pattern that matches an anchor wins, and the plain one
    # must win wherever the normed value has no other user
    return [
        qv.norm_quant_spec(NAME, v, add=False, keep_normed=keep_normed, source=source)
        for source in qv.sources()
        for keep_normed in (False, True)
        for v in qv.variants(schemes)
    ]


def prepare(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    """Duplicate quant calls merged (:func:`patterns.quant_variants.merge_duplicate_quants`);
    ``quant(rms_norm(x).reshape(…))`` → the quant on the norm's output, then the view."""
    merged = qv.merge_duplicate_quants(graph, schemes)
    return merged + qv.sink_quant_views(graph, schemes, lambda n: qv.is_norm(n, add=False))


def rewrite(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    return 0  # no graph rewrite after the matchers


def label(node: torch.fx.Node) -> str | None:
    """'rms_quant/<scheme label>[+normed]/<x dtype>' for a fused node this family creates."""
    return qv.label_of_fused(NAME, "rms_norm_", node)


def near_misses(graph: torch.fx.Graph, schemes: Sequence[str]) -> list[NearMiss]:
    """Every ``rms_norm`` left in the graph, with why it was not fused (vLLM IR's: those a quant
    op consumes)."""
    out = []
    for node in find_calls(graph, "rms_norm"):
        out.append(NearMiss(NAME, node.name, "rms_norm", explain_norm_output(node, schemes)))
    for node in graph.nodes:
        if qv.is_norm(node, add=False) and op_name(node) is None and feeds_quant(node):
            reason = explain_norm_output(node, schemes)
            out.append(NearMiss(NAME, node.name, "vllm_ir.rms_norm", reason))
    plain = {norm[3]: norm[0] for norm in plain_norms.find(graph)}  # output -> spelling
    for node in graph.nodes:
        name = op_name(node) or ""
        if name.endswith("_quant") and name.removesuffix("_quant") in SCHEMES:
            src, _ = canonical.view_chain(node.args[0])
            if plain.get(src) == "weightless":
                out.append(NearMiss(NAME, node.name, name, WEIGHTLESS_REASON))
            elif src in plain:
                out.append(NearMiss(NAME, node.name, name, PLAIN_NORM_REASON))
            elif _plain_torch_norm(node.args[0]):
                out.append(NearMiss(NAME, node.name, name, UNKNOWN_NORM_REASON))
    return out


WEIGHTLESS_REASON = (
    "its input is a weightless RMSNorm in plain PyTorch: no fused norm+quant op takes a norm "
    "without a weight"
)
UNKNOWN_NORM_REASON = (
    "its input looks like an RMSNorm in plain PyTorch (rsqrt of a mean) but not one of the "
    'spellings numerics="tolerant" fuses (patterns.plain_norms: 16-bit x upcast, the mean '
    "of its squares over the last dim, one weight per column); an intermediate with other "
    "users or a mean over another dim also stops it"
)


PLAIN_NORM_REASON = (
    "its input is an RMSNorm written in plain PyTorch (rsqrt of a mean): not fused, because "
    "Inductor computes that reduction in its own order, which no fused op reproduces bit for "
    'bit; build FusionPass(numerics="tolerant") to fuse it within a tested bound, or use '
    "fusion_ops.rms_norm (or vLLM IR's)"
)
_POINTWISE = {
    torch.ops.aten.mul.Tensor,
    torch.ops.aten.add.Tensor,
    torch.ops.aten.rsqrt.default,
    torch.ops.prims.convert_element_type.default,
}


def _plain_torch_norm(node: object, depth: int = 6) -> bool:
    """``node`` is (through views and ≤ ``depth`` pointwise ops) ``… rsqrt(mean(…)) …``."""
    src, _ = canonical.view_chain(node) if isinstance(node, torch.fx.Node) else (node, [])
    if not isinstance(src, torch.fx.Node) or src.op != "call_function" or depth == 0:
        return False
    if src.target is torch.ops.aten.rsqrt.default:
        arg = src.args[0]
        return any(
            isinstance(a, torch.fx.Node) and a.target is torch.ops.aten.mean.dim
            for a in (arg, *getattr(arg, "args", ()))
        )
    if src.target not in _POINTWISE:
        return False
    return any(_plain_torch_norm(a, depth - 1) for a in src.args if isinstance(a, torch.fx.Node))


def feeds_quant(normed: torch.fx.Node) -> bool:
    """A quant op consumes ``normed`` (directly, through views or a cast)."""
    return bool(
        canonical.consumers_through_views(
            normed,
            lambda u: (
                (op_name(u) or "").endswith("_quant")
                or (
                    u.target is torch.ops.prims.convert_element_type.default
                    and any((op_name(c) or "").endswith("_quant") for c in u.users)
                )
            ),
        )
    )


def explain_norm_output(normed: torch.fx.Node, schemes: Sequence[str]) -> str:
    """Why the normed value ``normed`` did not feed a fusion (shared with add_rms_quant)."""
    users = list(normed.users)
    is_quant = lambda u: (op_name(u) or "").endswith("_quant")  # noqa: E731
    quant_users = canonical.consumers_through_views(normed, is_quant)
    if not quant_users:
        casts = [u for u in users if u.target is torch.ops.prims.convert_element_type.default]
        for cast in casts:
            if any(is_quant(c) for c in cast.users):
                return (
                    f"dtype {dtype_name(val(cast).dtype)} vs {dtype_name(val(normed).dtype)}: "
                    "a cast sits between the norm and the quant op"
                )
        view = canonical.blocking_view(normed, is_quant)
        if view is not None:
            return (
                f"a view between the norm and the quant op changes the rows "
                f"({canonical.describe_view(view)}): only views that keep the last dim are "
                "seen through"
            )
        return f"no quant op consumes it (users: {', '.join(users_by_op(normed)) or 'none'})"
    if len(users) > 1:
        return (
            f"normed output has {len(users)} users ({', '.join(users_by_op(normed))}); "
            "the fused op does not return the unquantized value"
        )
    scheme = (op_name(quant_users[0]) or "").removesuffix("_quant")
    if scheme not in schemes:
        return f"quant scheme {scheme!r} is not enabled in this pass (enabled: {list(schemes)})"
    return (
        "structure matched a registered pattern but its re-check failed "
        "(see TORCHINDUCTOR_PATTERN_MATCH_DEBUG)"
    )
