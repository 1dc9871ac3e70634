"""Fusion families: one module each (pattern, replacement, example inputs, must-not-fire rules).

``FAMILIES`` is the single registry, in the order the pass applies them (``qnorm_rope_cache``
before ``rope_cache``, which takes the ropes and writes it leaves; ``ar_add_rms_quant`` last: it
folds an all-reduce into the add-norm ops the others leave or create; ``add_rms`` after the
norm+quant families, which take a norm that feeds a quant op first). Each module is a
:class:`~patterns.base.Family`; ``q_kv_norm``'s ``rewrite`` is a horizontal fusion of what the
matchers leave or create.
"""

from __future__ import annotations

from . import (
    add_rms,
    add_rms_quant,
    ar_add_rms_quant,
    dequant_fp8,
    norm_rope_cache,
    q_kv_norm,
    qnorm_rope_cache,
    rms_quant,
    rope_cache,
)
from .base import Family, GraphPatternSpec, NearMiss, PatternSpec, op_name

FAMILIES: dict[str, Family] = {
    m.NAME: m
    for m in (
        add_rms_quant,
        rms_quant,
        qnorm_rope_cache,
        rope_cache,
        norm_rope_cache,
        dequant_fp8,
        add_rms,
        q_kv_norm,
        ar_add_rms_quant,
    )
}

__all__ = ["FAMILIES", "Family", "GraphPatternSpec", "NearMiss", "PatternSpec", "op_name"]
