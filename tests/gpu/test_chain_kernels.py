"""Triton kernels of the DSV4 chain fusions (run on a GPU: pytest -m gpu).

q_kv_norm_quant_kernel, norm_rope_cache_kernel and qnorm_rope_cache_kernel must equal, bit for
bit, the standalone Triton ops they replace (what the compile without the pass runs); the cache
bytes too.
"""

from __future__ import annotations

import pytest
import torch

import fusion_ops
from fusion_ops.launch_policy import MANY_ROWS
from fusion_passes import FusionPass
from fusion_passes.testing import assert_bitwise_equal, run_compiled
from tests.gpu.kernel_cases import DEV, FN, SCHEME_PARAMS, activations, assert_same

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU"),
]
ops = torch.ops.fusion_ops


def split_projection(tokens: int, kq: int, kkv: int, seed: int):
    proj = activations(tokens, kq + kkv, torch.bfloat16, seed=seed, specials=False)
    q, kv = proj.split([kq, kkv], dim=-1)
    wq = (1 + 0.1 * torch.randn(kq, device=DEV)).to(torch.bfloat16)
    wkv = (1 + 0.1 * torch.randn(kkv, device=DEV)).to(torch.bfloat16)
    return q, wq, kv, wkv


# (tokens, q width, kv width): DSV4 flash/pro and DSV3 widths; 7168 + 512 has different warp
# counts for the two rows at few rows, so it runs as two launches there, one launch from
# MANY_ROWS rows (same bytes either way); from 1024 rows (1024 wide) / 2048 (1536 wide) a program
# takes two rows, an odd count leaves the last program one; a quantized q of 1536 or 7168 columns
# takes norm_quant_kernel's pieces where the standalone launch does (FP8 groups from 1024 rows,
# MXFP4/MXFP8 from MANY_ROWS); a plain 1024-wide q at 768–1024 rows loads its weight after the
# PDL wait, at 1025–1536 rows takes the division steps (_q_kv_load_choices)
SHAPES = [
    (1, 1024, 512),
    (7, 1536, 512),
    (128, 1024, 512),
    (300, 1536, 512),
    (3, 7168, 512),
    (1024, 1024, 512),
    (1025, 1024, 512),
    (1100, 1536, 512),
    (2049, 1536, 512),
    (MANY_ROWS, 7168, 512),
]


@pytest.mark.parametrize("tokens,kq,kkv", SHAPES)
@pytest.mark.parametrize("scheme,params", [(None, ()), *SCHEME_PARAMS], ids=lambda v: str(v))
def test_q_kv_norm_equals_standalone_triton(tokens, kq, kkv, scheme, params) -> None:
    q, wq, kv, wkv = split_projection(tokens, kq, kkv, seed=tokens + kq)
    with fusion_ops.use_backend("triton"):
        yq, ykv = ops.rms_norm(q, wq, 1e-6), ops.rms_norm(kv, wkv, 1e-5)
        if scheme is None:
            assert_same(ops.q_kv_rms_norm(q, wq, 1e-6, kv, wkv, 1e-5), (yq, ykv), "q_kv norm")
            return
        s = fusion_ops.SCHEMES[scheme]
        quant = getattr(ops, s.quant_op)
        for normed in (False, True):
            fused = getattr(ops, s.q_kv_rms_op)(q, wq, 1e-6, kv, wkv, 1e-5, *params, normed)
            assert_same((*fused[:2], fused[3]), (*quant(yq, *params), ykv), f"q_kv {scheme}")
            if normed:
                assert_same(fused[2], yq, "q normed output")


@pytest.mark.parametrize("layout", ["dsv4_fp8", "bf16"])
@pytest.mark.parametrize("is_neox", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 200])
def test_norm_rope_cache_equals_standalone_triton(layout, is_neox, x_dtype, tokens) -> None:
    """norm → (cast to bf16) → rope → write, against the standalone Triton kernels; the rope's
    products must round like the rope kernel's (compiled without FP fusion)."""
    g = torch.Generator(device=DEV).manual_seed(tokens)
    x = (torch.randn(tokens, 512, device=DEV, generator=g) * 3).to(x_dtype)
    w = (1 + 0.1 * torch.randn(512, device=DEV, generator=g)).to(x_dtype)
    cs = torch.randn(4096, 64, device=DEV, generator=g)
    pos = torch.randint(0, 4096, (tokens,), device=DEV, generator=g)
    if layout == "dsv4_fp8":
        cache = fusion_ops.alloc_mla_cache(64, 8, device=DEV)
        cache.random_(0, 256, generator=g)
    else:
        cache = torch.randn(64, 8, 512, device=DEV, generator=g).to(torch.bfloat16)
    slots = torch.randperm(512, device=DEV, generator=g)[:tokens]
    slots[::3] = -1
    out_dtype = torch.bfloat16 if x_dtype == torch.float32 else None
    expected_cache = cache.clone()
    with fusion_ops.use_backend("triton"):
        y = ops.rms_norm(x, w, 1e-6)
        y = y.to(out_dtype) if out_dtype else y
        kv_rot = ops.rope(pos, y, cs, 64, is_neox)
        ops.mla_cache_write(kv_rot, expected_cache, slots, layout)
        fused = ops.rms_norm_rope_mla_cache_write(
            pos, x, w, 1e-6, cs, cache, slots, 64, is_neox, layout, out_dtype
        )
    assert_same(fused, kv_rot, "rotated rows")
    assert torch.equal(cache.view(torch.uint8), expected_cache.view(torch.uint8)), "cache bytes"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weightless_rms_norm_within_one_ulp_of_reference(dtype) -> None:
    """The standalone Triton weightless norm vs the reference backend on the GPU: one ulp
    (the fp32 summation order is the kernel's); a row whose squares overflow fp32 is NaN in
    both."""
    x = activations(64 * 16, 512, dtype, seed=9, specials=False).view(64, 16, 512)
    with fusion_ops.use_backend("triton"):
        t = ops.weightless_rms_norm(x, 1e-6)
    with fusion_ops.use_backend("reference"):
        r = ops.weightless_rms_norm(x, 1e-6)
    ulp = torch.finfo(dtype).eps * r.float().abs().clamp_min(torch.finfo(dtype).tiny)
    assert torch.equal(t.isnan(), r.isnan())
    ulps = ((t.float() - r.float()).abs() / ulp).nan_to_num(0.0)
    worst = int(ulps.argmax())
    assert (ulps <= 1.0001).all(), (
        f"{int((ulps > 1.0001).sum())} of {r.numel()} beyond one ulp; worst "
        f"{ulps.max().item():.2f} ulp: triton {t.flatten()[worst].item()!r} vs reference "
        f"{r.flatten()[worst].item()!r}"
    )


