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


def test_dynamic_shapes_keep_the_op() -> None:
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(256, device="cuda", dtype=torch.bfloat16)
    fusion = FusionPass(inductor_launch=True)
    with fresh_inductor():
        compiled = torch.compile(
            lambda x, w: ops.mxfp4_quant(ops.rms_norm(x, w, 1e-6)),
            dynamic=True,
            options={"post_grad_custom_post_pass": fusion},
        )
        out = compiled(x, w)
    assert fusion.matched_count == 1 and fusion.graphs[0].inductor_launched == 0
    assert_bitwise_equal(out, ops.rms_norm_mxfp4_quant(x, w, 1e-6)[:2])
