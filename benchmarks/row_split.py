"""A row over several programs at decode sizes: norm_quant_kernel's SPLIT (NVIDIA).

    python benchmarks/row_split.py [--json out.json] [--rows 1 4 16] [--widths 512 1536 4096 7168]

``launch_policy.norm_launch`` splits a row of at most ``NORM_SPLIT_MAX_ROWS`` rows into up to
``NORM_MAX_SPLIT`` programs of whole quant groups (``launch_policy.smallest_part``; same warps,
hence the same sums: the same bytes, tests/gpu/test_row_split.py). This times the norm ops
(rms_norm, fused_add_rms_norm, and each with MXFP4, FP8-group-128 and FP8 per-token quant) with
the policy's record for the rows and SPLIT 1, 2, 4, 8 or 16 instead of its own, to set those
thresholds.
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
from benchmarks.kernels import bench_interleaved, report, warm_up
from fusion_ops import launch_policy as policy

EPS = 1e-6
SPLITS = (1, 2, 4, 8, 16)
SCHEMES: dict[str, tuple[str | None, tuple[Any, ...]]] = {
    "": (None, ()),
    "→mxfp4": ("mxfp4", ()),
    "→fp8_group128": ("fp8_group", (128, False, torch.float8_e4m3fn)),
    "→fp8_per_token": ("fp8_per_token", (False, torch.float8_e4m3fn)),
}


def op_calls(
    rows: int, kdim: int, split: int, two_maxes: bool = False
) -> dict[str, Callable[[], Any]]:
    """The norm ops over ``rows`` rows of ``kdim``, launched with the policy's record for them and
    ``split`` programs per row (left out where a part would be smaller than a quant group); a split
    quant takes its blocks' amax from one integer max, as the policy launches it, and with
    ``two_maxes`` also from a float max and a NaN test (" (two maxes)")."""
    x = torch.randn(rows, kdim, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = (1 + 0.1 * torch.randn(kdim, device="cuda")).to(torch.bfloat16)
    device = triton_backend.device_facts(0)
    calls: dict[str, Callable[[], Any]] = {}
    for suffix, (scheme, params) in SCHEMES.items():
        for residual in (False, True):
            launch = policy.norm_launch(
                kdim, rows, device, scheme=scheme, params=params, residual=residual
            )
            if launch.block_k // split < policy.smallest_part(scheme, params):
                continue
            forced = replace(launch, split=split, int_amax=policy.amax_by_one_max(split, scheme))
            name = f"{'add+' if residual else ''}rms{suffix}"
            variants = {name: forced}
            if forced.int_amax and two_maxes:
                variants[f"{name} (two maxes)"] = replace(forced, int_amax=False)
            for label, f in variants.items():
                calls[label] = lambda res=(r if residual else None), s=scheme, p=params, f=f: (
                    triton_backend.norm_quant(x, res, w, EPS, s, p, s is None, launch=f)
                )
    return calls


def policy_split(name: str, rows: int, kdim: int) -> int:
    """The split the policy gives the op ``name`` (as op_calls names it) over these rows."""
    op = name.removesuffix(" (two maxes)")
    scheme, params = SCHEMES[op.removeprefix("add+").removeprefix("rms")]
    device = triton_backend.device_facts(0)
    residual = op.startswith("add+")
    return policy.norm_launch(
        kdim, rows, device, scheme=scheme, params=params, residual=residual
    ).split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1536, 4096, 7168])
    parser.add_argument(
        "--two-maxes", action="store_true", help="also time split quants with two reductions"
    )
    args = parser.parse_args()
    warm_up()
    torch.manual_seed(0)
    out = []
    for kdim in args.widths:
        for rows in args.rows:
            by_split = {s: op_calls(rows, kdim, s, args.two_maxes) for s in SPLITS}
            names = dict.fromkeys(n for calls in by_split.values() for n in calls)
            for name in names:
                fns = {str(s): by_split[s][name] for s in SPLITS if name in by_split[s]}
                times = bench_interleaved(fns)
                best = min((t, s) for s, t in times.items() if t is not None)[1]
                print(
                    f"{name:20s} {rows:3d}×{kdim:<5d} "
                    + "  ".join(f"split {s} {us:5.2f}" for s, us in times.items())
                    + f"   best {best}, policy {policy_split(name, rows, kdim)}",
                    flush=True,
                )
                out.append(
                    {"op": name, "rows": rows, "kdim": kdim, "us_by_split": times,
                     "policy_split": policy_split(name, rows, kdim)}
                )  # fmt: skip
    report(out, args.json)


if __name__ == "__main__":
    main()
