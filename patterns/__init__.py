"""Fusion families: one module each (pattern, replacement, example inputs, must-not-fire rules).

``FAMILIES`` is the single registry, in the order the pass applies them.
"""

from __future__ import annotations

from types import ModuleType

from . import add_rms_quant, dequant_fp8, rms_quant, rope_cache
from .base import NearMiss, PatternSpec, op_name

FAMILIES: dict[str, ModuleType] = {
    m.NAME: m for m in (add_rms_quant, rms_quant, rope_cache, dequant_fp8)
}

__all__ = ["FAMILIES", "NearMiss", "PatternSpec", "op_name"]
