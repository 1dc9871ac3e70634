"""Code we did not write: transformers' own DeepSeek-V3 decoder layers (modeling_deepseek_v3, the
package's real classes), their nn.Linears put behind our activation quant with
fusion_ops.linear.quantize_, compiled with FusionPass(numerics="tolerant"). Every RMSNorm that
feeds a quantized linear fuses with its quant (and with the residual add before it), counted
from the config; outputs within the contract of the compile without the pass and of eager."""

from __future__ import annotations

import pytest
import torch

from fusion_ops.linear import ActQuantConfig, ActQuantLinear, quantize_
from fusion_passes import FusionPass
from fusion_passes.testing import assert_bitwise_equal, run_compiled

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf  # noqa: E402

SCHEME = ActQuantConfig("fp8_group")  # DeepSeek-V3's block FP8 activations
SCHEME_LABEL = "fp8_group128_e4m3fn"


def small_config() -> DeepseekV3Config:
    """Two layers (one dense, one MoE), dims that the 1×128 groups divide."""
    cfg = DeepseekV3Config(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=128,
        kv_lora_rank=128,
        qk_rope_head_dim=32,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
    )
    cfg._experts_implementation = "batched_mm"  # the MoE without a data-dependent loop
    cfg._attn_implementation = "sdpa"
    return cfg


def build(cfg: DeepseekV3Config) -> tuple[torch.nn.ModuleList, hf.DeepseekV3RotaryEmbedding]:
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(
        hf.DeepseekV3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)
    )
    layers = layers.to(torch.bfloat16).eval().requires_grad_(False)
    for p in layers.parameters():
        torch.nn.init.normal_(p, std=0.05)
    for module in layers.modules():
        if isinstance(module, hf.DeepseekV3RMSNorm):
            module.weight.data = 1 + 0.1 * torch.randn_like(module.weight)
    quantize_(layers, SCHEME)
    return layers, hf.DeepseekV3RotaryEmbedding(cfg)


def expected_matches(cfg: DeepseekV3Config, layers: torch.nn.ModuleList) -> dict[str, int]:
    """One fused norm+quant per RMSNorm that feeds a quantized linear: ``add_rms_quant`` where
    a residual add precedes it (every layer's post-attention norm, and every input norm but the
    first layer's), ``+normed`` where the normed value also goes elsewhere unquantized (a MoE
    layer's router and routed experts read the post-attention norm)."""
    out: dict[str, int] = {}

    def add(family: str, normed: bool) -> None:
        label = f"{family}/{SCHEME_LABEL}{'+normed' if normed else ''}+tolerant/bf16"
        out[label] = out.get(label, 0) + 1

    for i, layer in enumerate(layers):
        attn = layer.self_attn
        first_reads = attn.q_a_proj if cfg.q_lora_rank else attn.q_proj
        if isinstance(first_reads, ActQuantLinear):
            add("add_rms_quant" if i > 0 else "rms_quant", normed=False)
        if cfg.q_lora_rank and isinstance(attn.q_b_proj, ActQuantLinear):
            add("rms_quant", normed=False)  # q_a_layernorm
        if isinstance(attn.kv_b_proj, ActQuantLinear):
            add("rms_quant", normed=False)  # kv_a_layernorm
        moe = isinstance(layer.mlp, hf.DeepseekV3MoE)
        mlp = layer.mlp.shared_experts if moe else layer.mlp
        if isinstance(mlp.gate_proj, ActQuantLinear):
            add("add_rms_quant", normed=moe)  # post_attention_layernorm
    return out


def test_transformers_deepseek_v3_layers_fuse_within_the_contract() -> None:
    cfg = small_config()
    layers, rope = build(cfg)

    def forward(h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        embeddings = rope(h, positions)
        for layer in layers:
            h = layer(h, position_ids=positions, position_embeddings=embeddings)
        return h

    h = torch.randn(1, 8, cfg.hidden_size, dtype=torch.bfloat16)
    positions = torch.arange(8)[None]
    tolerant = FusionPass(numerics="tolerant", keep_graphs=True)
    exact = FusionPass(keep_graphs=True)
    with torch.no_grad():
        eager = forward(h, positions)
        unfused = run_compiled(forward, h, positions, fusion_pass=None)
        assert_bitwise_equal(run_compiled(forward, h, positions, fusion_pass=exact), unfused)
        fused = run_compiled(forward, h, positions, fusion_pass=tolerant)

    assert exact.match_table == {}
    assert tolerant.match_table == expected_matches(cfg, layers)
    quantized = sum(isinstance(m, ActQuantLinear) for m in layers.modules())
    (graph,) = tolerant.graphs
    assert graph.ops_before == {"fp8_group_quant": quantized}
    # left standalone: the quant of each MLP's down projection (its input is no norm)
    assert graph.ops_after.get("fp8_group_quant", 0) == cfg.num_hidden_layers
    # the model-level contract: the pass moves the output no further from eager than the
    # compile without the pass already is, to within a factor 2 of that distance
    fused_gap = (fused.float() - eager.float()).abs().max().item()
    unfused_gap = (unfused.float() - eager.float()).abs().max().item()
    assert fused_gap <= 2 * unfused_gap, (fused_gap, unfused_gap)
    assert torch.isfinite(fused).all()
