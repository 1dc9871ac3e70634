"""vLLM IR's norm ops (``torch.ops.vllm_ir.rms_norm`` / ``fused_add_rms_norm``, what vLLM models
put in their graphs) feeding our quant ops fuse into our fused ops with vLLM IR's rounding points
(``weight_after_rounding``, ``norm_unrounded_sum``): bit-equal to the same graph compiled without
the pass, which runs vLLM IR's own implementation (the ``native`` provider on CPU).

Runs where ``vllm.ir`` imports (CI: the vLLM venv, ``pytest -m vllm``); skipped elsewhere.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import pytest
import torch

pytest.importorskip("vllm.ir")

from fusion_passes import FusionPass  # noqa: E402
from fusion_passes.testing import assert_bitwise_equal, run_compiled  # noqa: E402

pytestmark = pytest.mark.vllm
ops = torch.ops.fusion_ops
vir = torch.ops.vllm_ir
FN = torch.float8_e4m3fn


def inputs(dtype=torch.bfloat16, w_dtype=None, shape=(3, 5, 256), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    r = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(w_dtype or dtype)
    return x, r, w


def rms_mxfp4(x, r, w):
    return ops.mxfp4_quant(vir.rms_norm(x, w, 1e-6))


def add_rms_fp8_group(x, r, w):
    y, residual = vir.fused_add_rms_norm(x, r, w, 1e-5)
    q, s = ops.fp8_group_quant(y, 128, True, FN)
    return q, s, residual


def add_rms_mxfp8_view_fan_out(x, r, w):
    y, residual = vir.fused_add_rms_norm(x, r, w, 1e-6)
    q, s = ops.mxfp8_quant(y.reshape(-1, y.shape[-1]))
    return q, s, residual, y.sum(-1)  # the normed value has another user


CASES = {
    rms_mxfp4: {"rms_quant/mxfp4+vllm_ir/{dtype}": 1},
    add_rms_fp8_group: {"add_rms_quant/fp8_group128_ue8m0_e4m3fn+vllm_ir/{dtype}": 1},
    add_rms_mxfp8_view_fan_out: {"add_rms_quant/mxfp8+normed+vllm_ir/{dtype}": 1},
}


@pytest.fixture(scope="module")
def vllm_pass():
    return FusionPass(keep_graphs=True)


@pytest.mark.parametrize(
    "dtype,w_dtype",
    [(torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32)],
    ids=["bf16", "fp16", "bf16-fp32weight"],
)
@pytest.mark.parametrize("dynamic", [None, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("fn", CASES, ids=lambda f: f.__name__)
def test_vllm_ir_norm_then_our_quant_fuses_bit_exactly(vllm_pass, fn, dtype, w_dtype, dynamic):
    vllm_pass.reset()
    args = inputs(dtype, w_dtype)
    out = run_compiled(fn, *args, fusion_pass=vllm_pass, dynamic=dynamic)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    assert vllm_pass.match_table == {k.format(dtype=name): n for k, n in CASES[fn].items()}
    (record,) = vllm_pass.graphs
    assert not any(k.startswith("vllm_ir") for k in record.ops_after), record.ops_after
    assert_bitwise_equal(out, run_compiled(fn, *args, fusion_pass=None, dynamic=dynamic))
    assert_bitwise_equal(out, fn(*args))  # eager: vLLM IR's native implementation


def test_rounding_points_matter_so_our_own_numerics_would_differ() -> None:
    """The flags are needed: our ops' numerics differ from vLLM IR's on these inputs (so the
    bit-equality above is not a coincidence of equal numerics)."""
    x, r, w = inputs(seed=3)
    theirs = vir.fused_add_rms_norm(x, r, w, 1e-6)[0]
    ours = ops.fused_add_rms_norm(x, r, w, 1e-6)[0]
    assert not torch.equal(theirs, ours)
    _, _, _, flagged = ops.add_rms_norm_mxfp8_quant(x, r, w, 1e-6, True, True, True)
    assert_bitwise_equal(flagged, theirs)


def test_variance_size_does_not_fire(vllm_pass) -> None:
    """vLLM IR's ``variance_size`` (norm over a prefix): no fused op computes it."""
    vllm_pass.reset()

    def fn(x, r, w):
        return ops.mxfp4_quant(vir.rms_norm(x, w, 1e-6, 128))

    args = inputs()
    out = run_compiled(fn, *args, fusion_pass=vllm_pass)
    assert vllm_pass.match_table == {}
    assert_bitwise_equal(out, run_compiled(fn, *args, fusion_pass=None))
    (miss,) = [m for g in vllm_pass.graphs for m in g.near_misses]
    assert miss.op == "vllm_ir.rms_norm" and "re-check failed" in miss.reason
