"""Code people already run, with and without FusionPass(numerics="tolerant"), on one GPU.

    python benchmarks/plain_norms.py --json out.json            # both parts
    python benchmarks/plain_norms.py --part kernels|layers

``kernels``: transformers' RMSNorm spelling (weight after the cast back) → our quant op (what an
``ActQuantLinear`` runs), with or without a plain ``x + r`` before it, × 7168 columns:
Inductor's compile of it (its own norm kernel, then the quant op) against the same compile with
the pass (one fused op), CUDA-graph replay, medians of interleaved rounds; and how many normed
values / codes differ (the tolerant contract).

``layers``: a stack of transformers' own DeepseekV3DecoderLayers at V4-Flash-like dims (hidden
4096, q-lora 1024, kv-lora 512, 64 heads, MoE of 64 experts, top-6, one shared) behind
``quantize_(…, ActQuantConfig("fp8_group"))`` (block FP8 through ``torch._scaled_mm`` where
the shapes allow), a forward at decode-size and prefill-size token counts, compiled with and
without the pass, CUDA-graph replay.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import bench_interleaved, report, warm_up  # noqa: E402

from fusion_ops.linear import ActQuantConfig, quantize_  # noqa: E402
from fusion_passes import FusionPass  # noqa: E402

ops = torch.ops.fusion_ops
DEV = "cuda"
EPS = 1e-6
QUANTS = {
    "mxfp4": lambda y: ops.mxfp4_quant(y),
    "fp8_group128": lambda y: ops.fp8_group_quant(y, 128, False, torch.float8_e4m3fn),
    "fp8_per_token": lambda y: ops.fp8_per_token_quant(y, False, torch.float8_e4m3fn),
}


def hf_rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """transformers' DeepseekV3RMSNorm.forward."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return w * xf.to(x.dtype)


def compiled(fn: Any, fusion_pass: FusionPass | None) -> Any:
    options = {"post_grad_custom_post_pass": fusion_pass} if fusion_pass else {}
    return torch.compile(fn, fullgraph=True, options=options)


def differ(a: torch.Tensor, b: torch.Tensor) -> int:
    a = a.view(torch.uint8) if a.element_size() == 1 else a
    b = b.view(torch.uint8) if b.element_size() == 1 else b
    return int((a != b).sum())


def bench_kernels(tokens_list: list[int], hidden: int = 7168) -> list[dict[str, Any]]:
    rows = []
    for scheme, quant in QUANTS.items():
        for add in (False, True):

            def fn(x, r, w, quant=quant, add=add):  # type: ignore[no-untyped-def]
                h = x + r if add else x
                q, s = quant(hf_rms_norm(h, w))
                return q, s, h

            for tokens in tokens_list:
                x = torch.randn(tokens, hidden, device=DEV, dtype=torch.bfloat16)
                r = torch.randn_like(x)
                w = 1 + 0.1 * torch.randn(hidden, device=DEV, dtype=torch.bfloat16)
                p = FusionPass(numerics="tolerant")
                torch._dynamo.reset()
                inductor, fused = compiled(fn, None), compiled(fn, p)
                a, b = inductor(x, r, w), fused(x, r, w)
                times = bench_interleaved(
                    {"inductor": lambda: inductor(x, r, w), "pass": lambda: fused(x, r, w)}
                )
                row = {
                    "case": f"{'add+' if add else ''}hf_rms_norm->{scheme}",
                    "tokens": tokens,
                    "hidden": hidden,
                    "inductor_us": times["inductor"],
                    "pass_us": times["pass"],
                    "matches": dict(p.match_table),
                    "codes_differ": differ(a[0], b[0]),
                    "codes": a[0].numel(),
                    "residual_equal": bool(torch.equal(a[2], b[2])),
                }
                rows.append(row)
                print(row, flush=True)
    return rows


def flash_like_layers(n_layers: int) -> tuple[Any, Any, Any]:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    cfg = DeepseekV3Config(
        vocab_size=1024,
        hidden_size=4096,
        intermediate_size=8192,
        moe_intermediate_size=2048,
        num_hidden_layers=n_layers,
        num_attention_heads=64,
        num_key_value_heads=64,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=1024,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        max_position_embeddings=4096,
        rms_norm_eps=EPS,
    )
    cfg._experts_implementation = "grouped_mm"
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEV):
        layers = torch.nn.ModuleList(hf.DeepseekV3DecoderLayer(cfg, i) for i in range(n_layers))
        layers = layers.to(torch.bfloat16).eval().requires_grad_(False)
        for name, p in layers.named_parameters():
            if name.endswith("layernorm.weight"):
                p.data = 1 + 0.1 * torch.randn_like(p)
            else:
                torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
        rope = hf.DeepseekV3RotaryEmbedding(cfg)
    quantize_(layers, ActQuantConfig("fp8_group"))
    return cfg, layers, rope


def bench_layers(tokens_list: list[int], n_layers: int) -> list[dict[str, Any]]:
    cfg, layers, rope = flash_like_layers(n_layers)
    print(layers[1], flush=True)

    def forward(h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        embeddings = rope(h, positions)
        for layer in layers:
            h = layer(h, position_ids=positions, position_embeddings=embeddings)
        return h

    rows = []
    for tokens in tokens_list:
        h = torch.randn(1, tokens, cfg.hidden_size, device=DEV, dtype=torch.bfloat16)
        positions = torch.arange(tokens, device=DEV)[None]
        p = FusionPass(numerics="tolerant")
        torch._dynamo.reset()
        with torch.no_grad():
            inductor, fused = compiled(forward, None), compiled(forward, p)
            a, b = inductor(h, positions), fused(h, positions)
            eager = forward(h, positions)
            times = bench_interleaved(
                {
                    "inductor": lambda: inductor(h, positions),
                    "pass": lambda: fused(h, positions),
                }
            )
        row = {
            "case": f"transformers DeepseekV3 x{n_layers} (flash-like, fp8_group)",
            "tokens": tokens,
            "inductor_us": times["inductor"],
            "pass_us": times["pass"],
            "matches": dict(p.match_table),
            "max_abs_pass_vs_inductor": float((a.float() - b.float()).abs().max()),
            "max_abs_inductor_vs_eager": float((a.float() - eager.float()).abs().max()),
            "max_abs_pass_vs_eager": float((b.float() - eager.float()).abs().max()),
        }
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["kernels", "layers", "all"], default="all")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 8192])
    parser.add_argument("--layer-tokens", type=int, nargs="+", default=[1, 64, 2048])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warm_up()
    rows = []
    if args.part in ("kernels", "all"):
        rows += bench_kernels(args.tokens)
    if args.part in ("layers", "all"):
        rows += bench_layers(args.layer_tokens, args.layers)
    report(rows, args.json)


if __name__ == "__main__":
    main()
