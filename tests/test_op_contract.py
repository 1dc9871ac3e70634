"""Every op: opcheck, validation errors naming op/argument, fused == standalone bit for bit."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.library import opcheck

import fusion_ops
from fusion_ops import OP_SCHEMAS, SCHEMES

ops = torch.ops.fusion_ops
FN, FNUZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz
EPS = 1e-6


def scheme_params(name: str, fp8_dtype: torch.dtype = FN) -> tuple[Any, ...]:
    return {
        "mxfp4": (),
        "mxfp8": (),
        "fp8_per_token": (True, fp8_dtype),
        "fp8_group": (128, False, fp8_dtype),
    }[name]


def rope_inputs(tokens: int = 5, heads: int = 3) -> dict[str, Any]:
    g = torch.Generator().manual_seed(2)
    return dict(
        positions=torch.randint(0, 64, (tokens,), generator=g),
        q=torch.randn(tokens, heads, 512, generator=g).to(torch.bfloat16),
        kv=torch.randn(tokens, 512, generator=g).to(torch.bfloat16),
        cos_sin_cache=torch.randn(64, 64, generator=g),
        kv_cache=fusion_ops.alloc_mla_cache(4, 4),
        slot_mapping=torch.tensor([3, -1, 0, 15, 9]),
    )


def sample_args(name: str) -> tuple[Any, ...]:
    """Representative arguments for op ``name`` (every op in OP_SCHEMAS must have some)."""
    x = torch.randn(4, 256).to(torch.bfloat16)
    r = torch.randn(4, 256).to(torch.bfloat16)
    w = torch.randn(256)
    ri = rope_inputs()
    cache = fusion_ops.alloc_mla_cache(4, 4)
    ops.mla_cache_write(ri["kv"], cache, torch.arange(5), "dsv4_fp8")
    fixed = {
        "rms_norm": (x, w, EPS),
        "fused_add_rms_norm": (x, r, w, EPS),
        "rope": (ri["positions"], ri["q"], ri["cos_sin_cache"], 64, False),
        "mla_cache_write": (ri["kv"], ri["kv_cache"], ri["slot_mapping"], "dsv4_fp8"),
        "dequant_cache": (cache, torch.tensor([2, 0]), "dsv4_fp8"),
        "dequant_cache_fp8": (cache, torch.tensor([2, 0]), "dsv4_fp8", FN),
        "rope_mla_cache_write": (
            ri["positions"],
            ri["q"],
            ri["kv"],
            ri["cos_sin_cache"],
            ri["kv_cache"],
            ri["slot_mapping"],
            64,
            True,
            "dsv4_fp8",
        ),
    }
    fixed["q_kv_rms_norm"] = (x, w, EPS, r[:, :128], w[:128], 1e-5)
    fixed["weightless_rms_norm"] = (ri["q"], EPS)
    fixed["qnorm_rope_mla_cache_write"] = (
        ri["positions"],
        ri["q"],
        1e-5,
        ri["kv"],
        ri["cos_sin_cache"],
        ri["kv_cache"],
        ri["slot_mapping"],
        64,
        False,
        "dsv4_fp8",
    )
    fixed["rms_norm_rope_mla_cache_write"] = (
        ri["positions"],
        ri["kv"].float(),
        torch.randn(512),
        EPS,
        ri["cos_sin_cache"],
        ri["kv_cache"],
        ri["slot_mapping"],
        64,
        False,
        "dsv4_fp8",
        torch.bfloat16,
    )
    if name in fixed:
        return fixed[name]
    for s in SCHEMES.values():
        p = scheme_params(s.name)
        if name == s.quant_op:
            return (x, *p)
        if name == s.rms_op:
            return (x, w, EPS, *p)
        if name == s.add_rms_op:
            return (x, r, w, EPS, *p)
        if name == s.q_kv_rms_op:
            return (x, w, EPS, r[:, :128], w[:128], 1e-5, *p)
    raise AssertionError(f"no sample arguments for op {name}: add them to sample_args")


@pytest.mark.parametrize("name", sorted(n for n in OP_SCHEMAS if not n.startswith("all_reduce_")))
def test_opcheck(name: str) -> None:
    """(The all_reduce_* ops need a process group: opcheck'd in test_tensor_parallel.)"""
    op = getattr(ops, name).default
    opcheck(op, sample_args(name))


def test_namespace_holds_every_documented_op() -> None:
    expected = {
        "rms_norm",
        "fused_add_rms_norm",
        "rope",
        "mla_cache_write",
        "dequant_cache",
        "rope_mla_cache_write",
        "dequant_cache_fp8",
        "q_kv_rms_norm",
        "rms_norm_rope_mla_cache_write",
        "weightless_rms_norm",
        "qnorm_rope_mla_cache_write",
    }
    for s in ("mxfp4", "mxfp8", "fp8_per_token", "fp8_group"):
        expected |= {f"{s}_quant", f"rms_norm_{s}_quant", f"add_rms_norm_{s}_quant"}
        expected.add(f"q_kv_rms_norm_{s}_quant")
        expected.add(f"all_reduce_add_rms_norm_{s}_quant")
    expected.add("all_reduce_fused_add_rms_norm")
    assert set(OP_SCHEMAS) == expected
    for name in expected:
        assert hasattr(torch.ops.fusion_ops, name)


# --- fused == standalone sequence, bit for bit -------------------------------------------------
def bits(t: torch.Tensor) -> torch.Tensor:
    return (
        t.view(torch.uint8)
        if t.element_size() == 1
        else t.view(torch.int32 if t.element_size() == 4 else torch.int16)
    )


def assert_bitwise(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(bits(x.contiguous()), bits(y.contiguous()))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 256), (7, 512), (2, 3, 1024)])
def test_fused_norm_quant_equals_standalone(scheme: str, dtype: torch.dtype, shape: tuple) -> None:
    s = SCHEMES[scheme]
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    for fp8_dtype in (FN, FNUZ) if scheme.startswith("fp8") else (FN,):
        p = scheme_params(scheme, fp8_dtype)
        quant = getattr(ops, s.quant_op)
        normed = ops.rms_norm(x, w, EPS)
        fused = getattr(ops, s.rms_op)(x, w, EPS, *p)
        assert_bitwise(fused[:2], quant(normed, *p))
        assert fused[2].numel() == 0  # return_normed defaults to False
        assert_bitwise(getattr(ops, s.rms_op)(x, w, EPS, *p, True), (*quant(normed, *p), normed))
        y, res = ops.fused_add_rms_norm(x, r, w, EPS)
        fused_add = getattr(ops, s.add_rms_op)(x, r, w, EPS, *p)
        assert_bitwise(fused_add[:3], (*quant(y, *p), res))
        assert fused_add[3].numel() == 0
        assert_bitwise(getattr(ops, s.add_rms_op)(x, r, w, EPS, *p, True), (*quant(y, *p), res, y))


