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
split: kernels of the same grid that only wait for their predecessor (PDL), copy the row, or
also read the whole row (x, or x and a residual) in every program for a 1/rms, as a split norm
does.
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
def _floor_kernel(
    x_ptr, r_ptr, y_ptr, K, PARTS, PART: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr
):  # fmt: skip
    """Program p: part p % PARTS of row p // PARTS, after the PDL wait. MODE 0: nothing; 1: copy
    the part; 2: the part times 1/rms of the whole row x, each program reading the whole row (as
    a split norm program does); 3: the same of x + r (as a split add+norm program does)."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()
    if MODE > 0:
        row = (tl.program_id(0) // PARTS).to(tl.int64)
        cols = (tl.program_id(0) % PARTS) * PART + tl.arange(0, PART)
        part = tl.load(x_ptr + row * K + cols, mask=cols < K, other=0.0).to(tl.float32)
        if MODE > 1:
            full = tl.arange(0, BLOCK)
            xs = tl.load(x_ptr + row * K + full, mask=full < K, other=0.0).to(tl.float32)
            if MODE == 3:
                xs += tl.load(r_ptr + row * K + full, mask=full < K, other=0.0).to(tl.float32)
                part += tl.load(r_ptr + row * K + cols, mask=cols < K, other=0.0).to(tl.float32)
            part = part / tl.sqrt(tl.sum(xs * xs, axis=0) / K + 1e-6)
        tl.store(y_ptr + row * K + cols, part.to(y_ptr.dtype.element_ty), mask=cols < K)


FLOOR_MODES = {"empty": 0, "copy": 1, "row read + 1/rms": 2, "x + r rows read + 1/rms": 3}


def floor_calls(rows: int, kdim: int, split: int, warps: int) -> dict[str, Callable[[], Any]]:
    """The launch floor of rows · split programs of ``warps`` warps, with PDL (FLOOR_MODES: see
    _floor_kernel), bf16."""
    x = torch.randn(rows, kdim, device="cuda", dtype=torch.bfloat16)
    r, y = torch.randn_like(x), torch.empty_like(x)
    block = triton.next_power_of_2(kdim)
    parts = -(-kdim // (block // split))
    return {
        f"floor: {name} ({warps} warps)": lambda mode=mode: _floor_kernel[(rows * parts,)](
            x,
            r,
            y,
            kdim,
            parts,
            PART=block // split,
            BLOCK=block,
            MODE=mode,
            num_warps=warps,
            launch_pdl=True,
        )  # fmt: skip
        for name, mode in FLOOR_MODES.items()
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
