"""What q_kv_norm's remaining gap to vLLM's fused_q_kv_rmsnorm is made of (NVIDIA, sm_90+).

    python benchmarks/q_kv_inv_rms.py --vllm-source <vllm>/models/common/ops/fused_qk_rmsnorm.py

Variant kernels of the plain q_kv norm (the math of q_kv_norm_quant_kernel: weights loaded
before the PDL wait, the sum of squares from its own load, the same rows per program and warps),
differing in one step each:
* ``exact``: 1/rms with correctly rounded steps, as every fusion_ops norm kernel computes it
  (kernels._inv_rms: RN(1 / RN(sqrt(RN(ss / K) + eps))));
* ``exact, ss·(1/K)``: the mean as a product with 1/K, exact for a power-of-two K (the same bits);
* ``exact by FMA``: the same steps from rsqrt/rcp seeds and FMA corrections, without branches
  (kernels._inv_rms's INV_BY_FMA, the same bits);
* ``rsqrt.approx``: vLLM's ``rsqrt(ss / K + eps)`` (other bits: not usable, shown as the bound);
* ``exact, outputs given``: the outputs allocated once, outside the timed call.
Timing: CUDA-graph replay, median of three interleaved rounds (benchmarks/kernels.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

import fusion_ops  # noqa: F401  (registers the ops)
from benchmarks.deeper_fusions import load_vllm_kernel, split_projection, vllm_q_kv
from benchmarks.kernels import bench_interleaved, report, warm_up
from fusion_ops.launch_policy import q_kv_rows_per_program, row_warps
from fusion_ops.triton_backend.kernels import _inv_rms, _pdl_start

ops = torch.ops.fusion_ops
EPS = 1e-6
INV_EXACT, INV_POW2_PRODUCT, INV_RSQRT_APPROX, INV_BY_FMA = 0, 1, 2, 3


@triton.jit
def _row(row, x_ptr, w, y_ptr, stride, K, inv_k, eps, BLOCK: tl.constexpr, INV: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0)
    xs = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    ss = tl.sum(xs * xs, axis=0)
    if INV == 3:
        inv = _inv_rms(ss, K, eps, True)
    elif INV == 2:
        inv = tl.rsqrt(ss / K + eps)
    elif INV == 1:
        inv = tl.math.div_rn(1.0, tl.sqrt_rn(ss * inv_k + eps))
    else:
        inv = _inv_rms(ss, K, eps)
    y = ((x.to(tl.float32) * inv) * w.to(tl.float32)).to(x.dtype)
    tl.store(y_ptr + row * K + cols, y, mask=mask)


@triton.jit
def _half(x_ptr, w_ptr, y_ptr, first, M, stride, K, inv_k, eps, BLOCK: tl.constexpr,
          ROWS: tl.constexpr, INV: tl.constexpr):  # fmt: skip
    cols = tl.arange(0, BLOCK)
    w = tl.load(w_ptr + cols, mask=cols < K, other=0.0)
    _pdl_start()
    for i in tl.static_range(ROWS):
        if first + i < M:
            _row(first + i, x_ptr, w, y_ptr, stride, K, inv_k, eps, BLOCK, INV)


@triton.jit
def q_kv_variant_kernel(q_ptr, qw_ptr, y_ptr, kv_ptr, kvw_ptr, kv_out_ptr, M, q_stride, kv_stride,
                        K_Q, K_KV, inv_kq, inv_kkv, eps, BLOCK_Q: tl.constexpr,
                        BLOCK_KV: tl.constexpr, ROWS: tl.constexpr, INV_Q: tl.constexpr,
                        INV_KV: tl.constexpr):  # fmt: skip
    first = tl.program_id(0).to(tl.int64) * ROWS
    if tl.program_id(1) == 0:
        _half(q_ptr, qw_ptr, y_ptr, first, M, q_stride, K_Q, inv_kq, eps, BLOCK_Q, ROWS, INV_Q)
    else:
        _half(kv_ptr, kvw_ptr, kv_out_ptr, first, M, kv_stride, K_KV, inv_kkv, eps, BLOCK_KV, ROWS,
              INV_KV)  # fmt: skip


def variant(
    inv: int,
    outputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    rows: int | None = None,
    warps: int | None = None,
) -> Callable:
    def run(q, wq, kv, wkv):  # type: ignore[no-untyped-def]
        m, kq, kkv = q.shape[0], q.shape[1], kv.shape[1]
        bq, bkv = triton.next_power_of_2(kq), triton.next_power_of_2(kkv)
        y, kv_out = outputs or (q.new_empty((m, kq)), kv.new_empty((m, kkv)))
        per_program = rows or q_kv_rows_per_program(bq, m, False)

        def inv_of(k: int) -> int:  # the product only where it is exact
            return INV_EXACT if inv == INV_POW2_PRODUCT and k & (k - 1) else inv

        q_kv_variant_kernel[((m + per_program - 1) // per_program, 2)](
            q, wq, y, kv, wkv, kv_out, m, q.stride(0), kv.stride(0), kq, kkv, 1.0 / kq, 1.0 / kkv,
            EPS, BLOCK_Q=bq, BLOCK_KV=bkv, ROWS=per_program, INV_Q=inv_of(kq), INV_KV=inv_of(kkv),
            num_warps=warps or row_warps(bq, m), launch_pdl=True,
        )  # fmt: skip
        return y, kv_out

    return run


def bench_shape(vllm: Any, q_lora: int, t: int) -> dict[str, Any]:
    q, wq, kv, wkv = split_projection(t, q_lora)
    ours = ops.q_kv_rms_norm(q, wq, EPS, kv, wkv, EPS)
    given = (torch.empty_like(q), torch.empty_like(kv))
    variants = {
        "exact": variant(INV_EXACT),
        "exact, ss*(1/K)": variant(INV_POW2_PRODUCT),
        "rsqrt.approx": variant(INV_RSQRT_APPROX),
        "exact by FMA": variant(INV_BY_FMA),
        "exact by FMA, 1 row/program": variant(INV_BY_FMA, rows=1),
        "exact by FMA, 2 rows/program": variant(INV_BY_FMA, rows=2),
        "exact, outputs given": variant(INV_EXACT, given),
    }
    fns: dict[str, Callable[[], Any]] = {
        "op": lambda: ops.q_kv_rms_norm(q, wq, EPS, kv, wkv, EPS),
        "vLLM": lambda: vllm_q_kv(vllm, q, kv, wq, wkv, EPS, False),
        "vLLM+PDL": lambda: vllm_q_kv(vllm, q, kv, wq, wkv, EPS, True),
    }
    equal = {}
    for name, fn in variants.items():
        got = fn(q, wq, kv, wkv)
        equal[name] = all(torch.equal(a, b) for a, b in zip(got, ours, strict=True))
        fns[name] = lambda fn=fn: fn(q, wq, kv, wkv)
    times = bench_interleaved(fns)
    print(f"q_lora {q_lora}, {t} tokens", flush=True)
    for name, us in times.items():
        same = {True: "same bytes as the op", False: "other bytes"}.get(equal.get(name))
        print(f"  {name:22s} {us:7.3f} µs  {same or ''}", flush=True)
    return {"q_lora": q_lora, "tokens": t, "us": times, "equal_to_op": equal}


def warps_grid_shape(q_lora: int, t: int) -> None:
    """Rows per program × warps of the variant kernel (other bytes where the warp count differs
    from the op's: the sum order follows it)."""
    q, wq, kv, wkv = split_projection(t, q_lora)
    fns: dict[str, Callable[[], Any]] = {"op": lambda: ops.q_kv_rms_norm(q, wq, EPS, kv, wkv, EPS)}
    for inv in (INV_EXACT, INV_BY_FMA):
        for rows in (1, 2, 4):
            for warps in (2, 4, 8):
                fn = variant(inv, rows=rows, warps=warps)
                fns[f"inv{inv} r{rows} w{warps}"] = lambda fn=fn: fn(q, wq, kv, wkv)
    times = bench_interleaved(fns)
    print(q_lora, t, " ".join(f"{k}={v:.2f}" for k, v in times.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-source", required=True, help="vLLM's fused_qk_rmsnorm.py")
    parser.add_argument("--json", default=None)
    parser.add_argument("--warps-grid", action="store_true", help="rows × warps near 1024 rows")
    args = parser.parse_args()
    vllm = load_vllm_kernel(args.vllm_source)
    warm_up()
    if args.warps_grid:  # near 1024 rows
        for q_lora, t in ((1024, 512), (1024, 1024), (1024, 1536), (1536, 1024), (1536, 1536)):
            warps_grid_shape(q_lora, t)
        return
    torch.manual_seed(0)
    tokens = (1, 16, 128, 1024, 2048, 4096, 8192)
    rows = [bench_shape(vllm, q_lora, t) for q_lora in (1024, 1536) for t in tokens]
    report(rows, args.json)


if __name__ == "__main__":
    main()