def vllm_ir_style_norm(x, residual, weight, eps):  # noqa: ANN001, ANN201
    """vLLM IR's rms_norm / fused_add_rms_norm rounding points, spelled as vLLM 0.32 does
    (vLLM's vllm/ir/ops/layernorm.py), independently of fusion_ops' reference."""
    orig = x.dtype
    h = x.to(torch.float32)
    if residual is not None:
        h = h + residual.to(torch.float32)
    residual_out = h.to(orig)
    h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (h.to(weight.dtype) * weight).to(orig), residual_out


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize(
    "dtype,w_dtype",
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
    ],
)
def test_fused_norm_quant_other_rounding_points(scheme, dtype, w_dtype) -> None:  # noqa: ANN001
    """weight_after_rounding / norm_unrounded_sum give vLLM IR's numbers (then the quant), and
    differ from the default where the extra rounding matters (16-bit weight)."""
    s = SCHEMES[scheme]
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(4, 512, generator=g) * 3).to(dtype)
    r = (torch.randn(4, 512, generator=g) * 3).to(dtype)
    w = (1 + 0.3 * torch.randn(512, generator=g)).to(w_dtype)
    p = scheme_params(scheme)
    quant = getattr(ops, s.quant_op)
    y, _ = vllm_ir_style_norm(x, None, w, EPS)
    assert_bitwise(getattr(ops, s.rms_op)(x, w, EPS, *p, True, True), (*quant(y, *p), y))
    y, res = vllm_ir_style_norm(x, r, w, EPS)
    fused = getattr(ops, s.add_rms_op)(x, r, w, EPS, *p, True, True, True)
    assert_bitwise(fused, (*quant(y, *p), res, y))
    if dtype != torch.float32 and w_dtype == dtype:
        assert not torch.equal(fused[3], ops.fused_add_rms_norm(x, r, w, EPS)[0])


