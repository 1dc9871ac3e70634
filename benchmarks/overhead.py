"""Host cost per op call: what a fusion_ops call costs the CPU, next to the floors it competes with.

    python benchmarks/overhead.py [--device cpu|cuda|both] [--json out.json]

Rows, for ``rms_norm → MXFP4`` of one token (``[1, 256]`` on the CPU, ``[1, 7168]`` on the GPU):

* ``eager standalone``: ``ops.rms_norm`` then ``ops.mxfp4_quant`` (two op calls);
* ``eager fused``: ``ops.rms_norm_mxfp4_quant``;
* ``compiled + FusionPass``: the standalone pair under ``torch.compile`` with ``FusionPass()``,
  whose graph holds the one fused op (checked: one match);
* ``compiled + FusionPass(inductor_launch=True)`` (NVIDIA): the same, with the fused op's Triton
  kernel launched by Inductor itself;
* ``Inductor, same math``: the reference backend's plain-torch norm and MXFP4 quant under
  ``torch.compile`` (Inductor's own kernel(s));
* ``dynamic tokens: …`` (NVIDIA): the three compiled rows again on two tokens with the token
  dim marked dynamic, as vLLM compiles (the graph serves every count >= 2);
* ``x + x``: one eager aten op, the floor of any eager call;
* validation (``--device cpu``): each op's full argument check next to its one-expression fast
  path (``quick``, :data:`fusion_ops.library.QUICK_CHECKS`), what a Python kernel saves by it
  (the C++ kernels make the same check in C++);
* CPU only: ``ops.rms_norm`` next to the same math in plain torch (the reference function),
  the wrapper overhead of the op layer, and a bare ``torch.library.Library`` op whose CPU kernel
  is that plain function (the floor any Python-kernel op pays: dispatcher and Python kernel
  holder, no validation, no backend selection).

Host time per call: the wall time of a loop of calls divided by its length, with the GPU kept
ahead (every call here costs the GPU a few µs, the host far more, so the loop measures the host).
Rounds alternate between the rows; the median of the rounds is reported.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import fusion_ops
from fusion_ops import backends
from fusion_ops import launch_policy as policy
from fusion_ops.reference import norm as ref_norm
from fusion_ops.reference import quant as ref_quant
from fusion_passes import FusionPass

ops = torch.ops.fusion_ops
EPS = 1e-6


def per_call_us(
    fns: dict[str, Callable[[], Any]], sync: Callable[[], None], calls: int, rounds: int
) -> dict[str, float]:
    """Median over ``rounds`` of the mean wall µs per call; rows alternate within a round."""
    for fn in fns.values():  # warm up: compile, autotune caches, allocator
        for _ in range(20):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


# The floor of any op whose kernel is Python: a Library op registered for the CPU key whose
# kernel is the plain-torch function itself (no validation, no backend selection).
_FLOOR_LIB = torch.library.Library("fusion_ops_overhead_floor", "DEF")
_FLOOR_LIB.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_FLOOR_LIB.impl("rms_norm", ref_norm.rms_norm, "CPU")
_bare_rms_norm = torch.ops.fusion_ops_overhead_floor.rms_norm.default


def plain_norm_mxfp4(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same math in plain torch: the reference backend's functions."""
    return ref_quant.mxfp4_quant(ref_norm.rms_norm(x, w, EPS))


