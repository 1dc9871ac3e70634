"""Tensor-parallel all-reduce → add + RMSNorm → quant on 2 GPUs, µs per call under CUDA-graph
replay, bf16 [T, hidden]:

* ``nccl+fused``     NCCL all-reduce (functional collective) + our fused add_rms_norm_<s>_quant
* ``symm+fused``     torch's symmetric-memory ``one_shot_all_reduce`` (input copied into its
                     buffer) + the same fused op
* ``one_shot``       our all_reduce_add_rms_norm_<s>_quant, one-shot kernel forced at every size
* ``ours``           the same op with its default switch (one-shot up to the threshold, then
                     NCCL + fused kernel)

    torchrun-free: python benchmarks/all_reduce.py [--tokens 1 16 128] [--json out.json]

Two processes (one per GPU, NCCL, multicast off). Each variant: 20 calls captured in one CUDA
graph, the graph replayed (both ranks together, after a barrier) and timed with CUDA events on
rank 0; the median of 15 replays, divided by 20.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CALLS_PER_GRAPH = 20
FN = torch.float8_e4m3fn
PARAMS = {"mxfp4": (), "fp8_group": (128, False, FN), "mxfp8": ()}


def graph_us(fn: Callable[[], Any], reps: int = 15) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS_PER_GRAPH)
    return statistics.median(times)


def _measure(
    scheme: str,
    tokens: int,
    hidden: int,
    rank: int,
    group: str,
    symm_buf: torch.Tensor,
    default_threshold: int,
) -> dict[str, Any]:
    from fusion_ops.triton_backend import all_reduce

    ops, funcol, params = torch.ops.fusion_ops, torch.ops._c10d_functional, PARAMS[scheme]
    fused = getattr(ops, f"add_rms_norm_{scheme}_quant")
    ar_fused = getattr(ops, f"all_reduce_add_rms_norm_{scheme}_quant")
    g = torch.Generator(device="cuda").manual_seed(tokens + rank)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
    r = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(hidden, device="cuda", generator=g).to(torch.bfloat16)
    flat = symm_buf[: tokens * hidden]

    def nccl() -> Any:
        s = funcol.wait_tensor(funcol.all_reduce(x, "sum", group))
        return fused(s, r, w, 1e-6, *params)

    def symm() -> Any:
        flat.copy_(x.view(-1))
        s = torch.ops.symm_mem.one_shot_all_reduce(flat, "sum", group)
        return fused(s.view(tokens, hidden), r, w, 1e-6, *params)

    def ours() -> Any:
        return ar_fused(x, r, w, 1e-6, group, *params)

    row: dict[str, Any] = {"scheme": scheme, "tokens": tokens, "hidden": hidden}
    row["nccl+fused"] = graph_us(nccl)
    row["symm+fused"] = graph_us(symm)
    row["one_shot"] = graph_us(ours)  # the workspace is large enough for every size
    forced = os.environ[all_reduce.ONE_SHOT_ENV]
    os.environ[all_reduce.ONE_SHOT_ENV] = str(default_threshold)
    row["ours"] = graph_us(ours)
    os.environ[all_reduce.ONE_SHOT_ENV] = forced
    return row


def _worker(rank: int, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2, device_id=torch.device("cuda", rank))
    import torch.distributed._symmetric_memory as symm_mem

    import fusion_ops  # noqa: F401  (defines the ops)
    from fusion_ops.triton_backend import all_reduce

    group = dist.group.WORLD.group_name
    hidden = args.hidden
    max_bytes = max(args.tokens) * hidden * 2
    symm_buf = symm_mem.empty(max_bytes // 2, dtype=torch.bfloat16, device="cuda")
    symm_mem.rendezvous(symm_buf, group)
    default_threshold = all_reduce.one_shot_max_bytes()
    os.environ[all_reduce.ONE_SHOT_ENV] = str(max_bytes)  # a workspace for the forced runs
    rows = []
    for scheme in args.schemes:
        for tokens in args.tokens:
            row = _measure(scheme, tokens, hidden, rank, group, symm_buf, default_threshold)
            if rank == 0:
                print(
                    f"{scheme:9s} T={tokens:5d}  nccl+fused {row['nccl+fused']:8.1f}  symm+fused "
                    f"{row['symm+fused']:8.1f}  one_shot {row['one_shot']:8.1f}  ours "
                    f"{row['ours']:8.1f} µs",
                    flush=True,
                )
            rows.append(row)
    if rank == 0:
        meta = {
            "device": torch.cuda.get_device_name(),
            "gpus": 2,
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "one_shot_max_bytes": default_threshold,
        }
        print(json.dumps(meta))
        if out:
            with open(out, "w") as fh:
                json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192],
    )
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--schemes", nargs="+", default=["mxfp4", "fp8_group"])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, args, args.json), nprocs=2)


if __name__ == "__main__":
    main()
