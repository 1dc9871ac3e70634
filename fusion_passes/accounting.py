"""Per-graph records: matches, op counts before/after, near misses, time in the pass."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from patterns import NearMiss, op_name


def count_fusion_ops(graph: torch.fx.Graph) -> dict[str, int]:
    """Calls per ``fusion_ops`` op, counting ops wrapped in auto_functionalized (v1 and v2)."""
    counts: Counter[str] = Counter()
    for node in graph.nodes:
        name = op_name(node)
        if name is not None:
            counts[name] += 1
    return dict(sorted(counts.items()))


@dataclass
class GraphRecord:
    """What the pass did to one compiled graph."""

    index: int
    matches: dict[str, int]  # "<family>/<variant>/<dtype>" -> matches in this graph
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    near_misses: list[NearMiss]
    ms: float
    inductor_launched: int = 0  # fused nodes handed to Inductor as Triton kernels (see
    # fusion_passes.inductor_launch); counted in ops_after as the fused op they were
    code_before: str | None = field(default=None, repr=False)
    code_after: str | None = field(default=None, repr=False)

    @property
    def matched_count(self) -> int:
        return sum(self.matches.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "matched_count": self.matched_count,
            "matches": self.matches,
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "near_misses": [m.as_dict() for m in self.near_misses],
            "ms": round(self.ms, 3),
            "inductor_launched": self.inductor_launched,
        }
