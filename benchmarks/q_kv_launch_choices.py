"""q_kv_norm's launch choices that keep its bytes, against vLLM's fused_q_kv_rmsnorm (NVIDIA).

    python benchmarks/q_kv_launch_choices.py --vllm-source <vllm>/.../fused_qk_rmsnorm.py
        [--q-lora 1024 1536] [--tokens 1 16 128 ...] [--json out.json]

The op's Python kernel (``_python_q_kv_rms_norm``: a C++ replay would re-launch the first call's
choices) with one or two meta values of its one launch set (where the op already takes that
value, the variant is the op), every variant checked to give the op's bytes:
* ``op``: the launcher's choices (_q_kv_rows_per_program, _q_kv_load_choices);
* ``division steps``: INV_BY_FMA off (the 1/rms by div.rn / sqrt.rn);
* ``weight after the wait``: PREFETCH_W off (the weight loaded after the PDL wait);
* both of these;
* ``other rows/program``: 2 rows per program where the op takes 1, and 1 where it takes 2.
Timing: CUDA-graph replay, median of five interleaved rounds (benchmarks/kernels.py).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

import fusion_ops  # noqa: F401  (registers the ops)
import fusion_ops.triton_backend as triton_backend
from benchmarks.deeper_fusions import load_vllm_kernel, split_projection, vllm_q_kv
from benchmarks.kernels import bench_interleaved, report, warm_up

ops = torch.ops.fusion_ops
EPS = 1e-6


@contextlib.contextmanager
def launch_meta(changes: dict[str, Any]) -> Iterator[None]:
    """Every q_kv launch inside with ``changes`` applied to its meta (ROWS: and its grid)."""
    launch = triton_backend._q_kv_launch

    def changed(grid: tuple[int, ...], args: tuple[Any, ...], meta: Any) -> None:
        new = {**dict(meta), **changes}
        if "ROWS" in changes:
            rows = args[8]  # M, the row count
            grid = ((rows + new["ROWS"] - 1) // new["ROWS"], *grid[1:])
        launch(grid, args, tuple(new.items()))

    triton_backend._q_kv_launch = changed
    try:
        yield
    finally:
        triton_backend._q_kv_launch = launch


def variant_calls(q_lora: int, t: int) -> dict[str, dict[str, Any]]:
    block = triton_backend.next_power_of_2(q_lora)
    rows = triton_backend._q_kv_rows_per_program(block, t, False)
    return {
        "op": {},
        "division steps": {"INV_BY_FMA": False},
        "weight after the wait": {"PREFETCH_W": False},
        "division steps, weight after the wait": {"INV_BY_FMA": False, "PREFETCH_W": False},
        f"{3 - rows} rows/program": {"ROWS": 3 - rows},
    }


def bench_shape(vllm: Any, q_lora: int, t: int) -> dict[str, Any]:
    q, wq, kv, wkv = split_projection(t, q_lora)
    python_op = ops._python_q_kv_rms_norm
    fns: dict[str, Callable[[], Any]] = {}
    same: dict[str, bool] = {}
    want = ops.q_kv_rms_norm(q, wq, EPS, kv, wkv, EPS)
    for name, changes in variant_calls(q_lora, t).items():

        def call(changes: dict[str, Any] = changes) -> Any:
            with launch_meta(changes):
                return python_op(q, wq, EPS, kv, wkv, EPS)

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
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    vllm = load_vllm_kernel(args.vllm_source)
    warm_up()
    torch.manual_seed(0)
    rows = [bench_shape(vllm, q_lora, t) for q_lora in args.q_lora for t in args.tokens]
    report(rows, args.json)


if __name__ == "__main__":
    main()
