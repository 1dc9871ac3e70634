"""Reference all-reduce: the functional collective torch.compile traces tensor-parallel code to.

The fused tensor-parallel ops (``all_reduce_*``, :mod:`fusion_ops.library`) are *defined* as this
sum followed by the fused add-norm(-quant) op, so on the reference backend they give exactly the
bytes of the unfused graph. The GPU kernel (:mod:`fusion_ops.triton_backend.all_reduce`) sums the
ranks' rows in rank order in fp32 and rounds once to x's dtype; with two ranks that is the same
sum as any all-reduce (one addition), with more ranks the sum order is this definition's.
"""

from __future__ import annotations

import torch
import torch.distributed.distributed_c10d as c10d

_functional = torch.ops._c10d_functional


def all_reduce_sum(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Σ over the ranks of ``group_name`` of x (a new tensor; x is left alone)."""
    return _functional.wait_tensor(_functional.all_reduce(x, "sum", group_name))


def rank_order_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """The GPU kernel's definition: Σ_rank fp32(part) in rank order, rounded once to the parts'
    dtype (tests compare the kernel against this on every rank)."""
    total = parts[0].float()
    for p in parts[1:]:
        total = total + p.float()
    return total.to(parts[0].dtype)


def group_exists(group_name: str) -> bool:
    try:
        c10d._resolve_process_group(group_name)
    except (RuntimeError, ValueError, KeyError):
        return False
    return True
