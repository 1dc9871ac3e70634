"""The activation-quant schemes: one row per scheme, from which every quant op is generated.

Each scheme has a standalone quant op ``<scheme>_quant`` and two fused ops,
``rms_norm_<scheme>_quant`` and ``add_rms_norm_<scheme>_quant``. Scheme parameters (group size,
UE8M0 scales, FP8 dtype) are trailing op arguments, identical in the standalone and fused ops:

* ``mxfp4_quant(x) -> (packed uint8 [..., K/2], e8m0 uint8 [..., K/32])``
* ``mxfp8_quant(x) -> (e4m3fn [..., K], e8m0 uint8 [..., K/32])``
* ``fp8_per_token_quant(x, bool use_ue8m0, ScalarType fp8_dtype) -> (fp8 [..., K], fp32 [..., 1])``
* ``fp8_group_quant(x, int group_size, bool use_ue8m0, ScalarType fp8_dtype)``
  ``-> (fp8 [..., K], fp32 [..., K/group_size])``
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import checks
from .formats import MX_BLOCK
from .reference import quant as ref

_FLOATS = frozenset(checks.FLOAT_DTYPES)
_FP8 = frozenset((torch.float8_e4m3fn, torch.float8_e4m3fnuz))


@dataclass(frozen=True)
class QuantScheme:
    name: str
    params_schema: str  # schema text of the trailing parameters ("" if none)
    reference: Callable[..., tuple[torch.Tensor, torch.Tensor]]

    @property
    def quant_op(self) -> str:
        return f"{self.name}_quant"

    @property
    def rms_op(self) -> str:
        return f"rms_norm_{self.name}_quant"

    @property
    def add_rms_op(self) -> str:
        return f"add_rms_norm_{self.name}_quant"

    @property
    def q_kv_rms_op(self) -> str:
        """Two norms of the same rows, the first one quantized (fusion_ops.library.quant)."""
        return f"q_kv_rms_norm_{self.name}_quant"

    @property
    def ar_add_rms_op(self) -> str:
        """The tensor-parallel form: all-reduce of x first (fusion_ops.library.quant)."""
        return f"all_reduce_add_rms_norm_{self.name}_quant"

    def check(self, op: str, x: torch.Tensor, params: tuple[Any, ...]) -> None:
        """Validate the quant input ``x`` [..., K] and the scheme parameters."""
        checks.check_min_dim(op, "x", x, 1)
        checks.check_dtype(op, "x", x, checks.FLOAT_DTYPES)
        k = x.shape[-1]
        if self.name in ("mxfp4", "mxfp8"):
            checks.check(
                op, "x", k % MX_BLOCK == 0, lambda: f"last dim K={k} must be a multiple of 32"
            )
            return
        if self.name == "fp8_group":
            group_size = params[0]
            checks.check(
                op, "group_size", group_size > 0, lambda: f"got {group_size}; expected > 0"
            )
            checks.check(
                op,
                "x",
                k % group_size == 0,
                lambda: f"last dim K={k} must be a multiple of group_size={group_size}",
            )
        checks.check_fp8_dtype(op, "fp8_dtype", params[-1])

    def quick(self, x: torch.Tensor, params: tuple[Any, ...]) -> bool:
        """True only if every check of :meth:`check` passes (one expression per scheme: op calls
        run this first and :meth:`check`, with its messages, only when it says False)."""
        if x.dtype not in _FLOATS or x.dim() < 1:
            return False
        if self.name in ("mxfp4", "mxfp8"):
            return x.shape[-1] % MX_BLOCK == 0
        if self.name == "fp8_group":
            return params[0] > 0 and x.shape[-1] % params[0] == 0 and params[-1] in _FP8
        return params[-1] in _FP8

    def fake(self, x: torch.Tensor, params: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty outputs with the shapes and dtypes of the real op."""
        lead, k = x.shape[:-1], x.shape[-1]
        if self.name == "mxfp4":
            return x.new_empty((*lead, k // 2), dtype=torch.uint8), x.new_empty(
                (*lead, k // MX_BLOCK), dtype=torch.uint8
            )
        if self.name == "mxfp8":
            return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(
                (*lead, k // MX_BLOCK), dtype=torch.uint8
            )
        fp8_dtype = params[-1]
        groups = 1 if self.name == "fp8_per_token" else k // params[0]
        return x.new_empty(x.shape, dtype=fp8_dtype), x.new_empty(
            (*lead, groups), dtype=torch.float32
        )


SCHEMES: dict[str, QuantScheme] = {
    s.name: s
    for s in (
        QuantScheme("mxfp4", "", ref.mxfp4_quant),
        QuantScheme("mxfp8", "", ref.mxfp8_quant),
        QuantScheme(
            "fp8_per_token", ", bool use_ue8m0, ScalarType fp8_dtype", ref.fp8_per_token_quant
        ),
        QuantScheme(
            "fp8_group",
            ", int group_size, bool use_ue8m0, ScalarType fp8_dtype",
            ref.fp8_group_quant,
        ),
    )
}