def standalone(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ops.mxfp4_quant(ops.rms_norm(x, w, EPS))


def measure(device: str, calls: int, rounds: int) -> dict[str, Any]:
    hidden = 256 if device == "cpu" else 7168
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, hidden, generator=gen).to(device, torch.bfloat16)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, torch.bfloat16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    # caches off for the whole run: a warm FX graph cache would skip the pass (no fusion)
    torch._inductor.config.force_disable_caches = True
    fusion = FusionPass(fusions=["rms_quant"], schemes=["mxfp4"])
    compiled_pass = torch.compile(
        standalone, fullgraph=True, dynamic=False, options={"post_grad_custom_post_pass": fusion}
    )
    compiled_pass(x, w)
    launched = None
    if device == "cuda" and torch.version.hip is None:
        fusion_launch = FusionPass(fusions=["rms_quant"], schemes=["mxfp4"], inductor_launch=True)
        launched = torch.compile(
            standalone,
            fullgraph=True,
            dynamic=False,
            options={"post_grad_custom_post_pass": fusion_launch},
        )
        launched(x, w)
        if fusion_launch.graphs[0].inductor_launched != 1:
            raise RuntimeError("inductor_launch did not lower the fused op")
    inductor_same_math = torch.compile(plain_norm_mxfp4, fullgraph=True, dynamic=False)
    inductor_same_math(x, w)
    if fusion.matched_count != 1:
        raise RuntimeError(f"expected the pass to fuse once, got {fusion.match_table}")
    fused_out = ops.rms_norm_mxfp4_quant(x, w, EPS)[:2]

    def same(out: tuple[torch.Tensor, ...]) -> bool:
        return all(torch.equal(a, b) for a, b in zip(out, fused_out, strict=True))

    if launched is not None and not same(launched(x, w)):
        raise RuntimeError("compiled+pass(inductor_launch) computes different codes/scales")
    if not (same(standalone(x, w)) and same(compiled_pass(x, w))):
        raise RuntimeError("standalone, fused and compiled+pass compute different codes/scales")

    fns: dict[str, Callable[[], Any]] = {
        "eager standalone (2 ops)": lambda: standalone(x, w),
        "eager fused": lambda: ops.rms_norm_mxfp4_quant(x, w, EPS),
        "compiled + FusionPass (1 fused op)": lambda: compiled_pass(x, w),
        "Inductor, same math": lambda: inductor_same_math(x, w),
        **(
            {"compiled + FusionPass(inductor_launch=True)": lambda: launched(x, w)}
            if launched is not None
            else {}
        ),
        "x + x": lambda: x + x,
    }
    if device == "cpu":
        fns["ops.rms_norm"] = lambda: ops.rms_norm(x, w, EPS)
        fns["rms_norm, plain torch"] = lambda: ref_norm.rms_norm(x, w, EPS)
        fns["bare Library op, kernel = plain fn"] = lambda: _bare_rms_norm(x, w, EPS)
    if device == "cuda" and torch.version.hip is None:
        fns.update(dynamic_token_rows(x, w))
    us = per_call_us(fns, sync, calls, rounds)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or platform.machine(),
        "shape": [1, hidden],
        "backend": fusion_ops.last_backend("rms_norm_mxfp4_quant"),
        "us_per_call": us,
        "compiled_over_inductor": us["compiled + FusionPass (1 fused op)"]
        / us["Inductor, same math"],
        "inductor_same_bits": same(inductor_same_math(x, w)),
        **(
            {
                "inductor_launch_over_inductor": us["compiled + FusionPass(inductor_launch=True)"]
                / us["Inductor, same math"]
            }
            if launched is not None
            else {}
        ),
    }
    if device == "cpu":
        result["rms_norm_wrapper_us"] = us["ops.rms_norm"] - us["rms_norm, plain torch"]
        result["dispatcher_floor_us"] = (
            us["bare Library op, kernel = plain fn"] - us["rms_norm, plain torch"]
        )
        result["validation_us"] = validation_us(x, w, calls * 10, rounds)
    return result


def validation_us(
    x: torch.Tensor, w: torch.Tensor, calls: int, rounds: int
) -> dict[str, dict[str, float]]:
    """µs per call of each op's full check (``validate``) and of its fast path (``quick``) on
    valid arguments, as the Python kernel receives them (every schema argument, in order)."""
    from fusion_ops.library import QUICK_CHECKS

    r = torch.randn_like(x)
    tensors = {
        "rms_norm": (x, w, EPS),
        "fused_add_rms_norm": (x, r, w, EPS),
        "mxfp4_quant": (x,),
        "rms_norm_mxfp4_quant": (x, w, EPS),
        "add_rms_norm_mxfp4_quant": (x, r, w, EPS),
        "q_kv_rms_norm_mxfp4_quant": (x, w, EPS, x, w, EPS),
    }
    out = {}
    for name, given in tensors.items():
        schema = getattr(ops, name).default._schema
        args = (*given, *(a.default_value for a in schema.arguments[len(given) :]))
        validate, quick = QUICK_CHECKS[name]
        if not quick(*args):
            raise RuntimeError(f"{name}: the fast path refuses valid arguments")
        checks = {
            "full": functools.partial(validate, *args),
            "quick": functools.partial(quick, *args),
        }
        out[name] = per_call_us(checks, lambda: None, calls, rounds)
    # the backend choice: cached per (op, device type, forced backend) against the search
    kind = x.device.type
    selection = {  # a miss of the cache runs exactly the "full" call
        "full": lambda: backends._select("rms_norm_mxfp4_quant", torch.device(kind), None),
        "quick": lambda: backends._selected("rms_norm_mxfp4_quant", kind, None),
    }
    out["backend selection (full: search, quick: cached)"] = per_call_us(
        selection, lambda: None, calls, rounds
    )
    return out


