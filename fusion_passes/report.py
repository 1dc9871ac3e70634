"""``python -m fusion_passes report``: compile the reference DeepSeek-V4 with the pass, run it,
compare with eager, print what fused where, and leave dumps behind."""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and the package are imported after the arguments are checked
    import torch

    from .fusion_pass import FusionPass


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fusion_passes report", description=__doc__)
    p.add_argument("--preset", default="tiny", choices=["tiny", "flash", "pro"])
    p.add_argument(
        "--layers", type=_positive, default=None, help="number of layers (default: 3 tiny, 4 else)"
    )
    p.add_argument(
        "--residual",
        default="add",
        choices=["add", "mhc"],
        help="add: V3/R1 residual stream (all four families occur); mhc: V4 proper",
    )
    p.add_argument("--act-quant", default="mxfp8", choices=["mxfp4", "mxfp8", "fp8_group"])
    p.add_argument(
        "--phase",
        default="both",
        choices=["prefill", "decode", "both"],
        help="decode also runs the prefill it continues from (eagerly if 'decode')",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=_positive, default=2)
    p.add_argument("--prompt-len", type=_positive, default=130)
    p.add_argument("--decode-steps", type=_positive, default=2)
    p.add_argument("--dump-dir", default="dumps")
    p.add_argument("--backend", default=None, help="force a fusion_ops backend")
    p.add_argument(
        "--numerics",
        default="exact",
        choices=["exact", "tolerant"],
        help="FusionPass(numerics=...): tolerant also fuses plain-PyTorch norms (+tolerant labels)",
    )
    return p


def _say(msg: str) -> None:
    print(msg, flush=True)