@pytest.mark.parametrize("is_neox", [False, True])
@pytest.mark.parametrize("layout", ["dsv4_fp8", "bf16"])
def test_fused_rope_cache_write_equals_standalone(is_neox: bool, layout: str) -> None:
    a, b = rope_inputs(), rope_inputs()
    if layout == "bf16":
        a["kv_cache"] = torch.randn(4, 4, 512).to(torch.bfloat16)
        b["kv_cache"] = a["kv_cache"].clone()
    q_rot = ops.rope(a["positions"], a["q"], a["cos_sin_cache"], 64, is_neox)
    kv_rot = ops.rope(a["positions"], a["kv"], a["cos_sin_cache"], 64, is_neox)
    ops.mla_cache_write(kv_rot, a["kv_cache"], a["slot_mapping"], layout)
    fq, fkv = ops.rope_mla_cache_write(
        b["positions"],
        b["q"],
        b["kv"],
        b["cos_sin_cache"],
        b["kv_cache"],
        b["slot_mapping"],
        64,
        is_neox,
        layout,
    )
    assert_bitwise((fq, fkv, b["kv_cache"]), (q_rot, kv_rot, a["kv_cache"]))


@pytest.mark.parametrize("scheme", [None, *sorted(SCHEMES)])
@pytest.mark.parametrize("shape", [(1, 256, 128), (7, 1024, 512), (2, 3, 512, 256)])
def test_q_kv_norm_equals_two_norms(scheme: str | None, shape: tuple) -> None:
    """q_kv_rms_norm[_<scheme>_quant] == rms_norm(q) [→ quant], rms_norm(kv), bit for bit, with
    q and kv parts of one projection (strided views) and their own eps."""
    *lead, kq, kkv = shape
    g = torch.Generator().manual_seed(kq + kkv)
    proj = (torch.randn(*lead, kq + kkv, generator=g) * 3).to(torch.bfloat16)
    q, kv = proj.split([kq, kkv], dim=-1)
    wq, wkv = torch.randn(kq, generator=g).bfloat16(), torch.randn(kkv, generator=g).bfloat16()
    yq, ykv = ops.rms_norm(q, wq, 1e-6), ops.rms_norm(kv, wkv, 1e-5)
    if scheme is None:
        assert_bitwise(ops.q_kv_rms_norm(q, wq, 1e-6, kv, wkv, 1e-5), (yq, ykv))
        return
    s, p = SCHEMES[scheme], scheme_params(scheme)
    fused = getattr(ops, s.q_kv_rms_op)(q, wq, 1e-6, kv, wkv, 1e-5, *p)
    assert_bitwise((*fused[:2], fused[3]), (*getattr(ops, s.quant_op)(yq, *p), ykv))
    assert fused[2].numel() == 0
    kept = getattr(ops, s.q_kv_rms_op)(q, wq, 1e-6, kv, wkv, 1e-5, *p, True)
    assert_bitwise(kept[2], yq)


