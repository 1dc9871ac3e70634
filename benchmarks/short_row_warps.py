"""Warps per program for short rows (≤ 2048 columns) at many rows (NVIDIA).

    python benchmarks/short_row_warps.py [--json out.json]

The norm kernels take ``_num_warps(block, rows)`` warps; the fused and the standalone launches
of the same rows must take the same count (it sets a row's sum order). This times the ops of
DSV4's short rows (the q-lora and kv norms, alone, fused as q_kv, and with the FP8-group q quant)
with every short-row launch forced to 1, 2, 4 or 8 warps, at 256–8192 rows.
Timing: CUDA-graph replay, median of three interleaved rounds (benchmarks/kernels.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

import fusion_ops  # noqa: F401  (registers the ops)
import fusion_ops.triton_backend as triton_backend
from benchmarks.deeper_fusions import split_projection
from benchmarks.kernels import bench_interleaved, report, warm_up

ops = torch.ops.fusion_ops
EPS = 1e-6
FP8 = (128, True, torch.float8_e4m3fn)
WARPS = (1, 2, 4, 8)


def python_kernel(op: str) -> Any:
    """The op's Python kernel: a C++ replay of the first call would not ask for warps again."""
    return getattr(ops, f"_python_{op}", None) or getattr(ops, op)


def op_calls(t: int) -> dict[str, Callable[[], Any]]:
    calls: dict[str, Callable[[], Any]] = {}
    rms_norm, q_kv = python_kernel("rms_norm"), python_kernel("q_kv_rms_norm")
    rms_fp8 = python_kernel("rms_norm_fp8_group_quant")
    q_kv_fp8 = python_kernel("q_kv_rms_norm_fp8_group_quant")
    for q_lora in (1024, 1536):
        q, wq, kv, wkv = split_projection(t, q_lora)
        calls[f"rms_norm {q_lora}"] = lambda q=q, wq=wq: rms_norm(q, wq, EPS)
        calls[f"q_kv {q_lora}+512"] = lambda q=q, wq=wq, kv=kv, wkv=wkv: q_kv(
            q, wq, EPS, kv, wkv, EPS
        )
        calls[f"rms_norm→fp8_group {q_lora}"] = lambda q=q, wq=wq: rms_fp8(q, wq, EPS, *FP8)
        calls[f"q_kv→fp8_group {q_lora}+512"] = lambda q=q, wq=wq, kv=kv, wkv=wkv: q_kv_fp8(
            q, wq, EPS, kv, wkv, EPS, *FP8
        )
        if q_lora == 1024:
            calls["rms_norm 512"] = lambda kv=kv, wkv=wkv: rms_norm(kv, wkv, EPS)
    return calls


def with_short_row_warps(warps: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn with every launch of ≤ 2048-column blocks at more than one row on ``warps`` warps."""
    default = triton_backend._num_warps

    def forced(block: int, rows: int = 2, residual: bool = False) -> int:
        return warps if block <= 2048 and rows > 1 else default(block, rows, residual)

    def run() -> Any:
        triton_backend._num_warps = forced
        try:
            return fn()
        finally:
            triton_backend._num_warps = default

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    args = parser.parse_args()
    warm_up()
    torch.manual_seed(0)
    rows = []
    for t in args.tokens:
        for name, fn in op_calls(t).items():
            times = bench_interleaved({str(w): with_short_row_warps(w, fn) for w in WARPS})
            best = min(times, key=lambda w: times[w])
            print(
                f"{name:28s} {t:5d} rows  "
                + "  ".join(f"{w} warps {us:6.2f}" for w, us in times.items())
                + f"   best {best}",
                flush=True,
            )
            rows.append({"op": name, "tokens": t, "us_by_warps": times})
    report(rows, args.json)


if __name__ == "__main__":
    main()
