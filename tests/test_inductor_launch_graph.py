"""FusionPass(inductor_launch=True)'s graph rewrite, checked on fake CUDA tensors (no GPU needed;
numerics and launches: tests/gpu/test_inductor_launch.py)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

pytest.importorskip("triton", reason="the lowering names the Triton kernel")
from fusion_passes.inductor_launch import lower_fused_norm_quant  # noqa: E402
from patterns.base import op_name  # noqa: E402

ops = torch.ops.fusion_ops
HOP = torch.ops.higher_order.triton_kernel_wrapper_functional


def traced(fn):  # type: ignore[no-untyped-def]
    with FakeTensorMode():
        x = torch.empty(4, 256, dtype=torch.bfloat16, device="cuda")
        r = torch.empty(4, 256, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(256, dtype=torch.bfloat16, device="cuda")
        return make_fx(fn)(x, r, w)


def test_fused_ops_become_the_kernel_with_their_outputs() -> None:
    def fn(x, r, w):  # type: ignore[no-untyped-def]
        q, s, res, _ = ops.add_rms_norm_fp8_group_quant(
            x, r, w, 1e-6, 128, True, torch.float8_e4m3fn
        )
        q2, s2, y = ops.rms_norm_mxfp4_quant(x, w, 1e-5, return_normed=True)
        return q, s, res, q2, s2, y

    gm = traced(fn)
    assert lower_fused_norm_quant(gm.graph) == 2
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    assert not [n for n in gm.graph.nodes if op_name(n)]  # no fusion_ops call left
    hops = [n for n in gm.graph.nodes if n.target is HOP]
    assert [sorted(h.kwargs["tensors_to_clone"]) for h in hops] == [
        ["q_ptr", "res_ptr", "s_ptr"],  # add+rms: codes, scales, residual_out
        ["q_ptr", "s_ptr", "y_ptr"],  # rms with the normed value kept
    ]
    assert all(h.kwargs["grid"] == [(4, 1, 1)] for h in hops)
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert all(o.args[0].target is HOP for o in outputs)  # every output comes from the kernels


def test_fnuz_keeps_the_op() -> None:
    """NVIDIA runs FNUZ on the reference backend (dynamic shapes: tests/gpu)."""

    def fnuz(x, r, w):  # type: ignore[no-untyped-def]
        return ops.rms_norm_fp8_group_quant(
            x, w, 1e-6, 128, False, fp8_dtype=torch.float8_e4m3fnuz
        )[:2]

    gm = traced(fnuz)
    assert lower_fused_norm_quant(gm.graph) == 0  # the FNUZ dtype came as a keyword
