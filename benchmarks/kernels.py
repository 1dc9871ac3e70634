"""Kernel benchmarks on one GPU, in one run: fused op vs the standalone ops (each its own kernel)
vs torch.compile's own fusion of the same math written in plain torch (the reference backend's
code, compiled by Inductor), with achieved bandwidth against a measured device copy.

    python benchmarks/kernels.py [--quick] [--json out.json]

Timing: CUDA-graph replay (triton.testing.do_bench_cudagraph), median. Bytes: each input read
once, each output written once. Peak extra memory: max_memory_allocated growth over one call
minus the call's outputs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import triton
from triton.testing import do_bench_cudagraph

import fusion_ops
from fusion_ops.reference import cache as ref_cache
from fusion_ops.reference import norm as ref_norm
from fusion_ops.reference import rope as ref_rope

ops = torch.ops.fusion_ops
DEV = "cuda"
EPS = 1e-6
FN = torch.float8_e4m3fn


def bench(fn: Callable[[], Any]) -> float | None:
    """Median µs of one call, replayed from a CUDA graph (None if it cannot be captured)."""
    try:
        fn()
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3
    except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the rest
        print(f"  (not timed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
        torch.cuda.synchronize()
        return None


def warm_up(seconds: float = 2.0) -> None:
    """Keep the GPU busy for a while before the first timing, so it runs at its working clocks
    (the first rows timed in a fresh process read slow otherwise: 1.35 vs 1.08 µs, same kernel)."""
    a = torch.randn(4096, 4096, device=DEV, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def bench_interleaved(fns: dict[str, Callable[[], Any]], rounds: int = 3) -> dict[str, Any]:
    """Median over ``rounds`` rounds of bench(fn), the functions taking turns in each round,
    so drift of clocks or of the machine hits every one alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(rounds):
        names = list(fns) if i % 2 == 0 else list(reversed(fns))
        for name in names:
            us = bench(fns[name])
            if us is not None:
                times[name].append(us)
    return {name: statistics.median(ts) if ts else None for name, ts in times.items()}


def report(rows: list[dict[str, Any]], json_path: str | None) -> None:
    """Print the device and versions; write ``{"meta": …, "rows": rows}`` to ``json_path``."""
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps(meta))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy, counting bytes read + written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (us * 1e-6) / 1e9


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def extra_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by one call beyond its outputs."""
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return peak - nbytes(*[o for o in outs if isinstance(o, torch.Tensor)])


def inductor(fn: Callable[..., Any], dynamic: bool = False) -> Callable[..., Any]:
    """Inductor's own fusion of ``fn``; static shapes (one compile per shape) unless dynamic."""
    return torch.compile(fn, dynamic=dynamic, fullgraph=True)


def row(
    name: str,
    shape: str,
    fused: float,
    unfused: float,
    compiled: float | None,
    moved: int,
    copy_gbs: float,
    extra: int,
) -> dict[str, Any]:
    gbs = moved / (fused * 1e-6) / 1e9
    r = {
        "op": name,
        "shape": shape,
        "fused_us": fused,
        "unfused_us": unfused,
        "inductor_us": compiled,
        "speedup_vs_unfused": (unfused / fused) if unfused else None,
        "speedup_vs_inductor": (compiled / fused) if compiled else None,
        "bandwidth_gbs": gbs,
        "pct_of_copy": 100 * gbs / copy_gbs,
        "extra_bytes": extra,
    }
    print_row(r)
    return r


