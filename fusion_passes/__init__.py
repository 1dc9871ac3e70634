"""fusion_passes: Inductor post-grad fusion passes over ``torch.ops.fusion_ops``.

from fusion_passes import FusionPass
p = FusionPass()
fn = torch.compile(fn, options={"post_grad_custom_post_pass": p})
p.match_table, p.matched_count, p.graphs

The names below load on first use, so ``python -m fusion_passes report --help`` (and an argument
error) answers without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .accounting import GraphRecord, count_fusion_ops
    from .dumps import ENV_DUMP_DIR
    from .fusion_pass import ALL_FUSIONS, ALL_SCHEMES, NUMERICS, FusionPass, ServedFromCache

_WHERE = {
    "ALL_FUSIONS": ".fusion_pass",
    "ALL_SCHEMES": ".fusion_pass",
    "NUMERICS": ".fusion_pass",
    "FusionPass": ".fusion_pass",
    "ServedFromCache": ".fusion_pass",
    "GraphRecord": ".accounting",
    "count_fusion_ops": ".accounting",
    "ENV_DUMP_DIR": ".dumps",
}
__all__ = [
    "ALL_FUSIONS",
    "ALL_SCHEMES",
    "ENV_DUMP_DIR",
    "NUMERICS",
    "FusionPass",
    "GraphRecord",
    "ServedFromCache",
    "count_fusion_ops",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'fusion_passes' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value
