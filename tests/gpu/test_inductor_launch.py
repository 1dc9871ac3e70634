"""FusionPass(inductor_launch=True): Inductor launches the fused norm+quant Triton kernel itself,
with the same bytes as the fused op (pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from fusion_passes import FusionPass
from fusion_passes.testing import assert_bitwise_equal, fresh_inductor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(torch.version.hip is not None, reason="NVIDIA only (ROCm keeps the op)"),
]
ops = torch.ops.fusion_ops
FN = torch.float8_e4m3fn
QUANTS = {
    "mxfp4": lambda y: ops.mxfp4_quant(y),
    "mxfp8": lambda y: ops.mxfp8_quant(y),
    "fp8_group": lambda y: ops.fp8_group_quant(y, 128, True, FN),
    "fp8_per_token": lambda y: ops.fp8_per_token_quant(y, False, FN),
}


def model(quant, add: bool, keep_normed: bool):  # type: ignore[no-untyped-def]
    def fn(x, r, w):  # type: ignore[no-untyped-def]
        if add:
            y, res = ops.fused_add_rms_norm(x, r, w, 1e-6)
        else:
            y, res = ops.rms_norm(x, w, 1e-5), r
        q, s = quant(y)
        return (q, s, res, y.sum(-1)) if keep_normed else (q, s, res)

    return fn


@pytest.mark.parametrize("keep_normed", [False, True])
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("scheme", sorted(QUANTS))
@pytest.mark.parametrize("tokens", [1, 33])
def test_inductor_launch_equals_the_fused_op(scheme, add, keep_normed, tokens) -> None:
    g = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, 1024, device="cuda", generator=g).to(torch.bfloat16)
    r = torch.randn_like(x)
    w = (1 + 0.1 * torch.randn(1024, device="cuda", generator=g)).to(torch.bfloat16)
    fn = model(QUANTS[scheme], add, keep_normed)
    outs, codes = {}, {}
    for name, fusion in (("op", FusionPass()), ("inductor", FusionPass(inductor_launch=True))):
        with fresh_inductor():
            compiled = torch.compile(
                fn, fullgraph=True, dynamic=False, options={"post_grad_custom_post_pass": fusion}
            )
            outs[name], code = run_and_get_code(compiled, x, r, w)
            codes[name] = "\n".join(code)
        assert fusion.matched_count == 1, fusion.match_table
        launched = fusion.graphs[0].inductor_launched
        assert launched == (1 if name == "inductor" else 0)
    assert_bitwise_equal(outs["inductor"], outs["op"])
    assert "fusion_ops.rms_norm_" in codes["op"] or "fusion_ops.add_rms_norm_" in codes["op"]
    assert "torch.ops.fusion_ops" not in codes["inductor"]  # no op call: Inductor launches it
    assert "norm_quant_kernel" in codes["inductor"]


@pytest.mark.parametrize("add", [False, True])
def test_a_dynamic_token_count_is_lowered(add: bool) -> None:
    """Token dim dynamic (as vLLM compiles): one graph serves every count >= 2, launched by
    Inductor, bytes equal to the fused op's; one token recompiles (Dynamo's 1-specialization)
    and is lowered with the lone row's warps."""
    fn = model(QUANTS["mxfp4"], add, keep_normed=False)
    w = (1 + 0.1 * torch.randn(1024, device="cuda")).to(torch.bfloat16)
    fusion = FusionPass(inductor_launch=True)
    compiles = 0

    def counting_backend(gm, inputs):  # type: ignore[no-untyped-def]
        nonlocal compiles
        compiles += 1
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, inputs, config_patches={"post_grad_custom_post_pass": fusion})

    with fresh_inductor():
        compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=counting_backend)
        for tokens in (8, 33, 100, 1):
            x = torch.randn(tokens, 1024, device="cuda").to(torch.bfloat16)
            r = torch.randn_like(x)
            if tokens > 1:  # a size-1 dim cannot be marked dynamic: Dynamo specializes it
                torch._dynamo.mark_dynamic(x, 0)
                torch._dynamo.mark_dynamic(r, 0)
            out = compiled(x, r, w)
            if add:
                want = ops.add_rms_norm_mxfp4_quant(x, r, w, 1e-6)
                want = (want[0], want[1], want[2])
            else:
                want = (*ops.rms_norm_mxfp4_quant(x, w, 1e-5)[:2], r)
            assert_bitwise_equal(out, want)
    assert compiles == 2  # counts >= 2, then the lone row
    assert [g.inductor_launched for g in fusion.graphs] == [1, 1]


@pytest.mark.parametrize("scheme", ["mxfp4", "fp8_group"])
def test_many_rows_where_the_warps_follow_the_count(scheme: str) -> None:
    """7168 columns, no residual: a static count of MANY_ROWS rows is lowered with that count's
    warps and pieces, a dynamic count keeps the op; both give the op's bytes."""
    from fusion_ops.launch_policy import MANY_ROWS

    fn = model(QUANTS[scheme], add=False, keep_normed=False)
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(MANY_ROWS, 7168, device="cuda", generator=g).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(7168, device="cuda", generator=g)).to(torch.bfloat16)
    want = fn(x, x, w)
    for dynamic, launched in ((False, 1), (True, 0)):
        fusion = FusionPass(inductor_launch=True)
        with fresh_inductor():
            compiled = torch.compile(
                fn, fullgraph=True, dynamic=dynamic,
                options={"post_grad_custom_post_pass": fusion},
            )  # fmt: skip
            out = compiled(x, x, w)
        assert fusion.matched_count == 1, fusion.match_table
        assert [gr.inductor_launched for gr in fusion.graphs] == [launched]
        assert_bitwise_equal(out, want)