@pytest.mark.parametrize("layout", ["dsv4_fp8", "bf16"])
@pytest.mark.parametrize("is_neox", [False, True])
@pytest.mark.parametrize("tokens,heads", [(1, 1), (1, 64), (5, 16), (200, 8)])
def test_qnorm_rope_cache_equals_standalone_triton(layout, is_neox, tokens, heads) -> None:
    """Per-head weightless q norm → q rope, kv rope → write, against the standalone Triton
    kernels (q and kv strided views of one projection); a lone head (one row) takes the lone
    row's warps in both."""
    g = torch.Generator(device=DEV).manual_seed(tokens + heads)
    proj = (torch.randn(tokens, (heads + 1) * 512, device=DEV, generator=g) * 3).bfloat16()
    q = proj[:, : heads * 512].view(tokens, heads, 512)
    kv = proj[:, heads * 512 :]
    cs = torch.randn(4096, 64, device=DEV, generator=g)
    pos = torch.randint(0, 4096, (tokens,), device=DEV, generator=g)
    if layout == "dsv4_fp8":
        cache = fusion_ops.alloc_mla_cache(64, 8, device=DEV)
        cache.random_(0, 256, generator=g)
    else:
        cache = torch.randn(64, 8, 512, device=DEV, generator=g).to(torch.bfloat16)
    slots = torch.randperm(512, device=DEV, generator=g)[:tokens]
    slots[1::3] = -1
    expected_cache = cache.clone()
    with fusion_ops.use_backend("triton"):
        q_rot = ops.rope(pos, ops.weightless_rms_norm(q, 1e-6), cs, 64, is_neox)
        kv_rot = ops.rope(pos, kv, cs, 64, is_neox)
        ops.mla_cache_write(kv_rot, expected_cache, slots, layout)
        fused = ops.qnorm_rope_mla_cache_write(
            pos, q, 1e-6, kv, cs, cache, slots, 64, is_neox, layout
        )
    assert_same(fused, (q_rot, kv_rot), "q_rot, kv_rot")
    assert torch.equal(cache.view(torch.uint8), expected_cache.view(torch.uint8)), "cache bytes"


def test_deeper_fusions_on_cuda_model_block() -> None:
    """The attention head's pieces compiled on CUDA with the pass: the q_kv, compressor and
    q-norm chain fusions fire and the outputs and cache equal the compile without the pass."""

    def fn(x, w, wq, wkv, pooled, wc, cs, cache, pos, slots):
        qr, kv = (x @ w).split([1024, 512], dim=-1)
        q, s = ops.fp8_group_quant(ops.rms_norm(qr, wq, 1e-6), 128, False, FN)
        kv = ops.rms_norm(kv, wkv, 1e-6)
        entry = ops.rope(pos, ops.rms_norm(pooled, wc, 1e-6).to(torch.bfloat16), cs, 64, False)
        ops.mla_cache_write(entry, cache, slots, "dsv4_fp8")
        heads = ops.weightless_rms_norm((q.float() * 0.5).bfloat16().view(4, 2, 512), 1e-6)
        q_rot = ops.rope(pos, heads, cs, 64, False)
        kv_rot = ops.rope(pos, kv, cs, 64, False)
        ops.mla_cache_write(kv_rot, cache, slots.flip(0), "dsv4_fp8")
        return q, s, kv, q_rot

    g = torch.Generator(device=DEV).manual_seed(0)
    args = [
        torch.randn(4, 256, device=DEV, generator=g).bfloat16(),
        (torch.randn(256, 1536, device=DEV, generator=g) / 16).bfloat16(),
        torch.randn(1024, device=DEV, generator=g).bfloat16(),
        torch.randn(512, device=DEV, generator=g).bfloat16(),
        torch.randn(4, 512, device=DEV, generator=g),
        torch.randn(512, device=DEV, generator=g),
        torch.randn(64, 64, device=DEV, generator=g),
        fusion_ops.alloc_mla_cache(4, 4, device=DEV),
        torch.tensor([3, 7, 11, 15], device=DEV),
        torch.tensor([0, -1, 9, 2], device=DEV),
    ]
    other = [a.clone() for a in args]
    p = FusionPass()
    out = run_compiled(fn, *args, fusion_pass=p)
    assert p.match_table == {
        "q_kv_norm/fp8_group128_e4m3fn/bf16": 1,
        "norm_rope_cache/gptj_dsv4_fp8_to_bf16_v2/fp32": 1,
        "qnorm_rope_cache/gptj_dsv4_fp8_v2/bf16": 1,
    }
    assert_bitwise_equal(out, run_compiled(fn, *other, fusion_pass=None))
    assert_bitwise_equal(args[7], other[7], "cache")
