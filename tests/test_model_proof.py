"""End-to-end proof on the reference DeepSeek-V4 (tiny preset, CPU): every family fires the number
of times the config implies, the fused sequences' standalone ops are gone, and results are
bit-identical to the model compiled without the pass (logits and every cache byte)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import dsv4_model as dm
from fusion_passes import FusionPass
from fusion_passes.testing import assert_bitwise_equal, fresh_inductor

pytestmark = pytest.mark.slow

PROMPT, DECODE_STEPS, BATCH = 130, 3, 2  # 130 ≥ 128: the HCA layer gets a compressed entry
EAGER_REL_TOL = 0.20  # relative L2 error of logits vs eager (see test_model_close_to_eager)


def scheme_label(scheme: str) -> str:
    return {"fp8_group": "fp8_group128_e4m3fn", "mxfp8": "mxfp8", "mxfp4": "mxfp4"}[scheme]


def expected_matches(cfg: dm.DSV4Config, decode: bool) -> Counter[str]:
    """Matches per label in one forward graph, from the layer kinds, residual mode and schemes."""
    lin, act = scheme_label(cfg.linear_quant), scheme_label(cfg.act_quant)
    out: Counter[str] = Counter()
    for i, ratio in enumerate(cfg.compress_ratios):
        # attn_norm → linear quant of the fused wq_a/wkv projection; in CSA/HCA layers the
        # compressor also reads the normed x, so the fused op returns it (+normed)
        normed = "+normed" if ratio > 1 else ""
        family = "add_rms_quant" if cfg.residual == "add" and i > 0 else "rms_quant"
        out[f"{family}/{lin}{normed}/bf16"] += 1
        out[f"rms_quant/{lin}/bf16"] += 1  # q_norm → wq_b
        # ffn_norm → expert activation quant; the router gate reads the normed x (+normed)
        family = "add_rms_quant" if cfg.residual == "add" else "rms_quant"
        out[f"{family}/{act}+normed/bf16"] += 1
        out["rope_cache/gptj_dsv4_fp8_v2/bf16"] += 1  # q and kv rope → SWA cache write
        if decode:  # keys read back: SWA cache, plus the compressed cache in CSA/HCA layers
            out["dequant_fp8/dsv4_fp8_e4m3fn/uint8"] += 1 + (ratio > 1)
    return out


def expected_leftover_ops(cfg: dm.DSV4Config) -> dict[str, int]:
    """Standalone ops that are not part of a fused sequence and so must remain."""
    compressed = sum(r > 1 for r in cfg.compress_ratios)
    n = cfg.n_layers
    return {
        "rms_norm": n + compressed + (cfg.residual == "mhc"),  # kv_norm, compressor, final norm
        "fused_add_rms_norm": int(cfg.residual == "add"),  # final norm (feeds lm_head, no quant)
        "rope": n + compressed,  # inverse rope on the output, compressed-key rope
        "mla_cache_write": compressed,  # kv-only writes of compressed entries
        "fp8_group_quant": n,  # wo_b input (no norm before it)
        "mxfp8_quant": 0,
        "dequant_cache": 0,
    }


def run_model(cfg: dm.DSV4Config, fusion_pass: FusionPass | None, compiled: bool = True):
    model, caches = dm.build(cfg, batch=BATCH, max_len=PROMPT + DECODE_STEPS + 8)
    prompts, decode_ids = dm.token_ids(cfg, BATCH, PROMPT, DECODE_STEPS)
    if not compiled:
        return dm.run(caches, model, model, prompts, decode_ids)
    options = {"post_grad_custom_post_pass": fusion_pass} if fusion_pass is not None else {}
    with fresh_inductor():
        fn = torch.compile(model, options=options, fullgraph=True)  # fullgraph: no graph break
        return dm.run(caches, fn, fn, prompts, decode_ids)


@pytest.fixture(scope="module", params=["add", "mhc"])
def runs(request):
    cfg = dm.tiny(residual=request.param)
    p = FusionPass(keep_graphs=True)
    return cfg, p, run_model(cfg, p), run_model(cfg, None), run_model(cfg, None, compiled=False)


def test_match_counts_follow_from_the_config(runs) -> None:
    cfg, p, *_ = runs
    assert len(p.graphs) == 2  # one prefill graph, one decode graph: no recompiles, no breaks
    prefill, decode = p.graphs
    assert prefill.matches == dict(expected_matches(cfg, decode=False))
    assert decode.matches == dict(expected_matches(cfg, decode=True))
    families = {label.split("/")[0] for label in p.match_table}
    if cfg.residual == "add":
        assert families == {"rms_quant", "add_rms_quant", "rope_cache", "dequant_fp8"}


def test_standalone_ops_of_fused_sequences_are_gone(runs) -> None:
    cfg, p, *_ = runs
    leftover = expected_leftover_ops(cfg)
    for record in p.graphs:
        after = record.ops_after
        for op, n in leftover.items():
            assert after.get(op, 0) == n, (record.index, op, after)
        # every leftover anchor is explained: norms feed no quant op, the writes are kv-only
        reasons = Counter(m.reason.split(":")[0].split(" (")[0] for m in record.near_misses)
        assert reasons == {
            "no quant op consumes it": leftover["rms_norm"] + leftover["fused_add_rms_norm"],
            "kv-only cache write": leftover["mla_cache_write"],
        }


def test_pass_changes_no_bit_of_logits_or_caches(runs) -> None:
    _, _, fused, unfused, _ = runs
    assert_bitwise_equal(fused.prefill_logits, unfused.prefill_logits, "prefill logits")
    assert_bitwise_equal(fused.decode_logits, unfused.decode_logits, "decode logits")
    assert_bitwise_equal(fused.caches, unfused.caches, "caches (SWA, compressed, state)")


def test_model_close_to_eager(runs) -> None:
    """Compiled vs eager differ by fp32 reduction order and by Inductor keeping bf16
    intermediates in fp32, amplified through three layers of FP8/MX quantizers (a 1-ulp change
    flips a code). This exists with or without the pass (the pass changes no bit, see above).
    Measured on this preset (torch 2.13 CPU), relative L2 of logits per prefill/decode tensor:
    add 4.9-9.2 %, mhc 4.5-14.0 %; top-1 agreement 82-100 % on prefill, 50-100 % on decode
    steps (two sequences each). Re-measured after the bf16 lm_head change. One layer alone is
    bit-exact with emulate_precision_casts=True. Bound: 20 %."""
    _, _, fused, _, eager = runs
    for got, want in zip(
        fused.prefill_logits + fused.decode_logits,
        eager.prefill_logits + eager.decode_logits,
        strict=True,
    ):
        rel = (got - want).norm() / want.norm()
        assert rel < EAGER_REL_TOL, rel.item()
        assert torch.isfinite(got).all()