def bench_norm_quant(
    tokens_list: list[int], hiddens: list[int], copy_gbs: float, only: list[str] | None = None
) -> list[dict]:
    """The norm → quant rows; ``only``: the cases whose label holds one of these strings."""
    rows = []
    cases = [
        ("rms_norm→mxfp4", "mxfp4", (), False),
        ("rms_norm→mxfp8", "mxfp8", (), False),
        ("rms_norm→fp8_group128", "fp8_group", (128, False, FN), False),
        ("rms_norm→fp8_group128_ue8m0", "fp8_group", (128, True, FN), False),
        ("rms_norm→fp8_per_token", "fp8_per_token", (False, FN), False),
        ("add_rms_norm→mxfp4", "mxfp4", (), True),
        ("add_rms_norm→fp8_group128", "fp8_group", (128, False, FN), True),
    ]
    for label, scheme, params, add in cases:
        if only and not any(o in label for o in only):
            continue
        s = fusion_ops.SCHEMES[scheme]
        quant, ref_q = getattr(ops, s.quant_op), s.reference
        fused = getattr(ops, s.add_rms_op if add else s.rms_op)

        def composite(x, r, w, ref_q=ref_q, params=params, add=add):  # plain torch, for Inductor
            if add:
                y, res = ref_norm.fused_add_rms_norm(x, r, w, EPS)
                return (*ref_q(y, *params), res)
            return ref_q(ref_norm.rms_norm(x, w, EPS), *params)

        # static shapes for the anchored case (rms_norm→mxfp4), one dynamic compile for the rest
        compiled = inductor(composite, dynamic=label != "rms_norm→mxfp4")
        for hidden in hiddens if label == "rms_norm→mxfp4" else hiddens[-1:]:
            for t in tokens_list:
                x = torch.randn(t, hidden, device=DEV, dtype=torch.bfloat16)
                r = torch.randn_like(x)
                w = torch.randn(hidden, device=DEV, dtype=torch.bfloat16)
                if add:
                    f = lambda: fused(x, r, w, EPS, *params)  # noqa: E731

                    def u():
                        y, res = ops.fused_add_rms_norm(x, r, w, EPS)
                        return (*quant(y, *params), res)
                else:
                    f = lambda: fused(x, w, EPS, *params)  # noqa: E731
                    u = lambda: quant(ops.rms_norm(x, w, EPS), *params)  # noqa: E731
                c = lambda: compiled(x, r, w)  # noqa: E731
                out = f()
                moved = nbytes(x, w, *(o for o in out if o.numel())) + (nbytes(r) if add else 0)
                rows.append(
                    row(
                        label,
                        f"{t}x{hidden}",
                        bench(f),
                        bench(u),
                        bench(c),
                        moved,
                        copy_gbs,
                        extra_memory(f),
                    )
                )
    return rows


