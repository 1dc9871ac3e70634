"""qnorm_rope_cache: the per-head q norm, both ropes and the kv cache write in one op, and the
plain-torch q norm (tolerant only). Fires exactly where expected, never where it must not,
keeps every byte."""

from __future__ import annotations

import pytest
import torch

import fusion_ops
from fusion_passes import FusionPass
from fusion_passes.testing import (
    assert_bitwise_equal,
    assert_fully_replaced,
    assert_ops_present,
    near_miss_reasons,
    run_compiled,
)

ops = torch.ops.fusion_ops
FN = torch.float8_e4m3fn


def attention_case(layout: str, q_dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """q and kv as views of one projection ([T, 2·512 | 512], kv at a storage offset)."""
    g = torch.Generator().manual_seed(seed)
    proj = (torch.randn(5, 3 * 512, generator=g) * 3).to(q_dtype)
    cos_sin = torch.randn(32, 64, generator=g)
    if layout == "dsv4_fp8":
        cache = fusion_ops.alloc_mla_cache(3, 4)
        cache.random_(0, 256, generator=g)  # bytes the write must leave alone
    else:
        cache = torch.randn(3, 4, 512, generator=g).to(q_dtype)
    positions = torch.tensor([3, 4, 5, 6, 31])
    slots = torch.tensor([7, -1, 0, 11, 3])
    return proj, cos_sin, cache, positions, slots


def qnorm_fn(layout: str, is_neox: bool, q_norm=None):
    """DSV4's attention: per-head weightless q norm, q rope, kv rope, kv cache write.
    ``q_norm``: the norm's spelling (default: the ``weightless_rms_norm`` op)."""

    def fn(proj, cos_sin, cache, positions, slots):
        q = proj[:, :1024].view(-1, 2, 512)
        kv = proj[:, 1024:]
        q = ops.weightless_rms_norm(q, 1e-6) if q_norm is None else q_norm(q, 1e-6)
        q_rot = ops.rope(positions, q, cos_sin, 64, is_neox)
        kv_rot = ops.rope(positions, kv, cos_sin, 64, is_neox)
        ops.mla_cache_write(kv_rot, cache, slots, layout)
        return q_rot * 1.0, kv_rot

    return fn


@pytest.mark.parametrize("hop", ["v1", "v2"])
@pytest.mark.parametrize("layout", ["dsv4_fp8", "bf16"])
@pytest.mark.parametrize("is_neox", [False, True])
@pytest.mark.parametrize("only_this_family", [False, True])
def test_qnorm_rope_cache(
    full_pass, hop: str, layout: str, is_neox: bool, only_this_family: bool
) -> None:
    """Norm, both ropes and the write in one op, whether rope_cache fused the ropes first (the
    full pass) or is not enabled; q, kv and every cache byte equal eager's."""
    p = FusionPass(fusions=["qnorm_rope_cache"]) if only_this_family else full_pass
    fn = qnorm_fn(layout, is_neox)
    case = attention_case(layout)
    eager_cache = case[2].clone()
    expected = fn(case[0], case[1], eager_cache, *case[3:])
    with torch._inductor.config.patch(enable_auto_functionalized_v2=(hop == "v2")):
        out = run_compiled(fn, *case, fusion_pass=p)
    style = "neox" if is_neox else "gptj"
    assert p.match_table == {f"qnorm_rope_cache/{style}_{layout}_{hop}/bf16": 1}
    assert_fully_replaced(p, ["weightless_rms_norm", "rope", "mla_cache_write"])
    assert_ops_present(p, ["qnorm_rope_mla_cache_write"])
    assert_bitwise_equal(out, expected, "q_rot, kv_rot")
    assert_bitwise_equal(case[2], eager_cache, "whole cache")


def test_qnorm_rope_cache_must_not_fire(full_pass) -> None:
    """The normed q read elsewhere, a q rope at other positions than the kv rope's: the norm
    stays standalone (rope_cache takes what it can); each near miss says why."""

    def fn(proj, cos_sin, cache, positions, slots):
        q = proj[:, :1024].view(-1, 2, 512)
        kv = proj[:, 1024:]
        qn = ops.weightless_rms_norm(q, 1e-6)
        q_rot = ops.rope(positions, qn, cos_sin, 64, False)
        kv_rot = ops.rope(positions, kv, cos_sin, 64, False)
        ops.mla_cache_write(kv_rot, cache, slots, "dsv4_fp8")
        q2 = ops.weightless_rms_norm(q * 2, 1e-6)
        q2_rot = ops.rope(positions.flip(0), q2, cos_sin, 64, False)
        return q_rot, qn + 1, q2_rot

    case = attention_case("dsv4_fp8")
    eager_cache = case[2].clone()
    expected = fn(case[0], case[1], eager_cache, *case[3:])
    out = run_compiled(fn, *case, fusion_pass=full_pass)
    assert full_pass.match_table == {"rope_cache/gptj_dsv4_fp8_v2/bf16": 1}
    assert sorted(near_miss_reasons(full_pass, "qnorm_rope_cache")) == [
        "its rope has no kv rope + cache write beside it (same positions, table, style)",
        "the normed q has other users (add.Tensor, rope_mla_cache_write); the fused op returns "
        "only the roped q",
    ]
    assert_bitwise_equal(out, expected)
    assert_bitwise_equal(case[2], eager_cache, "whole cache")


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place between two bf16/fp16 tensors of one sign
    pattern (their bit patterns as integers)."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    assert torch.equal(a.signbit(), b.signbit())
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
def test_plain_torch_q_norm_is_fused_only_when_asked(q_dtype: torch.dtype) -> None:
    """The per-head q norm as the reference model's plain-PyTorch helper writes it
    (``dsv4_model.layers.weightless_rms``): the default pass leaves it (Inductor's summation
    order is not reproducible) and says how to get it fused; ``numerics="tolerant"`` fuses
    it, the kv side and the cache stay bit-equal, q within one unit in the last place of the
    compile without the pass."""
    from dsv4_model.layers import weightless_rms

    fn = qnorm_fn("bf16", False, q_norm=weightless_rms)
    results = {}
    for name, p in (
        ("default", FusionPass(keep_graphs=True)),
        ("plain", FusionPass(numerics="tolerant")),
        ("none", None),
    ):
        case = attention_case("bf16", q_dtype, seed=3)
        results[name] = (run_compiled(fn, *case, fusion_pass=p), case[2], p)
    dtype = "bf16" if q_dtype == torch.bfloat16 else "fp16"
    (q_ref, kv_ref), cache_ref, _ = results["none"]
    (q_def, kv_def), cache_def, default = results["default"]
    assert default.match_table == {f"rope_cache/gptj_bf16_v2/{dtype}": 1}
    assert near_miss_reasons(default, "qnorm_rope_cache") == [
        "its q is an RMS norm written in plain PyTorch (Inductor reduces it in its own order, "
        "which a fused kernel cannot reproduce bit for bit): write it as "
        'fusion_ops.weightless_rms_norm, or build FusionPass(numerics="tolerant") to fuse it '
        "anyway (last-bit differences within a tested bound)"
    ]
    assert_bitwise_equal((q_def, kv_def, cache_def), (q_ref, kv_ref, cache_ref))
    (q_plain, kv_plain), cache_plain, plain = results["plain"]
    assert plain.match_table == {f"qnorm_rope_cache/gptj_bf16_v2+tolerant/{dtype}": 1}
    assert_fully_replaced(plain, ["rope", "mla_cache_write"])
    assert_bitwise_equal((kv_plain, cache_plain), (kv_ref, cache_ref))
    assert bf16_ulps(q_plain, q_ref) <= 1


def test_plain_torch_q_norm_cast_elsewhere_does_not_fire() -> None:
    """A plain norm that casts to another dtype than q's (the matcher ignores dtype literals):
    the fused op would return q's dtype, so the pattern's check refuses it."""

    def fn(proj, cos_sin, cache, positions, slots):
        q = proj[:, :1024].view(-1, 2, 512)
        qf = q.float()
        qn = (qf * torch.rsqrt(qf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
        q_rot = ops.rope(positions, qn, cos_sin, 64, False)
        kv_rot = ops.rope(positions, proj[:, 1024:].to(torch.bfloat16), cos_sin, 64, False)
        ops.mla_cache_write(kv_rot, cache, slots, "dsv4_fp8")
        return q_rot

    p = FusionPass(numerics="tolerant")
    case = attention_case("dsv4_fp8", torch.float16)
    expected = run_compiled(fn, *case[:2], case[2].clone(), *case[3:], fusion_pass=None)
    out = run_compiled(fn, *case, fusion_pass=p)
    assert p.match_table == {"rope_cache/gptj_dsv4_fp8_v2/bf16": 1}
    assert_bitwise_equal(out, expected)
