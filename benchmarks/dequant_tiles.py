"""The DSV4 KV-cache dequant kernel's launch: tokens per program and warps (NVIDIA).

    python benchmarks/dequant_tiles.py [--blocks 5 64 320 1024] [--tokens 2 4 8 16 32]
        [--warps 1 2 4 8] [--json out.json]

``launch_policy.dequant_launch`` gives ``dequant_dsv4_kernel`` a record (tokens of a 64-token
cache block per program, warps); every record gives the same bytes (each output element depends
on its token's slot alone; tests/gpu/test_triton_kernels.py). This times the bf16 dequant
(``dequant_cache``) and the fused dequant → FP8 (``dequant_cache_fp8``) with every record of the
grid given, against the policy's, at decode sizes (5 blocks: one sequence of 300 cached tokens)
and beyond. Timing: CUDA-graph replay, median of three interleaved rounds (benchmarks/kernels.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

import fusion_ops
from benchmarks.kernels import bench_interleaved, report, warm_up
from fusion_ops import launch_policy as policy
from fusion_ops.triton_backend.rope_cache import dequant

FN = torch.float8_e4m3fn
BLOCK_SIZE = 64


def calls(
    blocks: int, tokens: list[int], warps: list[int], fp8: bool
) -> dict[str, Callable[[], Any]]:
    """The dequant of ``blocks`` random blocks with the policy's record and each (tokens, warps)."""
    cache = fusion_ops.alloc_mla_cache(blocks + 1, BLOCK_SIZE, device="cuda")
    cache.random_(0, 200)
    ids = torch.randperm(blocks + 1, device="cuda")[:blocks]
    out_dtype = FN if fp8 else None
    want = dequant(cache, ids, "dsv4_fp8", out_dtype)
    fns: dict[str, Callable[[], Any]] = {
        "policy": lambda: dequant(cache, ids, "dsv4_fp8", out_dtype)
    }
    for tok in tokens:
        for w in warps:
            launch = policy.DequantLaunch(tokens=tok, num_warps=w)
            got = dequant(cache, ids, "dsv4_fp8", out_dtype, launch)
            if not torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
                raise AssertionError(f"{launch}: other bytes than the policy's record")
            fns[f"{tok}t/{w}w"] = lambda launch=launch: dequant(
                cache, ids, "dsv4_fp8", out_dtype, launch
            )
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[5, 64, 320, 1024])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warm_up()
    torch.manual_seed(0)
    out = []
    for blocks in args.blocks:
        for fp8 in (False, True):
            times = bench_interleaved(calls(blocks, args.tokens, args.warps, fp8))
            rec = policy.dequant_launch(BLOCK_SIZE)
            best = min((t, name) for name, t in times.items() if t is not None)
            print(
                f"{'fp8 ' if fp8 else 'bf16'} {blocks:5d} blocks: policy ({rec.tokens}t/"
                f"{rec.num_warps}w) {times['policy']:6.2f}  best {best[1]} {best[0]:6.2f}   "
                + " ".join(f"{n} {t:.2f}" for n, t in times.items() if n != "policy"),
                flush=True,
            )
            out.append({"blocks": blocks, "fp8": fp8, "us": times,
                        "policy": [rec.tokens, rec.num_warps]})  # fmt: skip
    report(out, args.json)


if __name__ == "__main__":
    main()
