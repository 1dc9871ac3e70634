"""End-to-end decode step of the reference DeepSeek-V4: eager vs torch.compile without the pass vs
torch.compile with FusionPass(), on one GPU.

    python benchmarks/e2e_decode.py --preset flash --layers 8 --experts 64 --batch 1 8 64
    python benchmarks/e2e_decode.py --gemm emulated ...   # the definition's emulated GEMMs
    python benchmarks/e2e_decode.py --tp 2 ...     # tensor parallel on 2 GPUs (rank 0 reports)

Per variant: step latency (CUDA events, median of repeated identical steps: a decode step at a
fixed position rewrites the same cache slots) launched from Python and replayed as one CUDA graph
(``torch.cuda.CUDAGraph`` captured around the step, as vLLM does), CUDA kernels per step
(profiler), peak memory growth over a step, and the logits of the compiled variants compared bit
for bit (pass vs no pass, graph replay vs launch) and against eager. Compiles are static per batch
size (``dynamic=False``: one graph each, counted), ``fullgraph=True`` (no graph breaks).

``--gemm native`` (default) runs the model as a server would (``dsv4_model.model``): FP8 weights
into ``torch._scaled_mm`` (block-wise for the FP8 1×128 linears) and routed experts through
``torch._scaled_grouped_mm`` (``--act-quant fp8_per_token``, default: the one expert scheme with a
grouped FP8 kernel on Hopper; other schemes go through ``torch._grouped_mm`` on the dequantized
activation). ``--gemm emulated`` computes the experts densely, so keep ``--experts`` small there.
The GPU-time share of fusion_ops' kernels (standalone ops without the pass, fused ops with it)
is printed per variant: the regions the pass rewrites, plus the standalone ops it leaves (the
wo_b and expert down-projection quants, the inverse rope).
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import socket
import statistics
from collections import Counter
from typing import Any

import torch
import triton  # ships with CUDA builds of torch; the benchmark needs a CUDA GPU
from torch.profiler import ProfilerActivity, profile

import dsv4_model as dm
from fusion_passes import FusionPass

DEV = "cuda"


def step_ms(fn: Any, step: dm.Step, reps: int = 30, inner: int = 1) -> float:
    """Median over ``reps`` samples of the mean time of ``inner`` back-to-back steps."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn(step, True)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def interleaved_step_ms(
    fns: dict[str, Any], step: dm.Step, reps: int = 40, inner: int = 5
) -> dict[str, float]:
    """Launched step ms per variant, the variants' samples interleaved (A B, B A, A B, ...) so a
    drift of the shared host's speed hits every variant alike: median over ``reps`` samples of
    the mean of ``inner`` back-to-back steps."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for rep in range(reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            times[name].append(step_ms(fns[name], step, reps=1, inner=inner))
    return {name: statistics.median(t) for name, t in times.items()}


def _fusion_ops_kernels() -> frozenset[str]:
    """Names of the Triton kernels fusion_ops launches (what the profiler calls them)."""
    from fusion_ops.triton_backend import kernels

    return frozenset(n for n in dir(kernels) if n.endswith("_kernel"))


def kernel_profile(fn: Any, step: dm.Step) -> tuple[Counter[str], dict[str, float]]:
    """CUDA kernels launched by one step, by name, and their GPU µs per name (profiler)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(step, True)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    us: Counter[str] = Counter()
    for e in events:
        us[e.name] += e.device_time
    return Counter(e.name for e in events), dict(us)


