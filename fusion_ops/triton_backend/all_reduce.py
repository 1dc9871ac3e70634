"""Triton backend of the tensor-parallel ops: a one-shot all-reduce over symmetric memory fused
with add + RMSNorm + quant in one kernel (:func:`.kernels.all_reduce_norm_quant_kernel`).

Per (process group, device) one symmetric-memory workspace is allocated on first use (a
collective call: every rank reaches it in the same op call) and kept: 3 × world slots of
``ONE_SHOT_MAX_BYTES`` (every rank stores its rows into its slot on every rank; three sets in
rotation, see the kernel) and this rank's call counters. Calls whose x is larger than
that (or where symmetric memory is unavailable, or FP8 FNUZ on NVIDIA) take the definition's
path instead: the functional all-reduce (NCCL) then the fused add-norm-quant kernel. The switch
is by bytes, measured on 2×H200 (benchmarks/all_reduce.py, RESULTS.md);
``FUSION_OPS_AR_ONE_SHOT_BYTES`` overrides it (the workspace's slot size when it is made, the
switch at every call; 0 turns the one-shot path off).

NVLink multicast is never used (plain stores into peer memory only): the kernel writes its rows
through the peer mappings symmetric memory sets up, so it runs with
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``.
The first call per group must not happen inside CUDA-graph capture (warm up first, as for NCCL).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.distributed_c10d as c10d

from ..launch_policy import DeviceFacts, all_reduce_launch
from . import kernels as k
from .calls import all_reduce_meta
from .launch import Launcher

ONE_SHOT_ENV = "FUSION_OPS_AR_ONE_SHOT_BYTES"
ONE_SHOT_MAX_BYTES = 16 * 2**20  # x's bytes up to which the one-shot kernel runs (measured)
MAX_WORLD = 8
_launch = Launcher(k.all_reduce_norm_quant_kernel)


@dataclass
class Workspace:
    handle: Any  # torch's _SymmetricMemory
    buffer: torch.Tensor  # uint8 [3 · world · slot_bytes + 20], symmetric
    buf_ptrs: torch.Tensor  # int64 [world]: every rank's slots
    state: torch.Tensor  # int32 [5]: calls, programs finished, bytes used per set (local)
    slot_bytes: int
    rank: int
    world: int


_WORKSPACES: dict[tuple[str, int], Workspace | None] = {}


def one_shot_max_bytes() -> int:
    raw = os.environ.get(ONE_SHOT_ENV)
    return ONE_SHOT_MAX_BYTES if raw is None else int(raw)


def workspace(group_name: str, device: torch.device) -> Workspace | None:
    """The group's symmetric workspace on ``device`` (made on first call: collective), or None
    where the one-shot path cannot run."""
    key = (group_name, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _WORKSPACES:
        _WORKSPACES[key] = _make_workspace(group_name, torch.device("cuda", key[1]))
    return _WORKSPACES[key]


def _make_workspace(group_name: str, device: torch.device) -> Workspace | None:
    slot_bytes = -(-one_shot_max_bytes() // 16) * 16
    group = c10d._resolve_process_group(group_name)
    world, rank = group.size(), group.rank()
    if slot_bytes == 0 or not 1 < world <= MAX_WORLD:
        return None
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError:
        return None
    data_bytes = 3 * world * slot_bytes
    buffer, error = None, None
    try:  # this rank's part; a rank that fails here must still take part in the agreement
        buffer = symm_mem.empty(data_bytes + 20, dtype=torch.uint8, device=device)
        buffer[:data_bytes].fill_(0xFF)  # every element "empty" (all bits set)
        buffer[data_bytes:].zero_()
    except RuntimeError as err:  # torch.OutOfMemoryError included
        error = f"{type(err).__name__}: {err}"
    failed = failed_ranks(group, error)
    if failed and len(failed) == world:  # no symmetric memory here: the same on every rank
        return _without_workspace(group_name, device, failed[rank])
    if failed:  # the others would wait in the rendezvous for these ranks forever
        first = min(failed)
        raise WorkspaceError(
            f"fusion_ops: the all-reduce workspace for group {group_name!r} "
            f"({data_bytes + 20} bytes of symmetric memory per rank) could not be allocated "
            f"on rank(s) {sorted(failed)} of {world}; rank {first}: {failed[first]}. Every rank "
            f"stops here instead of waiting in the rendezvous (set {ONE_SHOT_ENV} to a smaller "
            "size, or 0 to use the functional all-reduce)"
        )
    try:
        handle = symm_mem.rendezvous(buffer, group_name)
        handle.barrier()  # every rank's slots are empty before any rank stores into them
    except RuntimeError as err:  # no peer mappings here (the same answer on every rank)
        return _without_workspace(group_name, device, str(err))
    ptrs = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)
    state = buffer[data_bytes:].view(torch.int32)
    return Workspace(handle, buffer, ptrs, state, slot_bytes, rank, world)


def _without_workspace(group_name: str, device: torch.device, reason: str) -> None:
    """Warn that the group gets no workspace (the ops take the definition's path); None."""
    warnings.warn(
        f"fusion_ops: no symmetric memory for group {group_name!r} on {device} ({reason}); "
        "the all_reduce_* ops use the functional all-reduce + fused kernel",
        stacklevel=3,
    )


class WorkspaceError(RuntimeError):
    """The symmetric workspace could be made on some ranks of a group but not on others."""


def failed_ranks(group: Any, error: str | None) -> dict[int, str]:
    """Every rank's set-up error, exchanged over ``group`` (a collective: every rank calls it
    with its own error or None); {rank: error} of the ranks that failed, the same on every
    rank."""
    errors: list[str | None] = [None] * group.size()
    torch.distributed.all_gather_object(errors, error, group=group)
    return {r: e for r, e in enumerate(errors) if e is not None}


def one_shot(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_name: str,
    write_y: bool,
    scheme_consts: Any,
    q: torch.Tensor | None,
    s: torch.Tensor | None,
    numerics: Any,
    device: DeviceFacts,
) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """Run the fused kernel when x fits the workspace; returns (y or None, residual_out), or
    None when the caller must take the all-reduce + fused-op path."""
    kdim = x.shape[-1]
    x2 = x.reshape(-1, kdim)
    m = x2.shape[0]
    nbytes = x2.numel() * x2.element_size()
    if nbytes > one_shot_max_bytes() or m == 0 or x2.stride(-1) != 1:
        return None
    ws = workspace(group_name, x.device)
    if ws is None or nbytes > ws.slot_bytes:
        return None
    r2 = residual.reshape(-1, kdim)
    r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    reduced = torch.empty((m, kdim), dtype=x.dtype, device=x.device)
    res_out = torch.empty((m, kdim), dtype=x.dtype, device=x.device)
    y = torch.empty((m, kdim), dtype=x.dtype, device=x.device) if write_y else None
    launch = all_reduce_launch(kdim, m, device, group=scheme_consts["GROUP"], eps=eps)
    _launch(
        launch.grid,
        (
            x2,
            ws.buf_ptrs,
            ws.state,
            reduced,
            r2,
            weight,
            y if y is not None else reduced,
            res_out,
            q if q is not None else reduced,
            s if s is not None else reduced,
            x2.stride(0),
            r2.stride(0),
            m,
            kdim,
            eps,
            scheme_consts["fp8_max"],
            scheme_consts["min_scale"],
            ws.rank,
            ws.slot_bytes // x.element_size(),
        ),
        all_reduce_meta(
            launch,
            ws.world,
            8 * x.element_size(),
            (kdim * x.element_size()) % 16 == 0,
            write_y,
            numerics,
            scheme_consts,
        ),
    )
    return y, res_out
