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


def traced(fn, rows: int = 4, width: int = 256):  # type: ignore[no-untyped-def]
    with FakeTensorMode():
        x = torch.empty(rows, width, dtype=torch.bfloat16, device="cuda")
        r = torch.empty(rows, width, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(width, dtype=torch.bfloat16, device="cuda")
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


def traced_dynamic(fn, specialize_one: bool, width: int = 256):  # type: ignore[no-untyped-def]
    """fn traced on fake CUDA tensors with a symbolic row count s0: with Dynamo's 0/1
    specialization (s0 >= 2, a backed size) or without it (s0 >= 0: may be 1)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    shape_env = ShapeEnv(specialize_zero_one=specialize_one)
    rows = shape_env.create_symintnode(
        shape_env.create_symbol(4, ConstantSource("rows"), dynamic_dim=DimDynamic.DYNAMIC), hint=4
    )
    with FakeTensorMode(shape_env=shape_env):
        x = torch.empty(rows, width, dtype=torch.bfloat16, device="cuda")
        r = torch.empty(rows, width, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(width, dtype=torch.bfloat16, device="cuda")
        return make_fx(fn)(x, r, w), rows


def test_a_dynamic_row_count_known_above_one_is_lowered() -> None:
    def fn(x, r, w):  # type: ignore[no-untyped-def]
        q, s, res, _ = ops.add_rms_norm_mxfp4_quant(x, r, w, 1e-6, return_normed=False)
        return q, s, res

    gm, rows = traced_dynamic(fn, specialize_one=True)
    assert lower_fused_norm_quant(gm.graph) == 1
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    (hop,) = [n for n in gm.graph.nodes if n.target is HOP]
    (grid_rows, one, one_) = hop.kwargs["grid"][0]
    assert (one, one_) == (1, 1)
    assert grid_rows.target is torch.ops.aten.sym_size.int and grid_rows.args[1] == 0
    assert grid_rows.meta["val"] is rows or grid_rows.meta["val"].node.expr == rows.node.expr
    for name in hop.kwargs["tensors_to_clone"]:  # outputs sized by the same symbol
        empty = hop.kwargs["kwargs"][name]
        assert (
            empty.args[0][0] is grid_rows or empty.args[0][0].target is torch.ops.aten.sym_size.int
        )


def test_a_dynamic_row_count_that_may_be_one_keeps_the_op() -> None:
    """A lone row gets other warps from the op: a row count that may be 1 cannot be lowered."""

    def fn(x, r, w):  # type: ignore[no-untyped-def]
        return ops.rms_norm_mxfp4_quant(x, w, 1e-6)[:2]

    gm, _ = traced_dynamic(fn, specialize_one=False)
    assert lower_fused_norm_quant(gm.graph) == 0
    assert [n for n in gm.graph.nodes if op_name(n) == "rms_norm_mxfp4_quant"]


def mxfp4(x, r, w):  # type: ignore[no-untyped-def]
    return ops.rms_norm_mxfp4_quant(x, w, 1e-6)[:2]


def add_mxfp4(x, r, w):  # type: ignore[no-untyped-def]
    return ops.add_rms_norm_mxfp4_quant(x, r, w, 1e-6)[:3]


@pytest.mark.parametrize("width", [4096, 4352, 7168, 8192, 8448])
def test_dynamic_row_count_where_the_warps_follow_it_keeps_the_op(width: int) -> None:
    """Rows of 4097–8192 columns without a residual take other warps from MANY_ROWS rows on
    (another sum order): a dynamic count there keeps the op; with a residual, or at other
    widths, the warps of every count >= 2 agree and it is lowered."""
    for fn, residual in ((mxfp4, False), (add_mxfp4, True)):
        gm, _ = traced_dynamic(fn, specialize_one=True, width=width)
        follows_count = 4096 < width <= 8192 and not residual
        assert lower_fused_norm_quant(gm.graph) == (0 if follows_count else 1), (width, residual)


def _launched(gm):  # type: ignore[no-untyped-def]
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    (hop,) = [n for n in gm.graph.nodes if n.target is HOP]
    kernel = kernel_side_table.get_kernel(hop.kwargs["kernel_idx"])
    constants = kernel_side_table.get_constant_args(hop.kwargs["constant_args_idx"])
    return kernel.configs[0].num_warps, tuple(constants[f"PIECE{i}"] for i in range(3))


def test_static_row_count_gets_that_counts_warps_and_pieces() -> None:
    """Many rows of 7168 columns: the op's 4 warps and the row as 4096 + 2048 + 1024 columns;
    a few rows: 8 warps, one padded block; with a residual: 8 warps, one block."""
    from fusion_ops.launch_policy import MANY_ROWS

    for rows, fn, want in (
        (MANY_ROWS, mxfp4, (4, (4096, 2048, 1024))),
        (MANY_ROWS - 1, mxfp4, (8, (0, 0, 0))),
        (MANY_ROWS, add_mxfp4, (8, (0, 0, 0))),
    ):
        gm = traced(fn, rows=rows, width=7168)
        assert lower_fused_norm_quant(gm.graph) == 1
        assert _launched(gm) == want, (rows, fn.__name__)