@pytest.mark.parametrize("layout", ["dsv4_fp8", "bf16"])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
def test_norm_rope_cache_write_equals_standalone(layout: str, out_dtype) -> None:  # noqa: ANN001
    """rms_norm_rope_mla_cache_write == rms_norm → cast → rope → mla_cache_write, cache bytes
    included (slots not given are left alone)."""
    a, b = rope_inputs(), rope_inputs()
    x = (torch.randn(5, 512) * 2).to(torch.float32 if out_dtype else torch.bfloat16)
    w = torch.randn(512).to(x.dtype)
    if layout == "bf16":
        a["kv_cache"] = torch.randn(4, 4, 512).to(torch.bfloat16)
        b["kv_cache"] = a["kv_cache"].clone()
    y = ops.rms_norm(x, w, EPS)
    y = y.to(out_dtype) if out_dtype else y
    kv_rot = ops.rope(a["positions"], y, a["cos_sin_cache"], 64, True)
    ops.mla_cache_write(kv_rot, a["kv_cache"], a["slot_mapping"], layout)
    fused = ops.rms_norm_rope_mla_cache_write(
        b["positions"], x, w, EPS, b["cos_sin_cache"], b["kv_cache"], b["slot_mapping"], 64,
        True, layout, out_dtype,
    )  # fmt: skip
    assert_bitwise((fused, b["kv_cache"]), (kv_rot, a["kv_cache"]))


@pytest.mark.parametrize("layout", ["dsv4_fp8", "bf16"])
@pytest.mark.parametrize("is_neox", [False, True])
def test_qnorm_rope_cache_write_equals_standalone(layout: str, is_neox: bool) -> None:
    """qnorm_rope_mla_cache_write == weightless_rms_norm → rope (q), rope (kv) →
    mla_cache_write, cache bytes included (slots not given are left alone)."""
    a, b = rope_inputs(), rope_inputs()
    if layout == "bf16":
        a["kv_cache"] = torch.randn(4, 4, 512).to(torch.bfloat16)
        b["kv_cache"] = a["kv_cache"].clone()
    q = a["q"] * 3
    q_rot = ops.rope(
        a["positions"], ops.weightless_rms_norm(q, 1e-5), a["cos_sin_cache"], 64, is_neox
    )
    kv_rot = ops.rope(a["positions"], a["kv"], a["cos_sin_cache"], 64, is_neox)
    ops.mla_cache_write(kv_rot, a["kv_cache"], a["slot_mapping"], layout)
    fused = ops.qnorm_rope_mla_cache_write(
        b["positions"], q, 1e-5, b["kv"], b["cos_sin_cache"], b["kv_cache"], b["slot_mapping"],
        64, is_neox, layout,
    )  # fmt: skip
    assert_bitwise((*fused, b["kv_cache"]), (q_rot, kv_rot, a["kv_cache"]))


