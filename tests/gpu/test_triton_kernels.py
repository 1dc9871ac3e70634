"""Triton backend vs reference backend on the same CUDA tensors (run on a GPU: pytest -m gpu).

Quant codes, scale bytes and cache bytes must be bit-identical. rms_norm may differ from the
reference by one bf16 ulp (reduction order); the fused and standalone Triton paths must agree
bit for bit with each other.
"""

from __future__ import annotations

import pytest
import torch

import fusion_ops
from fusion_ops.launch_policy import MANY_ROWS
from fusion_ops.reference.cache import rope_mla_cache_write as rope_mla_cache_write_reference
from tests.gpu.kernel_cases import DEV, EPS, FN, SCHEME_PARAMS, activations, assert_same, bits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU"),
]
ops = torch.ops.fusion_ops


def both(fn, *args):
    """(triton result, reference result) of the same call on the same inputs."""
    with fusion_ops.use_backend("triton"):
        t = fn(*args)
    with fusion_ops.use_backend("reference"):
        r = fn(*args)
    return t, r


@pytest.mark.parametrize("scheme,params", SCHEME_PARAMS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens,k", [(1, 256), (7, 7168), (64, 4096), (300, 512)])
def test_quant_bit_exact(scheme, params, dtype, tokens, k) -> None:
    x = activations(tokens, k, dtype, seed=tokens + k)
    quant = getattr(ops, fusion_ops.SCHEMES[scheme].quant_op)
    t, r = both(quant, x, *params)
    assert_same(t, r, f"{scheme}{params}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mxfp4_codes_around_every_rounding_threshold(dtype) -> None:
    """Every E2M1 rounding threshold and exponent step, ±64 ulps (bf16: ±8, staying under 7),
    both signs, and a dense sweep of [0, 7), each block of 32 led by 6.0 (block scale 2^0, so
    the codes are the values' own): the kernel's integer forms of the rounding (fp32 input, and
    the shorter one of 16-bit input) give the reference's bytes."""
    steps = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 6.5]
    int_type = torch.int32 if dtype == torch.float32 else torch.int16
    ulps = 8 if dtype == torch.bfloat16 else 64
    centre = torch.tensor(steps, device=DEV, dtype=dtype).view(int_type).to(torch.int32)
    near = centre[:, None] + torch.arange(-ulps, ulps + 1, device=DEV)
    near = near.to(int_type).view(dtype).flatten()
    sweep = torch.arange(0, 7, 2.0**-12, device=DEV).to(dtype)
    sweep = sweep[sweep < 7]  # amax < 7: scale 2^0 (bf16 and fp16 round the top to 7)
    values = torch.cat([near, -near, sweep, -sweep])
    values = torch.cat([values, values.new_zeros(-values.numel() % (31 * 8))]).view(-1, 31)
    x = torch.cat([values.new_full((values.shape[0], 1), 6.0), values], 1).view(-1, 256)
    t, r = both(ops.mxfp4_quant, x)
    assert (r[1] == 127).all()  # every block's scale is 2^0: the codes are the values' own
    assert_same(t, r, "mxfp4 around thresholds")


# many rows: 4 warps from MANY_ROWS rows at 4097–8192 columns without a residual, and the row in
# unpadded pieces (7168 = 4096 + 2048 + 1024; 4352 = 4096 + 256; FP8 groups from 1024 rows)
MANY = [(MANY_ROWS, 7168), (MANY_ROWS + 1, 4352), (1100, 7168)]


@pytest.mark.parametrize("scheme,params", SCHEME_PARAMS, ids=lambda v: str(v))
@pytest.mark.parametrize("tokens,k", [(1, 7168), (33, 4096), (128, 1536), *MANY])
def test_fused_norm_quant_equals_triton_standalone(scheme, params, tokens, k) -> None:
    s = fusion_ops.SCHEMES[scheme]
    x = activations(tokens, k, torch.bfloat16, seed=k, specials=False)
    r = activations(tokens, k, torch.bfloat16, seed=k + 1, specials=False)
    w = (1 + 0.1 * torch.randn(k, device=DEV)).to(torch.bfloat16)
    quant = getattr(ops, s.quant_op)
    with fusion_ops.use_backend("triton"):
        y = ops.rms_norm(x, w, EPS)
        for normed in (False, True):
            fused = getattr(ops, s.rms_op)(x, w, EPS, *params, normed)
            assert_same(fused[:2], quant(y, *params), f"rms {scheme}")
            if normed:
                assert_same(fused[2], y, "normed output")
        y2, res = ops.fused_add_rms_norm(x, r, w, EPS)
        fused = getattr(ops, s.add_rms_op)(x, r, w, EPS, *params, True)
        assert_same(fused, (*quant(y2, *params), res, y2), f"add_rms {scheme}")
    # and the Triton fused op against the reference fused op: codes may only differ where the
    # normed value differs (rms_norm's 1-ulp reduction-order freedom)
    with fusion_ops.use_backend("reference"):
        y_ref = ops.rms_norm(x, w, EPS)
        q_ref = quant(y_ref, *params)
    same_y = bits(y) == bits(y_ref)
    assert same_y.float().mean() > 0.99
    with fusion_ops.use_backend("triton"):
        assert_same(quant(y_ref, *params), q_ref, "quant of the reference normed value")


@pytest.mark.parametrize("scheme,params", SCHEME_PARAMS, ids=lambda v: str(v))
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
def test_fused_norm_quant_vllm_ir_rounding_points(scheme, params, w_dtype) -> None:
    """weight_after_rounding / norm_unrounded_sum on Triton: its codes are the quant of its own
    normed value (bit for bit), residual_out equals the reference, the normed value equals the
    reference on >= 99 % of elements (rms_norm's reduction-order freedom, then two roundings)
    within 2 ulp."""
    s = fusion_ops.SCHEMES[scheme]
    x = activations(64, 4096, torch.bfloat16, seed=5, specials=False)
    r = activations(64, 4096, torch.bfloat16, seed=6, specials=False)
    w = (1 + 0.1 * torch.randn(4096, device=DEV)).to(w_dtype)
    quant = getattr(ops, s.quant_op)
    calls = (
        (getattr(ops, s.rms_op), (x, w, EPS, *params, True, True)),
        (getattr(ops, s.add_rms_op), (x, r, w, EPS, *params, True, True, True)),
    )
    for op, args in calls:
        t, ref = both(op, *args)
        with fusion_ops.use_backend("triton"):
            assert_same(t[:2], quant(t[-1], *params), f"{op} codes vs quant of its normed value")
        if len(t) == 4:
            assert_same(t[2], ref[2], "residual_out")
        assert (bits(t[-1]) == bits(ref[-1])).float().mean() > 0.99
        ulp = torch.finfo(torch.bfloat16).eps * ref[-1].float().abs().clamp_min(1e-30)
        assert ((t[-1].float() - ref[-1].float()).abs() <= 2 * ulp * 1.0001).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_within_one_ulp(dtype) -> None:
    x = activations(257, 7168, dtype, seed=3, specials=False)
    w = torch.randn(7168, device=DEV).to(dtype)
    for fn, args in ((ops.rms_norm, (x, w, EPS)), (ops.fused_add_rms_norm, (x, x.flip(0), w, EPS))):
        t, r = both(fn, *args)
        t, r = (t, r) if isinstance(t, torch.Tensor) else (t[0], r[0])
        # one ulp for bf16/fp16 outputs; fp32 keeps the reduction-order difference (≤ 4 ulp)
        ulps = 1 if dtype != torch.float32 else 4
        ulp = torch.finfo(dtype).eps * r.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((t.float() - r.float()).abs() <= ulps * ulp * 1.0001).all()


@pytest.mark.parametrize("is_neox", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_bit_exact(is_neox, dtype) -> None:
    g = torch.Generator(device=DEV).manual_seed(5)
    proj = torch.randn(37, 4 * 512 + 512, device=DEV, generator=g).to(dtype)
    q = proj[:, :2048].view(37, 4, 512)  # strided view
    pos = torch.randint(0, 4096, (37,), device=DEV, generator=g)
    cs = torch.randn(4096, 64, device=DEV, generator=g)
    t, r = both(ops.rope, pos, q, cs, 64, is_neox)
    assert_same(t, r, "rope")


def dsv4_case(tokens: int, seed: int, padded: bool):
    g = torch.Generator(device=DEV).manual_seed(seed)
    kv = (
        torch.randn(tokens, 512, device=DEV, generator=g) * torch.logspace(-5, 3, 512, device=DEV)
    ).to(torch.bfloat16)
    kv[0, 10] = float("nan")
    kv[min(1, tokens - 1), 200] = float("inf")
    cache = fusion_ops.alloc_mla_cache(40, 64, device=DEV, padded=padded)
    base = cache.as_strided((40, cache.stride(0)), (cache.stride(0), 1))
    base.copy_(torch.randint(0, 256, base.shape, device=DEV, generator=g, dtype=torch.uint8))
    slots = torch.randperm(40 * 64, device=DEV, generator=g)[:tokens]
    slots[::5] = -1
    return kv, cache, slots


def storage(cache: torch.Tensor) -> torch.Tensor:
    return cache.as_strided((cache.shape[0], cache.stride(0)), (cache.stride(0), 1))


@pytest.mark.parametrize("padded", [False, True])
def test_cache_write_and_dequant_bit_exact(padded) -> None:
    kv, cache, slots = dsv4_case(300, seed=7, padded=padded)
    c_t, c_r = (fusion_ops.alloc_mla_cache(40, 64, device=DEV, padded=padded) for _ in range(2))
    storage(c_t).copy_(storage(cache))
    storage(c_r).copy_(storage(cache))
    with fusion_ops.use_backend("triton"):
        ops.mla_cache_write(kv, c_t, slots, "dsv4_fp8")
    with fusion_ops.use_backend("reference"):
        ops.mla_cache_write(kv, c_r, slots, "dsv4_fp8")
    assert_same(storage(c_t), storage(c_r), "whole cache storage (padding included)")
    ids = torch.tensor([5, 0, 39, 5, 17], device=DEV)
    assert_same(*both(ops.dequant_cache, c_t, ids, "dsv4_fp8"), "dequant")
    assert_same(*both(ops.dequant_cache_fp8, c_t, ids, "dsv4_fp8", FN), "dequant fp8")
    with fusion_ops.use_backend("triton"):  # fused dequant+cast == compiled standalone chain
        fused = ops.dequant_cache_fp8(c_t, ids, "dsv4_fp8", FN)
        compiled = torch.compile(lambda c, i: ops.dequant_cache(c, i, "dsv4_fp8").to(FN))(c_t, ids)
    assert_same(fused, compiled, "fused vs compiled dequant→cast (overflow saturates)")
    bf = torch.randn(6, 64, 512, device=DEV).to(torch.bfloat16) * 300
    assert_same(*both(ops.dequant_cache_fp8, bf, ids[:3] % 6, "bf16", FN), "bf16 layout fp8")


@pytest.mark.parametrize("layout", ["dsv4_fp8", "bf16"])
@pytest.mark.parametrize("is_neox", [False, True])
def test_fused_rope_cache_write_bit_exact(layout, is_neox) -> None:
    kv, cache, slots = dsv4_case(65, seed=9, padded=False)
    kv = kv.nan_to_num(0.0, 0.0, 0.0)
    if layout == "bf16":
        cache = torch.randn(40, 64, 512, device=DEV).to(torch.bfloat16)
    q = torch.randn(65, 8, 512, device=DEV).to(torch.bfloat16)
    pos = torch.randint(0, 512, (65,), device=DEV)
    cs = torch.randn(512, 64, device=DEV)
    c_t, c_r = cache.clone(), cache.clone()
    with fusion_ops.use_backend("triton"):
        out_t = ops.rope_mla_cache_write(pos, q, kv, cs, c_t, slots, 64, is_neox, layout)
        q_s = ops.rope(pos, q, cs, 64, is_neox)
        kv_s = ops.rope(pos, kv, cs, 64, is_neox)
        c_s = cache.clone()
        ops.mla_cache_write(kv_s, c_s, slots, layout)
    out_r = rope_mla_cache_write_reference(pos, q, kv, cs, c_r, slots, 64, is_neox, layout)
    assert_same(out_t, out_r, "fused vs reference")
    assert_same(c_t, c_r, "cache vs reference")
    assert_same(out_t, (q_s, kv_s), "fused vs standalone triton")
    assert_same(c_t, c_s, "cache fused vs standalone triton")


def test_dispatch_picks_triton_on_cuda() -> None:
    ops.mxfp4_quant(torch.randn(4, 64, device=DEV))
    assert fusion_ops.last_backend("mxfp4_quant") == "triton"


def test_out_of_range_indices_never_touch_memory_outside_the_cache(monkeypatch) -> None:
    """GPU index checks are opt-in (each is a sync): without them the kernels still skip slots
    outside the cache and read out-of-range blocks as zeros."""
    monkeypatch.delenv("FUSION_OPS_CHECK_INDICES", raising=False)
    kv, cache, _ = dsv4_case(4, seed=11, padded=True)
    before = storage(cache).clone()
    slots = torch.tensor([-1, 40 * 64, 40 * 64 + 7, 10**6], device=DEV)  # none is in the cache
    with fusion_ops.use_backend("triton"):
        ops.mla_cache_write(kv, cache, slots, "dsv4_fp8")
        assert torch.equal(storage(cache), before)
        out = ops.dequant_cache(cache, torch.tensor([0, 40, -3], device=DEV), "dsv4_fp8")
    assert (out[64:].float() == 0).all()
    monkeypatch.setenv("FUSION_OPS_CHECK_INDICES", "1")
    with pytest.raises(ValueError, match="argument 'slot_mapping' holds 1000000"):
        ops.mla_cache_write(kv, cache, slots, "dsv4_fp8")
