"""The pass fires on code as people write it: views between the ops of a fusion, independent ops
in any program order. Every case: exact match table, bit-equal to the same code compiled without
the pass (and to eager where no FP8 cast is involved); must-not-fire twins say why."""

from __future__ import annotations

import pytest
import torch

import fusion_ops
from fusion_passes import FusionPass
from fusion_passes.testing import assert_bitwise_equal, assert_fully_replaced, run_compiled
from tests.cache_inputs import rope_case

ops = torch.ops.fusion_ops
FN = torch.float8_e4m3fn
K = 256


def x_w(shape=(2, 3, K), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(torch.bfloat16)
    return x, torch.randn(shape[-1], generator=g).to(torch.bfloat16)


def check(fn, args, p: FusionPass, table: dict[str, int], dynamic=None, eager=True):
    out = run_compiled(fn, *args, fusion_pass=p, dynamic=dynamic)
    assert p.match_table == table
    assert_bitwise_equal(out, run_compiled(fn, *args, fusion_pass=None, dynamic=dynamic))
    if eager:
        assert_bitwise_equal(out, fn(*args))
    return out


# --- views between norm and quant ----------------------------------------------------------------
def rms_reshape(x, w):  # norm on [B, T, K], quant on the token-flattened rows
    return ops.mxfp4_quant(ops.rms_norm(x, w, 1e-6).reshape(-1, K))


def rms_flatten_unsqueeze(x, w):
    y = ops.rms_norm(x, w, 1e-5)
    return ops.fp8_group_quant(y.flatten(0, 1).unsqueeze(0), 128, True, FN)


def rms_view_squeeze(x, w):
    y = ops.rms_norm(x, w, 1e-6).view(2, 1, 3, K)
    return ops.fp8_per_token_quant(y.squeeze(1), False, FN)


def add_rms_view(x, w):
    y, residual = ops.fused_add_rms_norm(x, x * 2, w, 1e-6)
    q, s = ops.mxfp8_quant(y.view(6, K))
    return q, s, residual  # the residual stream keeps its [B, T, K] shape


def rms_view_fan_out(x, w):  # the viewed normed value has another user: fused op returns it
    v = ops.rms_norm(x, w, 1e-6).reshape(-1, K)
    return ops.mxfp4_quant(v), v * 2


VIEW_CASES = {
    rms_reshape: {"rms_quant/mxfp4/bf16": 1},
    rms_flatten_unsqueeze: {"rms_quant/fp8_group128_ue8m0_e4m3fn/bf16": 1},
    rms_view_squeeze: {"rms_quant/fp8_per_token_e4m3fn/bf16": 1},
    add_rms_view: {"add_rms_quant/mxfp8/bf16": 1},
    rms_view_fan_out: {"rms_quant/mxfp4+normed/bf16": 1},
}


@pytest.mark.parametrize("dynamic", [None, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("fn", VIEW_CASES, ids=lambda f: f.__name__)
def test_views_between_norm_and_quant_fire(full_pass, fn, dynamic) -> None:
    table = VIEW_CASES[fn]
    check(fn, x_w(), full_pass, table, dynamic=dynamic)
    norm = "fused_add_rms_norm" if next(iter(table)).startswith("add_") else "rms_norm"
    assert_fully_replaced(full_pass, [norm])
    assert not [m for g in full_pass.graphs for m in g.near_misses]


def test_view_that_changes_rows_does_not_fire(full_pass) -> None:
    """[.., 256] seen as [.., 2, 128]: blocks of the quant would span other elements' rows."""

    def fn(x, w):
        return ops.fp8_per_token_quant(ops.rms_norm(x, w, 1e-6).reshape(2, 3, 2, 128), False, FN)

    check(fn, x_w(), full_pass, {})
    (miss,) = [m for g in full_pass.graphs for m in g.near_misses]
    assert "changes the rows" in miss.reason and "(2, 3, 2, 128)" in miss.reason


def test_views_seen_through_only_for_enabled_schemes() -> None:
    p = FusionPass(schemes=["mxfp8"], keep_graphs=True)
    check(rms_reshape, x_w(), p, {})
    (miss,) = [m for g in p.graphs for m in g.near_misses]
    assert "'mxfp4' is not enabled" in miss.reason


# --- views in the other families --------------------------------------------------------------
def test_dequant_view_then_cast_fires(full_pass) -> None:
    cache = fusion_ops.alloc_mla_cache(4, 8)
    cache.random_(0, 256, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([3, 1])

    def fn(cache, ids):  # keys seen per block before the cast
        return ops.dequant_cache(cache, ids, "dsv4_fp8").view(2, 8, 512).to(FN)

    # the compiled FP8 cast saturates where CUDA eager does not: compare with compiled only
    check(fn, (cache, ids), full_pass, {"dequant_fp8/dsv4_fp8_e4m3fn/uint8": 1}, eager=False)
    assert_fully_replaced(full_pass, ["dequant_cache"])


@pytest.mark.parametrize("hop", ["v1", "v2"])
def test_kv_rope_on_head_axis_then_squeeze_fires(full_pass, hop: str) -> None:
    """kv roped as [T, 1, 512] (one kv head), written as [T, 512]."""

    def fn(proj, positions, cos_sin, cache, slots):
        q_rot = ops.rope(positions, proj[:, :1024].view(-1, 2, 512), cos_sin, 64, False)
        kv_rot = ops.rope(positions, proj[:, 1024:].unsqueeze(1), cos_sin, 64, False)
        ops.mla_cache_write(kv_rot.squeeze(1), cache, slots, "dsv4_fp8")
        return q_rot * 1.0

    _rope_case_fires(fn, full_pass, hop)


@pytest.mark.parametrize("hop", ["v1", "v2"])
def test_kv_rope_and_write_before_q_rope_fires(full_pass, hop: str) -> None:
    """Program order of independent ops does not matter (Inductor's matcher alone binds the
    q-rope output to the first rope it meets: the kv rope)."""

    def fn(proj, positions, cos_sin, cache, slots):
        kv_rot = ops.rope(positions, proj[:, 1024:], cos_sin, 64, False)
        ops.mla_cache_write(kv_rot, cache, slots, "dsv4_fp8")
        q_rot = ops.rope(positions, proj[:, :1024].view(-1, 2, 512), cos_sin, 64, False)
        return q_rot * 1.0

    _rope_case_fires(fn, full_pass, hop)


def _rope_case_fires(fn, p: FusionPass, hop: str) -> None:
    proj, positions, cos_sin, cache, slots = rope_case("dsv4_fp8", seed=4)
    eager_cache = cache.clone()
    expected = fn(proj, positions, cos_sin, eager_cache, slots)
    with torch._inductor.config.patch(enable_auto_functionalized_v2=(hop == "v2")):
        out = run_compiled(fn, proj, positions, cos_sin, cache, slots, fusion_pass=p)
    assert p.match_table == {f"rope_cache/gptj_dsv4_fp8_{hop}/bf16": 1}
    assert_fully_replaced(p, ["rope", "mla_cache_write"])
    assert_bitwise_equal(out, expected, "q_rot")
    assert_bitwise_equal(cache, eager_cache, "whole cache")


def test_kv_rope_on_other_head_vectors_does_not_fire(full_pass) -> None:
    """kv roped as two 256-wide halves, then viewed as [T, 512]: the rope rotated other dims
    than a rope of the 512-wide vector would; the view is not moved above it."""

    def fn(proj, positions, cos_sin, cache, slots):
        q_rot = ops.rope(positions, proj[:, :1024].view(-1, 2, 512), cos_sin, 64, False)
        kv_halves = ops.rope(positions, proj[:, 1024:].view(-1, 2, 256), cos_sin, 64, False)
        ops.mla_cache_write(kv_halves.view(-1, 512), cache, slots, "dsv4_fp8")
        return q_rot * 1.0

    proj, positions, cos_sin, cache, slots = rope_case("dsv4_fp8", seed=5)
    eager_cache = cache.clone()
    expected = fn(proj, positions, cos_sin, eager_cache, slots)
    out = run_compiled(fn, proj, positions, cos_sin, cache, slots, fusion_pass=full_pass)
    assert full_pass.match_table == {}
    assert_bitwise_equal(out, expected, "q_rot")
    assert_bitwise_equal(cache, eager_cache, "whole cache")
    (miss,) = [m for g in full_pass.graphs for m in g.near_misses]
    assert "not a rope output" in miss.reason


# --- plain-PyTorch sources ------------------------------------------------------------------------
@pytest.mark.parametrize("dynamic", [None, True], ids=["static", "dynamic"])
def test_plain_add_then_our_norm_fires(full_pass, dynamic) -> None:
    """``h = x + r`` in plain torch, then our rms_norm: the custom op reads h stored and rounded,
    exactly the fused op's residual_out."""

    def fn(x, w):
        h = x + x.flip(0)
        q, s = ops.mxfp8_quant(ops.rms_norm(h, w, 1e-6))
        return q, s, h

    check(fn, x_w(), full_pass, {"add_rms_quant/mxfp8/bf16": 1}, dynamic=dynamic)
    assert_fully_replaced(full_pass, ["rms_norm"])


def hf_rms_norm(x, w):  # transformers' DeepseekV3RMSNorm.forward
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return w * h.to(x.dtype)


def fp32_product_rms_norm(x, w):
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).to(x.dtype)


def weightless_rms_norm(x, w):
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def plain_add_hf_rms_norm(x, w):
    return hf_rms_norm(x + x.flip(0), w)


@pytest.mark.parametrize(
    "norm", [hf_rms_norm, fp32_product_rms_norm, weightless_rms_norm, plain_add_hf_rms_norm]
)
def test_plain_torch_rms_norm_does_not_fire_and_says_why(full_pass, norm) -> None:
    """Inductor's own reduction order and its dropped intermediate roundings cannot be
    reproduced bit for bit by a fused op (README, "Source spellings"): left alone, explained."""

    def fn(x, w):
        return ops.mxfp4_quant(norm(x, w).reshape(-1, K))

    check(fn, x_w(), full_pass, {}, eager=False)
    (miss,) = [m for g in full_pass.graphs for m in g.near_misses]
    assert miss.op == "mxfp4_quant" and "plain PyTorch" in miss.reason