def test_weightless_rms_norm_is_the_plain_formula() -> None:
    """The op's definition: x·rsqrt(mean(x²) + eps) over the last dim in fp32, one rounding
    (computed here in float64 and rounded once: equal but for fp32 rounding ties)."""
    x = (torch.randn(6, 3, 512) * 4).to(torch.bfloat16)
    xd = x.double()
    expected = (xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    got = ops.weightless_rms_norm(x, 1e-6)
    assert (got != expected).float().mean() < 1e-3


@pytest.mark.parametrize("fp8_dtype", [FN, FNUZ])
def test_fused_dequant_fp8_equals_standalone_in_range(fp8_dtype: torch.dtype) -> None:
    cache = sample_args("dequant_cache")[0]
    ids = torch.tensor([1, 0, 2])
    unfused = ops.dequant_cache(cache, ids, "dsv4_fp8").to(fp8_dtype)  # no overflow here
    assert_bitwise((ops.dequant_cache_fp8(cache, ids, "dsv4_fp8", fp8_dtype),), (unfused,))


# --- RoPE against complex multiplication ------------------------------------------------------
@pytest.mark.parametrize("is_neox", [False, True])
@pytest.mark.parametrize("rope_dim,d", [(64, 512), (64, 64), (8, 24)])
def test_rope_matches_complex_rotation(is_neox: bool, rope_dim: int, d: int) -> None:
    g = torch.Generator().manual_seed(4)
    t, h, half = 6, 2, rope_dim // 2
    x = torch.randn(t, h, d, generator=g, dtype=torch.float64).float()
    pos = torch.randint(0, 32, (t,), generator=g)
    theta = torch.rand(32, half, generator=g, dtype=torch.float64) * 2 * math.pi
    cache = torch.cat((theta.cos(), theta.sin()), dim=1).float()
    out = ops.rope(pos, x, cache, rope_dim, is_neox)
    tail = x[..., d - rope_dim :].double()
    if is_neox:
        z = torch.complex(tail[..., :half], tail[..., half:])
    else:
        z = torch.complex(tail[..., 0::2], tail[..., 1::2])
    rot = z * torch.polar(torch.ones_like(theta), theta)[pos].unsqueeze(1)
    want = (
        torch.cat((rot.real, rot.imag), -1)
        if is_neox
        else torch.stack((rot.real, rot.imag), -1).flatten(-2)
    )
    assert torch.equal(out[..., : d - rope_dim], x[..., : d - rope_dim])
    torch.testing.assert_close(out[..., d - rope_dim :].double(), want, atol=1e-5, rtol=1e-5)


def test_rope_accepts_strided_view_input() -> None:
    """q split from a fused projection (a view at a nonzero offset) gives the same result."""
    ri = rope_inputs()
    fused = torch.randn(5, 3 * 512 + 512).to(torch.bfloat16)
    q_view = fused[:, 512:].view(5, 3, 512)
    assert q_view.storage_offset() == 512
    a = ops.rope(ri["positions"], q_view, ri["cos_sin_cache"], 64, False)
    b = ops.rope(ri["positions"], q_view.contiguous(), ri["cos_sin_cache"], 64, False)
    assert torch.equal(a, b)


# --- validation -------------------------------------------------------------------------------
x256 = torch.randn(4, 256)
w256 = torch.randn(256)
ri = rope_inputs()
BAD_INPUTS: list[tuple[str, Callable[[], Any], type, str]] = [
    (
        "mxfp4 K",
        lambda: ops.mxfp4_quant(torch.randn(4, 48)),
        ValueError,
        "fusion_ops.mxfp4_quant: argument 'x': last dim K=48 must be a multiple of 32",
    ),
    (
        "mxfp8 dtype",
        lambda: ops.mxfp8_quant(torch.ones(4, 32, dtype=torch.int32)),
        TypeError,
        "fusion_ops.mxfp8_quant: argument 'x' has dtype int32",
    ),
    (
        "group K",
        lambda: ops.fp8_group_quant(torch.randn(2, 192), 128, False, FN),
        ValueError,
        "multiple of group_size=128",
    ),
    (
        "fp8 dtype",
        lambda: ops.fp8_per_token_quant(x256, False, torch.bfloat16),
        TypeError,
        "fusion_ops.fp8_per_token_quant: argument 'fp8_dtype'",
    ),
    (
        "norm weight",
        lambda: ops.rms_norm(x256, torch.randn(128), EPS),
        ValueError,
        "fusion_ops.rms_norm: argument 'weight': has 128 elements; expected x's last dim 256",
    ),
    (
        "add residual dtype",
        lambda: ops.add_rms_norm_mxfp4_quant(x256, x256.bfloat16(), w256, EPS),
        TypeError,
        "fusion_ops.add_rms_norm_mxfp4_quant: argument 'residual' has dtype bfloat16",
    ),
    (
        "fused K",
        lambda: ops.rms_norm_mxfp4_quant(torch.randn(2, 40), torch.randn(40), EPS),
        ValueError,
        "fusion_ops.rms_norm_mxfp4_quant: argument 'x': last dim K=40",
    ),
    (
        "rope odd",
        lambda: ops.rope(ri["positions"], ri["q"], torch.randn(64, 63), 63, False),
        ValueError,
        "argument 'rope_dim': got 63; expected an even number",
    ),
    (
        "rope too large",
        lambda: ops.rope(ri["positions"], ri["q"][..., :32], ri["cos_sin_cache"], 64, False),
        ValueError,
        "argument 'rope_dim': got 64; expected an even number in [2, 32]",
    ),
    (
        "rope position",
        lambda: ops.rope(torch.tensor([0, 1, 2, 3, 64]), ri["q"], ri["cos_sin_cache"], 64, False),
        ValueError,
        "fusion_ops.rope: argument 'positions' holds 64; expected values < 64",
    ),
    (
        "slot range",
        lambda: ops.mla_cache_write(
            ri["kv"], fusion_ops.alloc_mla_cache(1, 4), torch.tensor([0, 1, 2, 3, 4]), "dsv4_fp8"
        ),
        ValueError,
        "fusion_ops.mla_cache_write: argument 'slot_mapping' holds 4; expected values < 4",
    ),
    (
        "kv dtype",
        lambda: ops.mla_cache_write(
            ri["kv"].float(), ri["kv_cache"], ri["slot_mapping"], "dsv4_fp8"
        ),
        TypeError,
        "fusion_ops.mla_cache_write: argument 'kv' has dtype float32",
    ),
    (
        "layout",
        lambda: ops.mla_cache_write(ri["kv"], ri["kv_cache"], ri["slot_mapping"], "fp4"),
        ValueError,
        "argument 'layout': got 'fp4'",
    ),
    (
        "cache shape",
        lambda: ops.dequant_cache(
            torch.zeros(2, 4, 576, dtype=torch.uint8), torch.tensor([0]), "dsv4_fp8"
        ),
        ValueError,
        "layout 'dsv4_fp8' expects [num_blocks, block_size, 584] uint8",
    ),
    (
        "cache not contiguous",
        lambda: ops.dequant_cache(
            torch.zeros(2, 584, 4, dtype=torch.uint8).transpose(1, 2), torch.tensor([0]), "dsv4_fp8"
        ),
        ValueError,
        "each block must be contiguous",
    ),
    (
        "q_kv rows",
        lambda: ops.q_kv_rms_norm(x256, w256, EPS, torch.randn(3, 128), torch.randn(128), EPS),
        ValueError,
        "fusion_ops.q_kv_rms_norm: argument 'kv': has shape (3, 128); expected the leading dims "
        "of 'q' (4,)",
    ),
    (
        "q_kv weight",
        lambda: ops.q_kv_rms_norm_mxfp4_quant(
            x256, torch.randn(128), EPS, torch.randn(4, 128), torch.randn(128), EPS
        ),
        ValueError,
        "fusion_ops.q_kv_rms_norm_mxfp4_quant: argument 'q_weight': has 128 elements; expected "
        "q's last dim 256",
    ),
    (
        "q_kv eps",
        lambda: ops.q_kv_rms_norm(x256, w256, EPS, torch.randn(4, 128), torch.randn(128), -1.0),
        ValueError,
        "fusion_ops.q_kv_rms_norm: argument 'kv_eps': got -1.0; expected >= 0",
    ),
    (
        "norm rope cache out_dtype",
        lambda: ops.rms_norm_rope_mla_cache_write(
            ri["positions"],
            ri["kv"].float(),
            torch.randn(512),
            EPS,
            ri["cos_sin_cache"],
            ri["kv_cache"],
            ri["slot_mapping"],
            64,
            False,
            "dsv4_fp8",
        ),  # fmt: skip
        TypeError,
        "fusion_ops.rms_norm_rope_mla_cache_write: argument 'x' is written as float32 "
        "(out_dtype); layout 'dsv4_fp8' expects bfloat16 rows",
    ),
    (
        "block id",
        lambda: ops.dequant_cache_fp8(ri["kv_cache"], torch.tensor([4]), "dsv4_fp8", FN),
        ValueError,
        "fusion_ops.dequant_cache_fp8: argument 'block_ids' holds 4; expected values < 4",
    ),
    (
        "negative block id",
        lambda: ops.dequant_cache(ri["kv_cache"], torch.tensor([-1]), "dsv4_fp8"),
        ValueError,
        "argument 'block_ids' holds -1; expected values >= 0",
    ),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_op_argument_and_expectation(case: tuple) -> None:
    _, call, exc, message = case
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value)


def test_validation_also_fails_at_compile_time() -> None:
    """Fakes validate too: torch.compile reports the same error while tracing."""
    fn = torch.compile(lambda x: ops.mxfp4_quant(x), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="last dim K=48 must be a multiple of 32"):
        fn(torch.randn(4, 48))
