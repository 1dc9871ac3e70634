"""Warps per program for short rows (≤ 2048 columns) at many rows (NVIDIA).

    python benchmarks/short_row_warps.py [--json out.json]

The norm kernels take ``launch_policy.row_warps(block, rows)`` warps; the fused and the
standalone launches of the same rows must take the same count (it sets a row's sum order). This
times the ops of DSV4's short rows (the q-lora and kv norms, alone, fused as q_kv, and with the
FP8-group q quant) with the policy's record for the rows and 1, 2, 4 or 8 warps, at 256–8192 rows.
Timing: CUDA-graph replay, median of three interleaved rounds (benchmarks/kernels.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

import fusion_ops  # noqa: F401  (registers the ops)
import fusion_ops.triton_backend as triton_backend
from benchmarks.deeper_fusions import split_projection
from benchmarks.kernels import bench_interleaved, report, warm_up
from fusion_ops import launch_policy as policy

EPS = 1e-6
FP8 = (128, True, torch.float8_e4m3fn)
WARPS = (1, 2, 4, 8)


def op_calls(t: int, warps: int) -> dict[str, Callable[[], Any]]:
    """The ops of DSV4's short rows over ``t`` rows, launched by the Triton backend's launch
    functions with the policy's record for those rows and ``warps`` warps instead of its own."""
    calls: dict[str, Callable[[], Any]] = {}

    def norm(x: torch.Tensor, w: torch.Tensor, scheme: str | None = None) -> Any:
        params = FP8 if scheme else ()
        launch = policy.norm_launch(
            x.shape[-1], t, triton_backend.device_facts(x.get_device()), scheme=scheme,
            params=params,
        )  # fmt: skip
        forced = replace(launch, num_warps=warps)
        return triton_backend.norm_quant(x, None, w, EPS, scheme, params, not scheme, launch=forced)

    def q_kv(q, wq, kv, wkv, scheme: str | None = None) -> Any:  # type: ignore[no-untyped-def]
        params = FP8 if scheme else ()
        launch = policy.q_kv_launch(
            q.shape[-1], kv.shape[-1], t, triton_backend.device_facts(q.get_device()),
            scheme=scheme, params=params,
        )  # fmt: skip
        forced = replace(launch, num_warps=warps)
        return triton_backend.q_kv_norm(q, wq, EPS, kv, wkv, EPS, scheme, params, launch=forced)

    for q_lora in (1024, 1536):
        q, wq, kv, wkv = split_projection(t, q_lora)
        calls[f"rms_norm {q_lora}"] = lambda q=q, wq=wq: norm(q, wq)
        calls[f"q_kv {q_lora}+512"] = lambda q=q, wq=wq, kv=kv, wkv=wkv: q_kv(q, wq, kv, wkv)
        calls[f"rms_norm→fp8_group {q_lora}"] = lambda q=q, wq=wq: norm(q, wq, "fp8_group")
        calls[f"q_kv→fp8_group {q_lora}+512"] = lambda q=q, wq=wq, kv=kv, wkv=wkv: q_kv(
            q, wq, kv, wkv, "fp8_group"
        )
        if q_lora == 1024:
            calls["rms_norm 512"] = lambda kv=kv, wkv=wkv: norm(kv, wkv)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    args = parser.parse_args()
    warm_up()
    torch.manual_seed(0)
    rows = []
    for t in args.tokens:
        by_warps = {w: op_calls(t, w) for w in WARPS}
        for name in by_warps[WARPS[0]]:
            times = bench_interleaved({str(w): by_warps[w][name] for w in WARPS})
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