def dynamic_token_rows(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """The compiled rows again with the token dim dynamic (as vLLM compiles; 2 tokens: Dynamo
    specializes a size-1 dim)."""
    x2 = x.expand(2, -1).contiguous()
    rows: dict[str, Callable[[], Any]] = {}
    # a symbolic row count is lowered only where every count >= 2 gets the same warps (the sum's
    # order): not at 7168 columns, whose warps change at policy.MANY_ROWS rows, so there the
    # inductor_launch row runs the fused op as an extern call like the row above it
    lowerable = not policy.warps_depend_on_row_count(policy.next_power_of_2(x.shape[-1]), False)
    for name, fn, fusion in (
        ("dynamic tokens: compiled + FusionPass", standalone, FusionPass(fusions=["rms_quant"])),
        (
            "dynamic tokens: compiled + FusionPass(inductor_launch=True)",
            standalone,
            FusionPass(fusions=["rms_quant"], inductor_launch=True),
        ),
        ("dynamic tokens: Inductor, same math", plain_norm_mxfp4, None),
    ):
        options = {"post_grad_custom_post_pass": fusion} if fusion is not None else {}
        compiled = torch.compile(fn, fullgraph=True, dynamic=False, options=options)
        torch._dynamo.mark_dynamic(x2, 0)
        compiled(x2, w)
        if fusion is not None and (
            fusion.matched_count != 1
            or fusion.graphs[0].inductor_launched != int(fusion.inductor_launch and lowerable)
        ):
            raise RuntimeError(f"{name}: not fused/lowered as expected: {fusion.match_table}")
        rows[name] = lambda compiled=compiled: compiled(x2, w)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="both", choices=["cpu", "cuda", "both"])
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--json")
    p.add_argument(
        "--profile", action="store_true", help="also cProfile eager fused calls (top functions)"
    )
    args = p.parse_args()
    devices = ["cpu", "cuda"] if args.device == "both" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass
    for device in devices:
        r = report[device] = measure(device, args.calls, args.rounds)
        print(f"\n{device}: {r['device']}, shape {r['shape']}, backend {r['backend']}")
        for name, v in r["us_per_call"].items():
            print(f"  {name:60s} {v:8.1f} µs")
        print(f"  compiled+pass / Inductor: {r['compiled_over_inductor']:.2f}x")
        u = r["us_per_call"]
        if "dynamic tokens: Inductor, same math" in u:
            for row in ("compiled + FusionPass", "compiled + FusionPass(inductor_launch=True)"):
                ratio = u[f"dynamic tokens: {row}"] / u["dynamic tokens: Inductor, same math"]
                print(f"  dynamic tokens: {row} / Inductor: {ratio:.2f}x")
        if "inductor_launch_over_inductor" in r:
            ratio = r["inductor_launch_over_inductor"]
            print(f"  compiled+pass(inductor_launch) / Inductor: {ratio:.2f}x")
        if "rms_norm_wrapper_us" in r:
            print(f"  ops.rms_norm wrapper over plain torch: {r['rms_norm_wrapper_us']:.1f} µs")
            print(f"  of which the dispatcher floor (bare op): {r['dispatcher_floor_us']:.1f} µs")
        for name, v in r.get("validation_us", {}).items():
            print(f"  check of {name}: full {v['full']:.2f} µs, quick {v['quick']:.2f} µs")
        if args.profile:
            profile_fused(device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def profile_fused(device: str, calls: int = 2000) -> None:
    """Where the host time of an eager fused call goes (cProfile, by own time)."""
    import cProfile
    import pstats

    hidden = 256 if device == "cpu" else 7168
    x = torch.randn(1, hidden, device=device, dtype=torch.bfloat16)
    w = torch.ones(hidden, device=device, dtype=torch.bfloat16)
    for _ in range(20):
        ops.rms_norm_mxfp4_quant(x, w, EPS)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        ops.rms_norm_mxfp4_quant(x, w, EPS)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
