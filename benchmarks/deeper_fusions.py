"""Kernel benchmarks of the deeper DSV4 fusions on one GPU, in one run.

    python benchmarks/deeper_fusions.py [--json out.json]
        [--vllm-source <vllm>/models/common/ops/fused_qk_rmsnorm.py]

* ``q_kv_norm``: our one-launch q-lora ∥ kv norm (``q_kv_rms_norm``, and with the q FP8 1x128
  quant) vs our two standalone launches vs Inductor's fusion of the same math, and vs vLLM
  0.32's own Triton kernel ``fused_q_kv_rmsnorm`` (its source file, loaded without vLLM: the
  ``@triton.jit`` kernel is taken out of the file and launched as vLLM's launcher does, with
  and without PDL). Inputs are the two parts of one [T, q_lora + 512] bf16 projection.
* ``qnorm_rope_cache``: DSV4's per-head weightless q norm + q rope + kv rope + dsv4_fp8 write in
  one launch vs the four standalone ops, vs the q norm in plain PyTorch compiled by Inductor
  followed by the fused rope + write (what the pass gave before the family: two launches) and
  vs the four pieces compiled without the pass (the plain q norm: Inductor's kernel).
* ``norm_rope_cache``: the compressor chain (fp32 rows → norm → bf16 → rope → dsv4_fp8 cache)
  in one launch vs the four standalone ops, launched and compiled (Inductor fuses the cast).

Timing: CUDA-graph replay (triton.testing.do_bench_cudagraph: back-to-back calls in one graph),
median µs per call, after a GPU warm-up; ours vs vLLM: the median of three interleaved rounds.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import platform
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from kernels import bench, bench_interleaved, inductor, warm_up  # noqa: E402

import fusion_ops  # noqa: E402
from fusion_ops.reference import norm as ref_norm  # noqa: E402

ops = torch.ops.fusion_ops
DEV = "cuda"
EPS = 1e-6
FN = torch.float8_e4m3fn


def load_vllm_kernel(path: str) -> Any:
    """The ``kernel`` staticmethod of vLLM's ``FusedQKVRMSNormKernel`` as a Triton JITFunction
    (the file imports vLLM internals, so only the kernel's own source is taken)."""
    source = Path(path).read_text()
    tree = ast.parse(source)
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        if cls.name != "FusedQKVRMSNormKernel":
            continue
        fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "kernel")
        fn.decorator_list = []
        body = textwrap.dedent(ast.get_source_segment(source, fn) or "")
        text = f"import triton\nimport triton.language as tl\n\n\n@triton.jit\n{body}\n"
        out = Path(tempfile.mkdtemp()) / "vllm_fused_qk_rmsnorm_kernel.py"
        out.write_text(text)
        spec = importlib.util.spec_from_file_location(out.stem, out)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.kernel
    raise RuntimeError(f"{path}: no FusedQKVRMSNormKernel.kernel")


def vllm_q_kv(kernel: Any, qr, kv, q_w, kv_w, eps: float, pdl: bool):  # type: ignore[no-untyped-def]
    """vLLM's __call__ launch of the kernel (same grid, meta-parameters and warps)."""
    q_out, kv_out = torch.empty_like(qr), torch.empty_like(kv)
    block = triton.next_power_of_2(max(qr.shape[1], kv.shape[1]))
    kernel[(qr.shape[0], 2)](
        qr, q_out, q_w, qr.stride(0), q_out.stride(0), kv, kv_out, kv_w, kv.stride(0),
        kv_out.stride(0), eps, Q_SIZE=qr.shape[1], KV_SIZE=kv.shape[1], BLOCK_SIZE=block,
        launch_pdl=pdl, num_warps=8 if block >= 2048 else 4,
    )  # fmt: skip
    return q_out, kv_out