def _usable_dump_dir(parser: argparse.ArgumentParser, dump_dir: str) -> Path:
    path = Path(dump_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".fusion_passes_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        parser.error(f"--dump-dir {dump_dir}: cannot write there ({error.strerror or error})")
    return path


def _available_bytes(device: str) -> int | None:
    """Free memory the model would live in (None: unknown)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _check_fits(parser: argparse.ArgumentParser, cfg: Any, device: str) -> None:
    """Refuse, before building anything, a model whose weights (two copies: the eager and the
    compiled run) do not fit in the device's free memory."""
    import torch

    from dsv4_model.model import DSV4Model

    with torch.device("meta"):
        weights = sum(p.numel() * p.element_size() for p in DSV4Model(cfg, seed=0).parameters())
    need, have = 2 * weights, _available_bytes(device)
    if have is not None and need > have:
        parser.error(
            f"--preset {cfg.name} with {cfg.n_layers} layers needs about {need / 1e9:.0f} GB on "
            f"{device} (two copies of {weights / 1e9:.1f} GB of weights), {have / 1e9:.0f} GB "
            "are free: use --preset tiny, fewer --layers, or a larger device"
        )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    dump_dir = _usable_dump_dir(parser, args.dump_dir)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if not args.device.startswith(("cpu", "cuda")):
        parser.error(f"--device {args.device}: expected cpu or cuda[:N]")

    import dsv4_model as dm
    import fusion_ops

    from .fusion_pass import FusionPass
    from .testing import fresh_inductor

    if args.backend:
        fusion_ops.set_backend(args.backend)
    overrides: dict[str, Any] = {"residual": args.residual, "act_quant": args.act_quant}
    preset = dm.PRESETS[args.preset]
    cfg = preset(**overrides) if args.preset == "tiny" else preset(args.layers or 4, **overrides)
    if args.preset == "tiny" and args.layers:  # cycle the layer kinds SWA, CSA, HCA
        ratios = tuple((1, 4, 128)[i % 3] for i in range(args.layers))
        cfg = cfg.replace(n_layers=args.layers, compress_ratios=ratios)
    _check_fits(parser, cfg, args.device)
    kinds = ", ".join(cfg.layer_kind(i) for i in range(cfg.n_layers))
    _say(
        f"model: DeepSeek-V4 '{cfg.name}', {cfg.n_layers} layers ({kinds}), "
        f"residual={cfg.residual}, "
        f"experts' input quant={cfg.act_quant}, linears={cfg.linear_quant}, device={args.device}"
    )
    max_len = args.prompt_len + args.decode_steps + 8
    prompts, decode_ids = dm.token_ids(cfg, args.batch, args.prompt_len, args.decode_steps)
    if args.phase == "prefill":
        decode_ids = decode_ids[:0]

    t0 = time.perf_counter()
    _say("[1/3] eager run (reference numbers) ...")
    model, caches = dm.build(cfg, args.batch, max_len, args.device)
    eager = dm.run(caches, model, model, prompts, decode_ids)
    _say(f"      done in {time.perf_counter() - t0:.1f} s")

    fusion_pass = FusionPass(dump_dir=dump_dir, numerics=args.numerics)
    _say(
        f"[2/3] compiling with FusionPass(numerics={args.numerics!r}) "
        f"({fusion_pass.pattern_count} patterns registered in "
        f"{fusion_pass.registration_s:.2f} s); Inductor compiles one graph per phase — about a "
        "minute each on 2 CPU cores ..."
    )
    model, caches = dm.build(cfg, args.batch, max_len, args.device)
    with fresh_inductor():
        compiled = torch.compile(
            model, options={"post_grad_custom_post_pass": fusion_pass}, fullgraph=True
        )
        prefill = model if args.phase == "decode" else _progress(compiled, "prefill", t0)
        fused = dm.run(caches, prefill, _progress(compiled, "decode", t0), prompts, decode_ids)
    _say(f"[3/3] comparing with eager ({time.perf_counter() - t0:.1f} s so far)")
    _print_table(fusion_pass)
    _print_numerics(eager, fused, args.phase)
    _say(
        f"\ndumps: {dump_dir.resolve()}/ (graph_<n>.before.py / .after.py, patterns.py, "
        "summary.json)"
    )
    _say(f"total {time.perf_counter() - t0:.1f} s")
    return 0


def _progress(compiled: Any, phase: str, t0: float) -> Any:
    state = {"first": True}

    def call(step: Any, decode: bool) -> torch.Tensor:
        if state["first"]:
            _say(f"      {phase}: compiling + first run ...")
        out = compiled(step, decode)
        if state["first"]:
            _say(f"      {phase}: compiled ({time.perf_counter() - t0:.1f} s so far)")
            state["first"] = False
        return out

    return call


def _print_table(p: FusionPass) -> None:
    """One row per match label (a family without a match: one row), each with what is that
    family's own: its matches and its near misses; then the op counts of the whole run (an op
    such as ``rms_norm`` is the input of several families, so its count is not any one's)."""
    from patterns import FAMILIES

    before: dict[str, int] = defaultdict(int)
    after: dict[str, int] = defaultdict(int)
    misses_of: dict[str, int] = defaultdict(int)
    misses: dict[str, int] = defaultdict(int)
    for g in p.graphs:
        for op, n in g.ops_before.items():
            before[op] += n
        for op, n in g.ops_after.items():
            after[op] += n
        for m in g.near_misses:
            misses_of[m.family] += 1
            misses[f"{m.op}: {m.reason}"] += 1
    rows = [("family/variant/dtype", "matches", "near misses")]
    for family in FAMILIES:
        labels = sorted(k for k in p.match_table if k.startswith(family + "/"))
        missed = str(misses_of[family]) if misses_of[family] else "-"
        if not labels:
            rows.append((f"{family} (no match)", "0", missed))
        for i, label in enumerate(labels):
            rows.append((label, str(p.match_table[label]), missed if i == 0 else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    _say("")
    for j, row in enumerate(rows):
        _say(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if j == 0:
            _say("  ".join("-" * w for w in widths))
    _say(f"total matches: {p.matched_count} in {len(p.graphs)} graphs")
    ops = sorted(set(before) | set(after))
    changed = [f"{op} {before[op]}→{after[op]}" for op in ops if before[op] != after[op]]
    kept = [f"{op} {before[op]}" for op in ops if before[op] == after[op]]
    _say("fusion_ops calls, whole run (before → after): " + (", ".join(changed) or "unchanged"))
    if kept:
        _say("  unchanged: " + ", ".join(kept))
    if misses:
        _say("left alone (near misses):")
        for text, n in sorted(misses.items()):
            _say(f"  {n}× {text}")


def _print_numerics(eager: Any, fused: Any, phase: str) -> None:
    def worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
        diffs = [(x.float() - y.float()).abs().max().item() for x, y in zip(a, b, strict=True)]
        rel = [((x - y).norm() / y.norm()).item() for x, y in zip(a, b, strict=True)]
        return max(diffs, default=0.0), max(rel, default=0.0)

    _say("")
    if phase != "decode":
        d, r = worst(fused.prefill_logits, eager.prefill_logits)
        _say(f"prefill logits vs eager: max |diff| {d:.4g}, relative L2 {r:.2%}")
    if fused.decode_logits:
        d, r = worst(fused.decode_logits, eager.decode_logits)
        _say(f"decode logits vs eager:  max |diff| {d:.4g}, relative L2 {r:.2%}")
    _say(
        "(compiled vs eager: fp32 reduction order and fp32-kept bf16 intermediates, amplified by "
        "the quantizers; the pass itself changes no bit — tests/test_model_proof.py)"
    )


if __name__ == "__main__":
    sys.exit(main())
