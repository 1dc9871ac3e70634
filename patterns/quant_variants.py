"""The quant-scheme variants the norm+quant families register, and the labels of their matches.

A variant fixes the scheme's bool/dtype parameters (enumerated) and leaves ``group_size`` a
wildcard. Shared by :mod:`patterns.rms_quant` and :mod:`patterns.add_rms_quant`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fusion_ops import SCHEMES

from .base import op_args

FP8_NAMES = {torch.float8_e4m3fn: "e4m3fn", torch.float8_e4m3fnuz: "e4m3fnuz"}
EXAMPLE_GROUP = 128  # example value of the group_size wildcard
EXAMPLE_EPS = 1e-6  # example value of the eps wildcard


@dataclass(frozen=True)
class QuantVariant:
    scheme: str
    use_ue8m0: bool | None = None
    fp8_dtype: torch.dtype | None = None

    @property
    def name(self) -> str:
        return scheme_label(self.scheme, None, self.use_ue8m0, self.fp8_dtype)

    @property
    def has_group(self) -> bool:
        return self.scheme == "fp8_group"

    def params(self, group_size: Any = None) -> tuple[Any, ...]:
        """Trailing op arguments (``group_size`` is the pattern's wildcard argument)."""
        if self.fp8_dtype is None:
            return ()
        fixed = (self.use_ue8m0, self.fp8_dtype)
        return (group_size, *fixed) if self.has_group else fixed

    def quant(self) -> Callable[..., Any]:
        return getattr(torch.ops.fusion_ops, SCHEMES[self.scheme].quant_op).default


def variants(schemes: Sequence[str]) -> list[QuantVariant]:
    out = []
    for scheme in schemes:
        if scheme in ("mxfp4", "mxfp8"):
            out.append(QuantVariant(scheme))
        else:
            for ue8m0, fp8 in itertools.product((False, True), FP8_NAMES):
                out.append(QuantVariant(scheme, ue8m0, fp8))
    return out


def scheme_label(
    scheme: str, group_size: int | None, use_ue8m0: bool | None, fp8_dtype: torch.dtype | None
) -> str:
    """'mxfp4', 'fp8_per_token_e4m3fn', 'fp8_group128_ue8m0_e4m3fnuz', ..."""
    if fp8_dtype is None:
        return scheme
    head = scheme if group_size is None else f"{scheme}{group_size}"
    return "_".join([head, *(["ue8m0"] if use_ue8m0 else []), FP8_NAMES[fp8_dtype]])


def label_of_call(scheme: str, node: torch.fx.Node) -> str:
    """Label of a quant/fused-quant call from its arguments."""
    args = op_args(node)
    return scheme_label(
        scheme, args.get("group_size"), args.get("use_ue8m0"), args.get("fp8_dtype")
    )


def scheme_of_op(name: str, prefix: str) -> str | None:
    """'rms_norm_fp8_group_quant' with prefix 'rms_norm_' -> 'fp8_group'."""
    for scheme in SCHEMES:
        if name == f"{prefix}{scheme}_quant":
            return scheme
    return None
