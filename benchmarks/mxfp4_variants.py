"""rms_norm → MXFP4 launch variants on one GPU, in one run: the row kernel (``norm_quant_kernel``,
SCHEME=1) at 4, 8 and 16 warps, with and without programmatic dependent launch (PDL, up to 128
tokens). Every variant's codes and scales are compared with the 8/16-warp launch without PDL
(bit-exact expected) and with the reference backend's codes (share equal). The kernel variants
tried in this session (row held as [blocks, 16, 2] or [blocks, 32], rows per program, chunked
rows) were slower and are gone; their numbers are in benchmarks/RESULTS.md.

    python benchmarks/mxfp4_variants.py [--json out.json]

Timing: CUDA-graph replay (triton.testing.do_bench_cudagraph), median µs; bandwidth as a share of
a measured device copy (bytes: x read once, codes and scales written once).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from triton.testing import do_bench_cudagraph

from fusion_ops.reference import norm as ref_norm
from fusion_ops.reference import quant as ref_quant
from fusion_ops.triton_backend import kernels as k
from fusion_ops.triton_backend.norms import _norm_quant_launch

EPS = 1e-6


def copy_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = do_bench_cudagraph(lambda: dst.copy_(src), rep=50, return_mode="median") * 1e3
    return 2 * src.numel() / (us * 1e-6) / 1e9


def run_general(x, w, q, s, warps, pdl):  # type: ignore[no-untyped-def]
    m, kdim = x.shape
    _norm_quant_launch(
        (m,),
        (x, x, w, x, x, q, s, x.stride(0), x.stride(0), kdim, EPS, 448.0, 1.0),
        (
            ("HAS_RES", False),
            ("DO_NORM", True),
            ("WRITE_Y", False),
            ("SCHEME", k.SCHEME_MXFP4),
            ("GROUP", 1),
            ("UE8M0", False),
            ("BLOCK_K", triton.next_power_of_2(kdim)),
            ("USE_PDL", pdl),
            ("num_warps", warps),
            ("launch_pdl", pdl),
        ),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--tokens", default="1,16,128,1024,8192,32768")
    p.add_argument("--json")
    args = p.parse_args()
    gbs = copy_gbs()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"copy bandwidth {gbs:.0f} GB/s; hidden {args.hidden}")
    results = []
    for m in [int(t) for t in args.tokens.split(",")]:
        gen = torch.Generator(device="cuda").manual_seed(m)
        x = torch.randn(m, args.hidden, device="cuda", generator=gen).to(torch.bfloat16)
        w = (1 + 0.1 * torch.randn(args.hidden, device="cuda", generator=gen)).to(torch.bfloat16)
        ref_q, ref_s = ref_quant.mxfp4_quant(ref_norm.rms_norm(x, w, EPS))
        nbytes = x.numel() * 2 + ref_q.numel() + ref_s.numel()
        old = {}  # the general kernel's bytes per warp count: the sum-of-squares order depends
        for nw in (4, 8, 16):  # on the warps, so variants are compared at equal warps
            old[nw] = (torch.empty_like(ref_q), torch.empty_like(ref_s))
            run_general(x, w, *old[nw], nw, False)
        variants = {}
        for nw in (4, 8, 16):
            for pdl in (False, True) if m <= 128 else (False,):
                tag = f"w{nw}{' pdl' if pdl else ''}"
                variants[f"general {tag}"] = (run_general, (nw, pdl))
        for name, (fn, extra) in variants.items():
            q = torch.empty_like(ref_q)
            s = torch.empty_like(ref_s)
            fn(x, w, q, s, *extra)
            torch.cuda.synchronize()
            want_q, want_s = old[extra[0]]
            exact = torch.equal(q, want_q) and torch.equal(s, want_s)
            ref_equal = (q == ref_q).float().mean().item()
            us = (
                do_bench_cudagraph(
                    lambda fn=fn, extra=extra, q=q, s=s, x=x, w=w: fn(x, w, q, s, *extra),
                    rep=50,
                    return_mode="median",
                )
                * 1e3
            )
            pct = 100 * nbytes / (us * 1e-6) / 1e9 / gbs
            results.append(
                {
                    "tokens": m,
                    "variant": name,
                    "us": us,
                    "pct_copy": pct,
                    "equal_general": exact,
                    "codes_equal_reference": ref_equal,
                }
            )
            print(
                f"  {m:6d} {name:22s} {us:9.2f} µs {pct:6.1f}% copy  equal to the general kernel: "
                f"{exact}  codes equal to reference: {100 * ref_equal:.4f}%"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_gbs": gbs, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
