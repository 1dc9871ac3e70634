"""A row over several programs at decode sizes: norm_quant_kernel's SPLIT (NVIDIA).

    python benchmarks/row_split.py [--json out.json] [--rows 1 4 16] [--widths 512 1536 4096 7168]
        [--splits 1 2 4 8 16] [--warps 4 8 16] [--floor]

``launch_policy.norm_launch`` splits a row of at most ``NORM_SPLIT_MAX_ROWS`` rows into up to
``NORM_MAX_SPLIT`` programs of whole quant groups (``launch_policy.smallest_part``; same warps,
hence the same sums: the same bytes, tests/gpu/test_row_split.py). This times the norm ops
(rms_norm, fused_add_rms_norm, and each with MXFP4, FP8-group-128 and FP8 per-token quant) with
the policy's record for the rows and SPLIT 1, 2, 4, 8 or 16 instead of its own, to set those
thresholds. ``--warps``: also with these warp counts instead of the record's (other warps give
other sums, so other bytes: a choice among them is a change of ``launch_policy.row_warps``, the
rule the standalone and fused launches share). ``--floor``: the launch floor at each shape and
split: kernels of the same grid that only wait for their predecessor (PDL), or copy the row.
Timing: CUDA-graph replay, median of three interleaved rounds (benchmarks/kernels.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import triton
import triton.language as tl

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
    rows: int, kdim: int, split: int, two_maxes: bool = False, warps: int | None = None
) -> dict[str, Callable[[], Any]]:
    """The norm ops over ``rows`` rows of ``kdim``, launched with the policy's record for them and
    ``split`` programs per row (left out where a part would be smaller than a quant group); a split
    quant takes its blocks' amax from one integer max, as the policy launches it, and with
    ``two_maxes`` also from a float max and a NaN test (" (two maxes)"); ``warps``: that many
    warps instead of the record's."""
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
            forced = replace(
                launch, split=split, int_amax=policy.amax_by_one_max(split, scheme, residual),
                num_warps=warps or launch.num_warps,
            )  # fmt: skip
            name = f"{'add+' if residual else ''}rms{suffix}"
            variants = {name: forced}
            if forced.int_amax and two_maxes:
                variants[f"{name} (two maxes)"] = replace(forced, int_amax=False)
            for label, f in variants.items():
                calls[label] = lambda res=(r if residual else None), s=scheme, p=params, f=f: (
                    triton_backend.norm_quant(x, res, w, EPS, s, p, s is None, launch=f)
                )
    return calls


@triton.jit
def _floor_kernel(x_ptr, y_ptr, K, PARTS, PART: tl.constexpr, COPY: tl.constexpr):
    """Program p: part p % PARTS of row p // PARTS, after the PDL wait: nothing, or a copy."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()
    if COPY:
        row = (tl.program_id(0) // PARTS).to(tl.int64)
        cols = (tl.program_id(0) % PARTS) * PART + tl.arange(0, PART)
        part = tl.load(x_ptr + row * K + cols, mask=cols < K)
        tl.store(y_ptr + row * K + cols, part, mask=cols < K)


def floor_calls(rows: int, kdim: int, split: int, warps: int) -> dict[str, Callable[[], Any]]:
    """The launch floor of rows · split programs of ``warps`` warps, with PDL: a kernel that only
    waits for its predecessor, and one that copies the rows (bf16) as the split programs own
    them."""
    x = torch.randn(rows, kdim, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    part = triton.next_power_of_2(kdim) // split
    parts = -(-kdim // part)
    return {
        f"floor: {name} ({warps} warps)": lambda copy=copy: _floor_kernel[(rows * parts,)](
            x, y, kdim, parts, PART=part, COPY=copy, num_warps=warps, launch_pdl=True
        )
        for name, copy in (("empty", False), ("copy", True))
    }


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
    parser.add_argument("--splits", type=int, nargs="+", default=list(SPLITS))
    parser.add_argument("--warps", type=int, nargs="+", default=[], help="also these warps")
    parser.add_argument("--floor", action="store_true", help="also the launch floor")
    parser.add_argument(
        "--two-maxes", action="store_true", help="also time split quants with two reductions"
    )
    args = parser.parse_args()
    warm_up()
    torch.manual_seed(0)
    out = []
    combos = [(s, None) for s in args.splits] + [(s, w) for w in args.warps for s in args.splits]
    for kdim in args.widths:
        for rows in args.rows:
            by_combo = {
                f"{s}" if w is None else f"{s}/{w}w": op_calls(rows, kdim, s, args.two_maxes, w)
                for s, w in combos
            }
            if args.floor:  # each split, with the record's warps for these rows and --warps
                own = policy.row_warps(policy.next_power_of_2(kdim), rows)
                for s, w in combos:
                    key = f"{s}" if w is None else f"{s}/{w}w"
                    by_combo[key] = {**by_combo[key], **floor_calls(rows, kdim, s, w or own)}
            names = dict.fromkeys(n for calls in by_combo.values() for n in calls)
            for name in names:
                fns = {c: calls[name] for c, calls in by_combo.items() if name in calls}
                times = bench_interleaved(fns)
                best = min((t, c) for c, t in times.items() if t is not None)[1]
                split = policy_split(name, rows, kdim) if not name.startswith("floor") else "-"
                print(
                    f"{name:26s} {rows:3d}×{kdim:<5d} "
                    + "  ".join(f"{c} {us:5.2f}" for c, us in times.items() if us is not None)
                    + f"   best {best}, policy {split}",
                    flush=True,
                )
                out.append(
                    {"op": name, "rows": rows, "kdim": kdim, "us_by_split": times,
                     "policy_split": split}
                )  # fmt: skip
    report(out, args.json)


if __name__ == "__main__":
    main()
