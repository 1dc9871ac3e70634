"""The reference model with ``gemm="native"`` on an NVIDIA GPU: FP8 weights into
``torch._scaled_mm`` / ``torch._scaled_grouped_mm``, routed experts; the pass fires as the config
implies and changes no bit of the logits (launched and replayed as a CUDA graph)."""

from __future__ import annotations

import pytest
import torch

import dsv4_model as dm
from fusion_ops import linear
from fusion_passes import FusionPass
from fusion_passes.testing import assert_bitwise_equal
from tests.model_expectations import expected_matches

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
        reason="needs an NVIDIA GPU with grouped FP8 GEMMs (compute capability 9.0+)",
    ),
]
CFG = dm.tiny(residual="add", gemm="native", act_quant="fp8_per_token", n_routed_experts=16)


def test_native_gemms_are_chosen_per_scheme() -> None:
    model = dm.DSV4Model(CFG, device="cuda")
    attn, moe = model.layers[0].attn, model.layers[0].moe
    assert [attn.wqkv_a.kind, attn.wq_b.kind, attn.wo_b.kind] == ["blockwise"] * 3
    assert (moe.kind, moe.shared_kind) == ("rowwise", "rowwise")
    assert moe.w13_fp8.dtype == torch.float8_e4m3fn and not hasattr(moe, "w13")
    mx = dm.DSV4Model(
        CFG.replace(act_quant="mxfp8", n_layers=1, compress_ratios=(1,)), device="cuda"
    )
    assert (mx.layers[0].moe.kind, mx.layers[0].moe.shared_kind) == (None, None)  # no MX GEMM


@pytest.mark.parametrize("rows_per_expert", [(0, 3, 0, 1, 7, 0, 0, 2), (16, 1, 0, 0, 0, 0, 0, 5)])
def test_grouped_gemm_is_each_experts_gemm(rows_per_expert: tuple[int, ...]) -> None:
    """torch._scaled_grouped_mm over uneven groups (empty ones too) == each group's row-wise
    torch._scaled_mm."""
    g = torch.Generator(device="cuda").manual_seed(0)
    e, n, k = len(rows_per_expert), 256, 512
    w = torch.randn(e, n, k, device="cuda", generator=g).bfloat16()
    w_fp8, w_scale = linear.quantize_weight(w, "rowwise")
    x = torch.randn(sum(rows_per_expert), k, device="cuda", generator=g).bfloat16()
    q, s = linear.ActQuantConfig("fp8_per_token").quantize(x)
    offs = torch.tensor(rows_per_expert, device="cuda").cumsum(0).to(torch.int32)
    got = linear.scaled_grouped_mm(q, s, w_fp8, w_scale, offs, torch.bfloat16)
    start = 0
    for i, rows in enumerate(rows_per_expert):
        if rows:
            sl = slice(start, start + rows)  # (copies: cuBLAS wants 16-byte aligned scales)
            qe, se = q[sl].clone(), s[sl].clone()
            want = linear.scaled_mm(qe, se, w_fp8[i], w_scale[i], "rowwise", torch.bfloat16)
            torch.testing.assert_close(got[sl], want, rtol=1.6e-2, atol=1e-2)
        start += rows


def test_pass_on_the_native_model_changes_no_bit() -> None:
    torch._dynamo.reset()
    model, caches = dm.build(CFG, batch=4, max_len=160, device="cuda")
    prompts, _ = dm.token_ids(CFG, 4, 130, 1)
    with torch.no_grad():
        for seq in range(4):
            model(caches.prefill_step(seq, prompts[seq]), False)
        step = caches.decode_step(torch.tensor([5, 7, 11, 13]), torch.full((4,), 130))
        fusion_pass = FusionPass(keep_graphs=True)
        outs = {}
        for name, options in (("plain", {}), ("pass", {"post_grad_custom_post_pass": fusion_pass})):
            fn = torch.compile(model, fullgraph=True, dynamic=False, options=options)
            outs[name] = fn(step, True).clone()
            graph = torch.cuda.CUDAGraph()
            fn(step, True)
            with torch.cuda.graph(graph):
                replayed = fn(step, True)
            graph.replay()
            assert_bitwise_equal(replayed, outs[name], f"{name}: graph replay vs launch")
    assert_bitwise_equal(outs["pass"], outs["plain"], "decode logits with vs without the pass")
    assert fusion_pass.graphs[0].matches == dict(expected_matches(CFG, decode=True))
