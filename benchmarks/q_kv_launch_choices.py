"""q_kv_norm's launch choices that keep its bytes, against vLLM's fused_q_kv_rmsnorm (NVIDIA).

    python benchmarks/q_kv_launch_choices.py --vllm-source <vllm>/.../fused_qk_rmsnorm.py
        [--q-lora 1024 1536] [--tokens 1 16 128 ...] [--warps 4 8] [--json out.json]

The Triton backend's q_kv launch function with the launch policy's record for the rows, and with
one or two fields of that record changed (where the policy already takes that value, the variant
is the op), every variant checked to give the op's bytes:
* ``op``: the policy's record (launch_policy.q_kv_launch: rows per program, Q_KV_LOAD_BANDS);
* ``division steps``: INV_BY_FMA off (the 1/rms by div.rn / sqrt.rn);
* ``weight after the wait``: PREFETCH_W off (the weight loaded after the PDL wait);
* both of these;
* ``other rows/program``: 2 rows per program where the op takes 1, and 1 where it takes 2;
* ``q in N programs``: q's row split over N programs (QKvLaunch.q_split) where the op takes another
  split;
* ``N warps`` (``--warps``): the record with N warps (other warps give other sums, so other
  bytes: choosing one is a change of ``launch_policy.row_warps``, which the standalone norms share).
Timing: CUDA-graph replay, median of five interleaved rounds (benchmarks/kernels.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

import fusion_ops  # noqa: F401  (registers the ops)
import fusion_ops.triton_backend as triton_backend
from benchmarks.deeper_fusions import load_vllm_kernel, split_projection, vllm_q_kv
from benchmarks.kernels import bench_interleaved, report, warm_up
from fusion_ops import launch_policy as policy

ops = torch.ops.fusion_ops
EPS = 1e-6


def variant_launches(
    q_lora: int, t: int, warps: tuple[int, ...] = ()
) -> dict[str, policy.QKvLaunch]:
    """The policy's record for ``t`` rows and the variants of it (same bytes, but ``warps``)."""
    facts = triton_backend.device_facts(torch.cuda.current_device())
    launch = policy.q_kv_launch(q_lora, 512, t, facts)
    return {
        "op": launch,
        "division steps": replace(launch, inv_by_fma=False),
        "weight after the wait": replace(launch, prefetch_weight=False),
        "division steps, weight after the wait": replace(
            launch, inv_by_fma=False, prefetch_weight=False
        ),
        f"{3 - launch.rows_per_program} rows/program": replace(
            launch, rows_per_program=3 - launch.rows_per_program, q_split=1
        ),
        **{
            f"q in {n} programs": replace(launch, q_split=n, rows_per_program=1)
            for n in (1, 2, 4)
            if launch.q_split != n and launch.pieces == (0, 0, 0)
        },
        **{f"{w} warps": replace(launch, num_warps=w) for w in warps if w != launch.num_warps},
    }


def bench_shape(vllm: Any, q_lora: int, t: int, warps: tuple[int, ...] = ()) -> dict[str, Any]:
    q, wq, kv, wkv = split_projection(t, q_lora)
    fns: dict[str, Callable[[], Any]] = {}
    same: dict[str, bool] = {}
    want = ops.q_kv_rms_norm(q, wq, EPS, kv, wkv, EPS)
    for name, launch in variant_launches(q_lora, t, warps).items():

        def call(launch: policy.QKvLaunch = launch) -> Any:
            y, _, _, kv_out = triton_backend.q_kv_norm(
                q, wq, EPS, kv, wkv, EPS, None, (), launch=launch
            )
            return y, kv_out

        got = call()
        same[name] = all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        fns[name] = call
    fns["vLLM"] = lambda: vllm_q_kv(vllm, q, kv, wq, wkv, EPS, False)
    fns["vLLM+PDL"] = lambda: vllm_q_kv(vllm, q, kv, wq, wkv, EPS, True)
    times = bench_interleaved(fns, rounds=5)
    print(f"q_lora {q_lora}, {t} tokens", flush=True)
    for name, us in times.items():
        note = {True: "", False: "  OTHER BYTES"}.get(same.get(name, True), "")
        print(f"  {name:38s} {us:7.3f} µs{note}", flush=True)
    return {"q_lora": q_lora, "tokens": t, "us": times, "same_bytes_as_op": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-source", required=True, help="vLLM's fused_qk_rmsnorm.py")
    parser.add_argument("--q-lora", type=int, nargs="+", default=[1024, 1536])
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[1, 16, 128, 512, 768, 1024, 1280, 1536, 2048]
    )
    parser.add_argument("--warps", type=int, nargs="+", default=[])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    vllm = load_vllm_kernel(args.vllm_source)
    warm_up()
    torch.manual_seed(0)
    warps = tuple(args.warps)
    rows = [bench_shape(vllm, q_lora, t, warps) for q_lora in args.q_lora for t in args.tokens]
    report(rows, args.json)


if __name__ == "__main__":
    main()
