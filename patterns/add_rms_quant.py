"""add_rms_quant: ``fused_add_rms_norm → <scheme>_quant``  ⇒  ``add_rms_norm_<scheme>_quant``.

The fused op returns ``(q, scales, residual_out, normed_or_empty)``: the residual stream keeps
flowing. Four specs per variant: residual_out used later (the usual case) or unused (the last
layer), times the normed value private or also used elsewhere (``+normed``).
Must not fire: a cast between norm and quant; scheme off.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from fusion_ops import SCHEMES

from . import quant_variants as qv
from .base import NearMiss, PatternSpec, op_name
from .rms_quant import explain_norm_output, feeds_quant

NAME = "add_rms_quant"
STANDALONE_OPS = ("fused_add_rms_norm", *(s.quant_op for s in SCHEMES.values()))
FUSED_OPS = tuple(s.add_rms_op for s in SCHEMES.values())
ops = torch.ops.fusion_ops


def pattern_specs(schemes: Sequence[str]) -> list[PatternSpec]:
    variants = qv.variants(schemes)
    return [
        qv.norm_quant_spec(
            NAME, v, add=True, keep_normed=normed, keep_residual=residual, source=source
        )
        for source in (*qv.sources(), "plain_add")
        for normed in (False, True)
        for residual in (True, False)
        for v in variants
    ]


def prepare(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    """Duplicate quant calls merged; ``quant(fused_add_rms_norm(…)[0].reshape(…))`` → the
    quant on item 0, then the view."""
    merged = qv.merge_duplicate_quants(graph, schemes)
    return merged + qv.sink_quant_views(graph, schemes, _is_normed_item)


def _is_normed_item(node: torch.fx.Node) -> bool:
    return node.target is operator.getitem and node.args[1] == 0 and qv.is_norm(node.args[0], True)


def rewrite(graph: torch.fx.Graph, schemes: Sequence[str]) -> int:
    return 0  # no graph rewrite after the matchers


def label(node: torch.fx.Node) -> str | None:
    return qv.label_of_fused(NAME, "add_rms_norm_", node)


def near_misses(graph: torch.fx.Graph, schemes: Sequence[str]) -> list[NearMiss]:
    out = []
    for node in graph.nodes:
        if not qv.is_norm(node, add=True):
            continue
        ours = op_name(node) is not None
        normed = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if not ours and not (normed and feeds_quant(normed[0])):
            continue  # vLLM IR's norms are listed only where a quant op of ours reads them
        if not normed:
            reason = "its normed output (item 0) is unused"
        else:
            reason = explain_norm_output(normed[0], schemes)
        op = "fused_add_rms_norm" if ours else "vllm_ir.fused_add_rms_norm"
        out.append(NearMiss(NAME, node.name, op, reason))
    return out