def as_cuda_graph(fn: Any, step: dm.Step) -> tuple[Any, torch.Tensor]:
    """Capture one step as a CUDA graph (warm-up on a side stream first); returns (replay, out)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(step, True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(step, True)
    return (lambda _step, _decode: graph.replay()), out


def gemm_kinds(model: dm.DSV4Model) -> dict[str, str]:
    """Which GEMM each quantized projection of the first layer runs (None: emulated)."""
    block = model.layers[0]
    kinds = {name: getattr(block.attn, name).kind for name in ("wqkv_a", "wq_b", "wo_b")}
    kinds |= {"experts": block.moe.kind, "shared_expert": block.moe.shared_kind}
    return {name: kind or "dequantized activation, bf16" for name, kind in kinds.items()}


def peak_mb(fn: Any, step: dm.Step) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(step, True)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="flash", choices=["flash", "pro"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--gemm", default="native", choices=["native", "emulated"])
    p.add_argument(
        "--act-quant", default="fp8_per_token", choices=["fp8_per_token", "fp8_group", "mxfp8"]
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--cached", type=int, default=300)
    p.add_argument("--residual", default="add", choices=["add", "mhc"])
    p.add_argument("--json", default=None)
    p.add_argument(
        "--launch-rounds",
        type=int,
        default=0,
        help="re-time the launched (no CUDA graph) step this many more rounds per batch size "
        "(compiled variants only), the variants' samples interleaved within each round "
        "(spread of the CPU-bound launch timing)",
    )
    p.add_argument(
        "--inductor-launch",
        action="store_true",
        help="add a variant compiled with FusionPass(inductor_launch=True)",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor parallel over this many GPUs (one process each, NCCL, multicast off); "
        "rank 0 prints and writes the JSON",
    )
    args = p.parse_args()
    if args.tp > 1:
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(_tp_worker, args=(port, args), nprocs=args.tp)
    else:
        run(args)


def _tp_worker(rank: int, port: int, args: argparse.Namespace) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", rank=rank, world_size=args.tp, device_id=torch.device("cuda", rank)
    )
    try:
        run(args, dm.TensorParallel(dist.group.WORLD.group_name, rank, args.tp))
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, tp: dm.TensorParallel | None = None) -> None:
    """The benchmark on this process's GPU (with ``tp``: this rank's part; rank 0 reports)."""
    rank0 = tp is None or tp.rank == 0
    print = builtins.print if rank0 else (lambda *a, **k: None)  # noqa: A001
    torch._dynamo.config.recompile_limit = 64
    cfg = dm.PRESETS[args.preset](
        args.layers,
        n_routed_experts=args.experts,
        residual=args.residual,
        gemm=args.gemm,
        act_quant=args.act_quant,
    )
    kinds = ", ".join(cfg.layer_kind(i) for i in range(cfg.n_layers))
    routing = "routed" if cfg.gemm == "native" else "dense"
    print(
        f"{cfg.name}: hidden {cfg.hidden_size}, {cfg.n_heads} heads, layers ({kinds}), "
        f"{cfg.n_routed_experts} experts ({routing}, input {cfg.act_quant}), "
        f"residual={cfg.residual}, gemm={cfg.gemm}, cached={args.cached}"
        + (f", tensor parallel {tp.world}" if tp else ""),
        flush=True,
    )
    max_len = args.cached + 16
    model, caches = dm.build(cfg, max(args.batch), max_len, DEV, tp=tp)
    gemms = gemm_kinds(model)
    gib = torch.cuda.memory_allocated() / 2**30
    print(f"GEMMs: {gemms}; weights and caches {gib:.1f} GiB", flush=True)
    prompts, _ = dm.token_ids(cfg, max(args.batch), args.cached, 1)
    with torch.no_grad():
        for seq in range(max(args.batch)):  # fill the caches once (eager prefill)
            model(caches.prefill_step(seq, prompts[seq]), False)
    fusion_pass = FusionPass()
    variants = {
        "eager": model,
        "compiled": torch.compile(model, fullgraph=True, dynamic=False),
        "compiled+FusionPass": torch.compile(
            model,
            fullgraph=True,
            dynamic=False,
            options={"post_grad_custom_post_pass": fusion_pass},
        ),
    }
    if args.inductor_launch:
        variants["compiled+FusionPass(inductor_launch)"] = torch.compile(
            model,
            fullgraph=True,
            dynamic=False,
            options={"post_grad_custom_post_pass": FusionPass(inductor_launch=True)},
        )
    rows: list[dict[str, Any]] = []
    names: dict[str, dict[str, int]] = {}
    print(
        f"{'batch':>5s} {'variant':36s} {'step ms':>8s} {'graph ms':>8s} {'kernels':>8s}"
        f" {'peak MB':>8s} {'our krn':>7s} {'GPU µs':>9s} {'our µs':>9s} {'share':>6s}",
        flush=True,
    )
    for b in args.batch:
        ids = torch.randint(0, cfg.vocab_size, (b,))
        step = caches.decode_step(ids, torch.full((b,), args.cached, dtype=torch.int64))
        logits = {}
        with torch.no_grad():
            for name, fn in variants.items():
                logits[name] = fn(step, True).clone()  # compiles on first use
                fn(step, True)
                kernels, kernel_us = kernel_profile(fn, step)
                ours = _fusion_ops_kernels()
                row = {
                    "batch": b,
                    "variant": name,
                    "step_ms": step_ms(fn, step),
                    "kernels": sum(kernels.values()),
                    "kernels_fusion_ops": sum(n for k, n in kernels.items() if k in ours),
                    # profiler GPU µs of one step: all kernels, and those of fusion_ops' ops
                    # (the regions the pass rewrites: standalone ops before, fused ones after)
                    "gpu_us": sum(kernel_us.values()),
                    "gpu_us_fusion_ops": sum(t for k, t in kernel_us.items() if k in ours),
                    "peak_mb": peak_mb(fn, step),
                }
                replay, graph_out = as_cuda_graph(fn, step)
                row["graph_ms"] = step_ms(replay, step, reps=50, inner=10)
                row["graph_equal"] = torch.equal(graph_out, logits[name])
                rows.append(row)
                names[f"{name}/batch{b}"] = dict(kernels.most_common())
                top = sorted(kernel_us.items(), key=lambda kv: -kv[1])[:25]
                row["top_kernels_us"] = {k[:120]: round(t, 1) for k, t in top}
                print(
                    f"{b:5d} {name:36s} {row['step_ms']:8.3f} {row['graph_ms']:8.3f}"
                    f" {row['kernels']:8d} {row['peak_mb']:8.1f}"
                    f" {row['kernels_fusion_ops']:7d} {row['gpu_us']:9.1f}"
                    f" {row['gpu_us_fusion_ops']:9.1f}"
                    f" {row['gpu_us_fusion_ops'] / row['gpu_us']:6.1%}",
                    flush=True,
                )
                del replay, graph_out
        if args.launch_rounds:
            rounds: dict[str, list[float]] = {name: [] for name in variants}
            launched = {name: fn for name, fn in variants.items() if name != "eager"}
            with torch.no_grad():
                for _ in range(args.launch_rounds):
                    for name, ms in interleaved_step_ms(launched, step).items():
                        rounds[name].append(ms)
            rounds = {name: t for name, t in rounds.items() if t}
            faster = [
                p < c
                for p, c in zip(rounds["compiled+FusionPass"], rounds["compiled"], strict=True)
            ]
            print(
                "      launched step ms per round: "
                + "; ".join(f"{n} {', '.join(f'{t:.3f}' for t in v)}" for n, v in rounds.items())
                + f"; pass faster in {sum(faster)}/{len(faster)} rounds",
                flush=True,
            )
            rows.append({"batch": b, "launch_rounds_ms": rounds, "pass_faster": faster})
        same = all(
            torch.equal(logits["compiled"], out)
            for name, out in logits.items()
            if name.startswith("compiled+")
        )
        rel = (logits["compiled+FusionPass"] - logits["eager"]).norm() / logits["eager"].norm()
        print(
            f"      pass vs no pass bitwise equal: {same}; vs eager rel L2 {rel.item():.2%}",
            flush=True,
        )
        rows.append({"batch": b, "bitwise_equal": same, "rel_l2_vs_eager": rel.item()})
    graphs = len(fusion_pass.graphs)
    print(f"graphs compiled with the pass: {graphs} (one per batch size)", flush=True)
    print("matches:", json.dumps(fusion_pass.match_table), flush=True)
    if args.json and rank0:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "config": cfg.name,
                    "layers": cfg.n_layers,
                    "experts": cfg.n_routed_experts,
                    "gemm": cfg.gemm,
                    "act_quant": cfg.act_quant,
                    "residual": cfg.residual,
                    "cached": args.cached,
                    "gemm_kinds": gemms,
                    "tp": tp.world if tp else 1,
                    "rows": rows,
                    "matches": fusion_pass.match_table,
                    "graphs_compiled": graphs,
                    "kernel_names": names,
                    "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "triton": triton.__version__,
                },
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