def split_projection(
    tokens: int, q_lora: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, q weight, kv, kv weight): the two parts of one random bf16 ``wq_a | wkv`` output
    [tokens, q_lora + 512] (views, as in DSV4) and norm weights near 1."""
    proj = torch.randn(tokens, q_lora + 512, device=DEV).to(torch.bfloat16)
    q, kv = proj.split([q_lora, 512], dim=-1)
    wq = (1 + 0.1 * torch.randn(q_lora, device=DEV)).to(torch.bfloat16)
    wkv = (1 + 0.1 * torch.randn(512, device=DEV)).to(torch.bfloat16)
    return q, wq, kv, wkv


def bench_q_kv(tokens_list: list[int], q_loras: list[int], vllm: Any | None) -> list[dict]:
    rows = []
    head = f"{'q_kv_norm':24s} {'tokens':>7s} {'ours':>7s} {'2 launches':>10s} {'Inductor':>9s}"
    head += f" {'+fp8 q':>7s} {'2 launches':>10s} {'vLLM':>7s} {'vLLM+PDL':>9s} {'equal %':>8s}"
    print(head)
    plain = inductor(lambda q, wq, kv, wkv: ref_norm.q_kv_rms_norm(q, wq, EPS, kv, wkv, EPS))
    for q_lora in q_loras:
        for t in tokens_list:
            q, wq, kv, wkv = split_projection(t, q_lora)
            r: dict[str, Any] = {"q_lora": q_lora, "tokens": t}
            # ours and vLLM's kernel (the must-show pair): three interleaved rounds
            head_to_head = {"ours_us": lambda: ops.q_kv_rms_norm(q, wq, EPS, kv, wkv, EPS)}
            if vllm is not None:
                head_to_head["vllm_us"] = lambda: vllm_q_kv(vllm, q, kv, wq, wkv, EPS, False)
                if torch.cuda.get_device_capability()[0] >= 9:
                    head_to_head["vllm_pdl_us"] = lambda: vllm_q_kv(vllm, q, kv, wq, wkv, EPS, True)
            r["vllm_us"] = r["vllm_pdl_us"] = r["equal_pct"] = None
            r.update(bench_interleaved(head_to_head))
            r["two_launches_us"] = bench(
                lambda: (ops.rms_norm(q, wq, EPS), ops.rms_norm(kv, wkv, EPS))
            )
            r["inductor_us"] = bench(lambda: plain(q, wq, kv, wkv))
            p = (128, False, FN)
            r["ours_fp8_us"] = bench(
                lambda: ops.q_kv_rms_norm_fp8_group_quant(q, wq, EPS, kv, wkv, EPS, *p)
            )
            r["two_launches_fp8_us"] = bench(
                lambda: (ops.rms_norm_fp8_group_quant(q, wq, EPS, *p), ops.rms_norm(kv, wkv, EPS))
            )
            if vllm is not None:
                ours = ops.q_kv_rms_norm(q, wq, EPS, kv, wkv, EPS)
                theirs = vllm_q_kv(vllm, q, kv, wq, wkv, EPS, False)
                same = sum(int((a == b).sum()) for a, b in zip(ours, theirs, strict=True))
                r["equal_pct"] = 100 * same / (ours[0].numel() + ours[1].numel())
                ulp = max(
                    int((a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max())
                    for a, b in zip(ours, theirs, strict=True)
                )
                r["max_ulp_diff"] = ulp
            rows.append(r)
            cells = [r[k] for k in ("ours_us", "two_launches_us", "inductor_us", "ours_fp8_us")]
            cells += [r[k] for k in ("two_launches_fp8_us", "vllm_us", "vllm_pdl_us")]
            text = " ".join(f"{c:9.2f}" if c is not None else f"{'-':>9s}" for c in cells)
            eq = f"{r['equal_pct']:8.4f}" if r["equal_pct"] is not None else "-"
            print(f"{'q_lora ' + str(q_lora) + ' + kv 512':24s} {t:7d} {text} {eq}", flush=True)
    return rows


def bench_norm_rope_cache(tokens_list: list[int]) -> list[dict]:
    rows = []
    print(f"{'norm_rope_cache (fp32→bf16, dsv4_fp8)':40s} {'tokens':>7s} {'fused':>7s}"
          f" {'4 ops':>7s} {'Inductor':>9s}")  # fmt: skip
    for t in tokens_list:
        x = torch.randn(t, 512, device=DEV)
        w = 1 + 0.1 * torch.randn(512, device=DEV)
        cs = torch.randn(max(t, 64) * 4, 64, device=DEV)
        pos = torch.arange(t, device=DEV) * 4
        blocks = max(t // 64 + 1, 2)
        cache = fusion_ops.alloc_mla_cache(blocks, 64, device=DEV)
        slots = torch.arange(t, device=DEV)
        args = (pos, x, w, EPS, cs, cache, slots, 64, False, "dsv4_fp8", torch.bfloat16)

        def standalone() -> None:
            y = ops.rms_norm(x, w, EPS).to(torch.bfloat16)
            ops.mla_cache_write(ops.rope(pos, y, cs, 64, False), cache, slots, "dsv4_fp8")

        compiled = inductor(standalone)  # the standalone ops compiled (no pass): Inductor
        # fuses what is plain torch (the cast); the reference's cache encode (data-dependent
        # scatter) does not capture in a CUDA graph, so it is not timed
        r = {
            "tokens": t,
            "fused_us": bench(lambda: ops.rms_norm_rope_mla_cache_write(*args)),
            "standalone_us": bench(standalone),
            "inductor_us": bench(compiled),
        }
        rows.append(r)
        cells = " ".join(
            f"{r[k]:7.2f}" if r[k] is not None else f"{'-':>7s}"
            for k in ("fused_us", "standalone_us", "inductor_us")
        )
        print(f"{'':40s} {t:7d} {cells}", flush=True)
    return rows


def bench_qnorm_rope_cache(tokens_list: list[int], heads: int) -> list[dict]:
    rows = []
    print(f"{f'qnorm_rope_cache (H={heads}, dsv4_fp8)':40s} {'tokens':>7s} {'fused':>7s}"
          f" {'4 ops':>7s} {'plain+rc':>9s} {'4 compiled':>10s}")  # fmt: skip
    for t in tokens_list:
        proj = torch.randn(t, (heads + 1) * 512, device=DEV).bfloat16() * 3
        q = proj[:, : heads * 512].view(t, heads, 512)
        kv = proj[:, heads * 512 :]
        cs = torch.randn(max(t, 64) * 4, 64, device=DEV)
        pos = torch.arange(t, device=DEV) * 4
        cache = fusion_ops.alloc_mla_cache(max(t // 64 + 1, 2), 64, device=DEV)
        slots = torch.arange(t, device=DEV)

        # every variant returns the roped q (a compiled function would drop an unused one)
        def standalone() -> torch.Tensor:
            q_rot = ops.rope(pos, ops.weightless_rms_norm(q, EPS), cs, 64, False)
            ops.mla_cache_write(ops.rope(pos, kv, cs, 64, False), cache, slots, "dsv4_fp8")
            return q_rot

        def plain_then_rope_cache() -> torch.Tensor:
            qn = ref_norm.weightless_rms_norm(q, EPS)  # plain torch: Inductor's kernel
            return ops.rope_mla_cache_write(pos, qn, kv, cs, cache, slots, 64, False, "dsv4_fp8")[0]

        def plain_four() -> torch.Tensor:
            q_rot = ops.rope(pos, ref_norm.weightless_rms_norm(q, EPS), cs, 64, False)
            ops.mla_cache_write(ops.rope(pos, kv, cs, 64, False), cache, slots, "dsv4_fp8")
            return q_rot

        args = (pos, q, EPS, kv, cs, cache, slots, 64, False, "dsv4_fp8")
        r = {
            "tokens": t,
            "heads": heads,
            "fused_us": bench(lambda: ops.qnorm_rope_mla_cache_write(*args)),
            "standalone_us": bench(standalone),
            "plain_norm_then_rope_cache_us": bench(inductor(plain_then_rope_cache)),
            "compiled_plain_four_us": bench(inductor(plain_four)),
        }
        rows.append(r)
        keys = ("fused_us", "standalone_us", "plain_norm_then_rope_cache_us")
        cells = " ".join(f"{r[k]:7.2f}" for k in keys)
        print(f"{'':40s} {t:7d} {cells} {r['compiled_plain_four_us']:10.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-source", default=None, help="vLLM's fused_qk_rmsnorm.py")
    parser.add_argument("--json", default=None)
    parser.add_argument("--only-qnorm", action="store_true", help="only the qnorm_rope_cache rows")
    parser.add_argument("--only-q-kv", action="store_true", help="only the q_kv_norm rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    warm_up()
    torch._dynamo.config.recompile_limit = 256
    vllm = load_vllm_kernel(args.vllm_source) if args.vllm_source else None
    q_kv = chain = qnorm = None
    if not args.only_qnorm:
        q_kv = bench_q_kv([1, 16, 128, 1024, 2048, 4096, 8192], [1024, 1536], vllm)
    if not (args.only_qnorm or args.only_q_kv):
        chain = bench_norm_rope_cache([1, 16, 128, 1024])
    if not args.only_q_kv:
        qnorm = bench_qnorm_rope_cache([1, 16, 128, 1024], heads=64)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "vllm_source": args.vllm_source,
    }
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as fh:
            out = {"meta": meta, "q_kv_norm": q_kv, "norm_rope_cache": chain}
            json.dump({**out, "qnorm_rope_cache": qnorm}, fh, indent=1)


if __name__ == "__main__":
    main()