def bench_rope_cache(tokens_list: list[int], heads: int, copy_gbs: float) -> list[dict]:
    rows = []

    def composite(pos, q, kv, cs, cache, slots):
        """The same math in plain torch; every slot is valid here, so no data-dependent mask
        (which would sync and break CUDA-graph capture)."""
        qr = ref_rope.rope(pos, q, cs, 64, False)
        kr = ref_rope.rope(pos, kv, cs, 64, False)
        data, scales = ref_cache.encode_dsv4(kr)
        rows = ref_cache.block_rows(cache)
        block, off = (slots // 64).unsqueeze(1), (slots % 64).unsqueeze(1)
        rows[block, off * 576 + torch.arange(576, device=DEV)] = data
        rows[block, 64 * 576 + off * 8 + torch.arange(8, device=DEV)] = scales
        return qr, kr

    compiled = inductor(composite)
    for t in tokens_list:
        q = torch.randn(t, heads, 512, device=DEV, dtype=torch.bfloat16)
        kv = torch.randn(t, 512, device=DEV, dtype=torch.bfloat16)
        pos = torch.randint(0, 8192, (t,), device=DEV)
        cs = torch.randn(8192, 64, device=DEV)
        nb = triton.cdiv(t, 64) + 1
        cache = fusion_ops.alloc_mla_cache(nb, 64, device=DEV)
        slots = torch.arange(t, device=DEV)

        def f():
            return ops.rope_mla_cache_write(pos, q, kv, cs, cache, slots, 64, False, "dsv4_fp8")

        def u():
            qr = ops.rope(pos, q, cs, 64, False)
            kr = ops.rope(pos, kv, cs, 64, False)
            ops.mla_cache_write(kr, cache, slots, "dsv4_fp8")
            return qr, kr

        c = lambda: compiled(pos, q, kv, cs, cache, slots)  # noqa: E731
        moved = 2 * nbytes(q) + 2 * nbytes(kv) + t * 584 + nbytes(pos, slots)
        rows.append(
            row(
                f"rope→mla_cache_write (H={heads})",
                f"{t} tok",
                bench(f),
                bench(u),
                bench(c),
                moved,
                copy_gbs,
                extra_memory(f),
            )
        )
    return rows


def bench_dequant(blocks_list: list[int], copy_gbs: float) -> list[dict]:
    rows = []
    compiled = inductor(lambda c, i: ref_cache.dequant_cache(c, i, "dsv4_fp8").to(FN))
    for nb in blocks_list:
        cache = fusion_ops.alloc_mla_cache(nb + 1, 64, device=DEV)
        cache.random_(0, 200)
        ids = torch.randperm(nb + 1, device=DEV)[:nb]
        f = lambda: ops.dequant_cache_fp8(cache, ids, "dsv4_fp8", FN)  # noqa: E731
        u = lambda: ops.dequant_cache(cache, ids, "dsv4_fp8").to(FN)  # noqa: E731
        c = lambda: compiled(cache, ids)  # noqa: E731
        moved = nb * 64 * (584 + 512)
        rows.append(
            row(
                "dequant_cache→fp8",
                f"{nb} blocks ({nb * 64} tok)",
                bench(f),
                bench(u),
                bench(c),
                moved,
                copy_gbs,
                extra_memory(f),
            )
        )
    return rows


HEAD = (
    f"{'op':34s} {'shape':22s} {'fused µs':>9s} {'unfused µs':>10s} {'inductor µs':>11s}"
    f" {'×unfused':>8s} {'×inductor':>9s} {'GB/s':>7s} {'%copy':>6s} {'extra B':>8s}"
)


def bench_aiter_mxfp4(source: str, tokens_list: list[int]) -> list[dict]:
    """AITER's own fused_rms_mxfp4_quant (its Triton source) vs ours, same GPU, same run."""
    from fusion_ops import aiter_backend

    aiter_backend.import_source_tree(source)
    aiter = aiter_backend.kernels()["mxfp4"]
    rows = []
    print(f"{'rms_norm→mxfp4, hidden 7168':34s} {'tokens':>8s} {'ours µs':>9s} {'AITER µs':>9s}")
    for t in tokens_list:
        x = torch.randn(t, 7168, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(7168, device=DEV, dtype=torch.bfloat16)
        ours = bench(lambda: ops.rms_norm_mxfp4_quant(x, w, EPS))
        theirs = bench(lambda: aiter(x, w, EPS))
        print(f"{'':34s} {t:8d} {ours:9.1f} {theirs:9.1f}", flush=True)
        rows.append({"tokens": t, "ours_us": ours, "aiter_us": theirs})
    return rows


def print_row(r: dict[str, Any]) -> None:
    ind = f"{r['inductor_us']:11.1f}" if r["inductor_us"] else f"{'-':>11s}"
    xi = f"{r['speedup_vs_inductor']:9.2f}" if r["speedup_vs_inductor"] else f"{'-':>9s}"
    un = f"{r['unfused_us']:10.1f}" if r["unfused_us"] else f"{'-':>10s}"
    xu = f"{r['speedup_vs_unfused']:8.2f}" if r["speedup_vs_unfused"] else f"{'-':>8s}"
    print(
        f"{r['op']:34s} {r['shape']:22s} {r['fused_us']:9.1f} {un} {ind}"
        f" {xu} {xi} {r['bandwidth_gbs']:7.0f}"
        f" {r['pct_of_copy']:6.1f} {r['extra_bytes']:8d}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer shapes (smoke run)")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--aiter-source",
        default=None,
        help="unpacked amd-aiter wheel: also time AITER's fused_rms_mxfp4_quant",
    )
    parser.add_argument("--only-aiter", action="store_true", help="only the AITER comparison")
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="only the norm → quant cases naming one of these (and the dequant rows: 'dequant')",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    warm_up()
    torch._dynamo.config.recompile_limit = 256  # one compile per (case, shape)
    torch._dynamo.config.accumulated_recompile_limit = 4096
    tokens = [1, 128, 8192] if args.quick else [1, 16, 128, 1024, 8192, 32768]
    hiddens = [7168] if args.quick else [4096, 7168]
    aiter_rows = bench_aiter_mxfp4(args.aiter_source, tokens) if args.aiter_source else []
    if args.only_aiter:
        return
    copy_gbs = copy_bandwidth()
    print(f"device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    print(HEAD)
    rows = bench_norm_quant(tokens, hiddens, copy_gbs, args.only)
    if not args.only:
        rope_tokens = [1, 16, 128] if args.quick else [1, 16, 128, 1024, 8192]
        rows += bench_rope_cache(rope_tokens, 64, copy_gbs)
    if not args.only or "dequant" in args.only:  # 4 blocks: one decode sequence's 256 tokens
        rows += bench_dequant([4, 64] if args.quick else [4, 64, 1024, 8192], copy_gbs)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "copy_gbs": copy_gbs,
    }
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows, "aiter": aiter_rows}, fh, indent=1)


if __name__ == "__main__":
    main()
