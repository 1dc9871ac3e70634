"""What the reference model's compiled graphs must contain, derived from its config (shared by
the CPU model proof and the vLLM integration test)."""

from __future__ import annotations

from collections import Counter

import dsv4_model as dm


def scheme_label(scheme: str) -> str:
    return {
        "fp8_group": "fp8_group128_e4m3fn",
        "fp8_per_token": "fp8_per_token_e4m3fn",
        "mxfp8": "mxfp8",
        "mxfp4": "mxfp4",
    }[scheme]


def expected_matches(
    cfg: dm.DSV4Config, decode: bool, functionalization: str = "v2"
) -> Counter[str]:
    """Matches per label in one forward graph, from the layer kinds, residual mode and schemes.

    ``functionalization`` is the auto-functionalization form of the compile: ``v2`` is torch's
    default, vLLM compiles with ``v1`` (``enable_auto_functionalized_v2=False``)."""
    lin, act = scheme_label(cfg.linear_quant), scheme_label(cfg.act_quant)
    out: Counter[str] = Counter()
    for i, ratio in enumerate(cfg.compress_ratios):
        # attn_norm → linear quant of the fused wq_a/wkv projection; in CSA/HCA layers the
        # compressor also reads the normed x, so the fused op returns it (+normed)
        normed = "+normed" if ratio > 1 else ""
        family = "add_rms_quant" if cfg.residual == "add" and i > 0 else "rms_quant"
        out[f"{family}/{lin}{normed}/bf16"] += 1
        # q_norm → wq_b quant, fused with the kv norm (the other part of wq_a|wkv): one op
        out[f"q_kv_norm/{lin}/bf16"] += 1
        if ratio > 1:  # compressor: norm (fp32 pooled groups) → bf16 → rope → compressed cache
            out[f"norm_rope_cache/gptj_dsv4_fp8_to_bf16_{functionalization}/fp32"] += 1
        # ffn_norm → expert activation quant; the router gate reads the normed x (+normed)
        family = "add_rms_quant" if cfg.residual == "add" else "rms_quant"
        out[f"{family}/{act}+normed/bf16"] += 1
        # per-head q norm → q rope, kv rope → SWA cache write: one op
        out[f"qnorm_rope_cache/gptj_dsv4_fp8_{functionalization}/bf16"] += 1
        if decode:  # keys read back: SWA cache, plus the compressed cache in CSA/HCA layers
            out["dequant_fp8/dsv4_fp8_e4m3fn/uint8"] += 1 + (ratio > 1)
    return out


def expected_leftover_ops(cfg: dm.DSV4Config) -> dict[str, int]:
    """Standalone ops that are not part of a fused sequence and so must remain."""
    n = cfg.n_layers
    quants = Counter({f"{s}_quant": 0 for s in ("mxfp4", "mxfp8", "fp8_group", "fp8_per_token")})
    quants[f"{cfg.linear_quant}_quant"] += n  # wo_b input (no norm before it)
    if cfg.gemm == "native":  # the experts' down projections, routed and shared: SwiGLU → quant
        quants[f"{cfg.act_quant}_quant"] += 2 * n
    return {
        "rms_norm": int(cfg.residual == "mhc"),  # final norm (feeds lm_head, no quant)
        "fused_add_rms_norm": int(cfg.residual == "add"),  # final norm (feeds lm_head, no quant)
        "rope": n,  # inverse rope on the attention output
        "weightless_rms_norm": 0,
        "mla_cache_write": 0,
        "dequant_cache": 0,
        **quants,
    }


def expected_tp_matches(cfg: dm.DSV4Config, decode: bool) -> Counter[str]:
    """Tensor parallel (``residual="add"``): an all-reduce sits before every fused_add_rms_norm,
    so each add_rms_quant match becomes an ar_add_rms_quant one, and the final norm (no quant)
    folds its all-reduce in as ``ar_add_rms``."""
    out: Counter[str] = Counter()
    for label, n in expected_matches(cfg, decode).items():
        family, rest = label.split("/", 1)
        out["ar_add_rms_quant/" + rest if family == "add_rms_quant" else label] += n
    out["ar_add_rms_quant/ar_add_rms/bf16"] += 1
    return out
