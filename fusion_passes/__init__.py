"""fusion_passes: Inductor post-grad fusion passes over ``torch.ops.fusion_ops``.

from fusion_passes import FusionPass
p = FusionPass()
fn = torch.compile(fn, options={"post_grad_custom_post_pass": p})
p.match_table, p.matched_count, p.graphs
"""

from __future__ import annotations

from .accounting import GraphRecord, count_fusion_ops
from .dumps import ENV_DUMP_DIR
from .fusion_pass import ALL_FUSIONS, ALL_SCHEMES, NUMERICS, FusionPass, ServedFromCache

__all__ = [
    "ALL_FUSIONS",
    "ALL_SCHEMES",
    "ENV_DUMP_DIR",
    "FusionPass",
    "GraphRecord",
    "NUMERICS",
    "ServedFromCache",
    "count_fusion_ops",
]
