"""The pass on CUDA tensors: Inductor's Triton codegen around our Triton ops (pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

import fusion_ops
from fusion_passes import FusionPass
from fusion_passes.testing import assert_bitwise_equal, assert_fully_replaced, run_compiled

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU"),
]
ops = torch.ops.fusion_ops
FN = torch.float8_e4m3fn


def all_families(x, r, w, pos, proj, cs, cache, slots, ids):
    a = ops.mxfp4_quant(ops.rms_norm(x, w, 1e-5))
    y, res = ops.fused_add_rms_norm(x, r, w, 1e-6)
    b = ops.fp8_group_quant(y, 128, True, FN)
    q = proj[:, :1024].view(-1, 2, 512)
    kv = proj[:, 1024:]
    q_rot = ops.rope(pos, q, cs, 64, False)
    ops.mla_cache_write(ops.rope(pos, kv, cs, 64, False), cache, slots, "dsv4_fp8")
    d = ops.dequant_cache(cache, ids, "dsv4_fp8").to(FN)
    return a, b, res, q_rot, d


@pytest.mark.parametrize("v2", [False, True])
def test_all_families_on_cuda(v2: bool) -> None:
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(33, 4096, device=dev, generator=g).to(torch.bfloat16)
    args = (
        x,
        torch.randn_like(x),
        torch.randn(4096, device=dev).to(torch.bfloat16),
        torch.arange(33, device=dev),
        torch.randn(33, 1536, device=dev).to(torch.bfloat16),
        torch.randn(64, 64, device=dev),
        fusion_ops.alloc_mla_cache(4, 16, device=dev),
        torch.randperm(64, device=dev)[:33],
        torch.tensor([3, 0, 1], device=dev),
    )
    args[6].random_(0, 200)
    unfused_args = [a.clone() for a in args]
    p = FusionPass()
    with torch._inductor.config.patch(enable_auto_functionalized_v2=v2):
        out = run_compiled(all_families, *args, fusion_pass=p)
        ref = run_compiled(all_families, *unfused_args, fusion_pass=None)
    assert p.family_counts() == {
        "add_rms_quant": 1,
        "rms_quant": 1,
        "qnorm_rope_cache": 0,  # no q norm before the ropes here
        "rope_cache": 1,
        "norm_rope_cache": 0,  # no kv-only chain, no pair of norms of one projection here
        "dequant_fp8": 1,
        "add_rms": 0,  # the plain add feeds a norm that feeds a quant: add_rms_quant's
        "q_kv_norm": 0,
        "ar_add_rms_quant": 0,  # no all-reduce in this graph
    }
    assert_fully_replaced(
        p,
        [
            "rms_norm",
            "fused_add_rms_norm",
            "mxfp4_quant",
            "fp8_group_quant",
            "rope",
            "mla_cache_write",
            "dequant_cache",
        ],
    )
    assert_bitwise_equal(out, ref)
    assert_bitwise_equal(args[6], unfused_args[6], "whole cache")
    assert fusion_ops.last_backend("rope_mla_cache_write") == "triton"
