"""The FP8 quant kernels' quotient y / s from one reciprocal per group (kernels._div_by_rcp, via
_fp8_values) gives the same FP8 codes as a correctly rounded division per value, and the same
fp32 quotient from 2⁻⁶⁰ up (far below FP8's range) (pytest -m gpu).

The sweep is exhaustive for 16-bit activations: every group scale a bf16 / fp16 group can get
(every amax bit pattern, inf and NaN included, through the kernels' own _fp8_scale, fp32 and
UE8M0 scales, e4m3fn's and e4m3fnuz's max) against every value that group can hold (|y| ≤ amax,
both signs). fp32 activations are sampled: random bit patterns over the whole exponent range.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fusion_ops import formats
from fusion_ops.triton_backend.kernels import _clamp_keep_nan, _fp8_scale, _fp8_values

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU"),
]


@triton.jit
def _by_division(y, s, fp8_max):
    """The yardstick: clamp(div_rn(y, s)), a correctly rounded division per value."""
    return _clamp_keep_nan(tl.math.div_rn(y, s), -fp8_max, fp8_max)


@triton.jit
def _code(v):
    return v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)


@triton.jit
def _mismatch(y, s, fp8_max):
    """1 where the quotient from the reciprocal and the correctly rounded one give other e4m3
    codes (the sign of a zero included), or other fp32 bits at |y / s| ≥ 2⁻⁶⁰ (any NaN equal
    to any NaN)."""
    got = _fp8_values(y, s, fp8_max)
    want = _by_division(y, s, fp8_max)
    same = got.to(tl.int32, bitcast=True) == want.to(tl.int32, bitcast=True)
    same |= (got != got) & (want != want)
    same |= tl.abs(want) < 8.673617379884035e-19  # 2⁻⁶⁰: both become FP8 zeros
    return ((_code(got) != _code(want)) | ~same).to(tl.int64)


@triton.jit
def _sweep_16bit_kernel(bad_ptr, fp8_max, min_scale, FP16: tl.constexpr, UE8M0: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
    """Program a: the group whose amax has bit pattern a + 1 (up to 0x7FFF: inf, NaN) against
    every 16-bit value y with |y| ≤ amax (every value when amax is NaN: a NaN group)."""
    dtype: tl.constexpr = tl.float16 if FP16 else tl.bfloat16
    a_bits = (tl.program_id(0) + 1).to(tl.uint16)
    amax = a_bits.to(dtype, bitcast=True).to(tl.float32)
    s = _fp8_scale(amax, amax != amax, fp8_max, min_scale, UE8M0)
    bad = tl.zeros((BLOCK,), tl.int64)
    for start in tl.range(0, 65536, BLOCK):
        bits = (start + tl.arange(0, BLOCK)).to(tl.uint16)
        y = bits.to(dtype, bitcast=True).to(tl.float32)
        in_group = (tl.abs(y) <= amax) | (amax != amax)
        bad += _mismatch(y, s, fp8_max) * in_group
    tl.atomic_add(bad_ptr, tl.sum(bad, axis=0))


@triton.jit
def _sampled_kernel(y_ptr, amax_ptr, n, bad_ptr, fp8_max, min_scale, UE8M0: tl.constexpr,
                    BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    y = tl.load(y_ptr + offs, mask=live, other=0.0)
    amax = tl.load(amax_ptr + offs, mask=live, other=1.0)
    s = _fp8_scale(amax, amax != amax, fp8_max, min_scale, UE8M0)
    bad = _mismatch(y, s, fp8_max) * live
    tl.atomic_add(bad_ptr, tl.sum(bad, axis=0))


FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e4m3fnuz]


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=str)
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("fp16", [False, True], ids=["bf16", "fp16"])
def test_every_16bit_value_against_every_scale(fp8, ue8m0, fp16) -> None:
    bad = torch.zeros(1, dtype=torch.int64, device="cuda")
    fp8_max, min_scale = formats.fp8_max(fp8), formats.fp8_min_scale(fp8)
    _sweep_16bit_kernel[(0x7FFF,)](bad, fp8_max, min_scale, FP16=fp16, UE8M0=ue8m0, BLOCK=4096)
    assert bad.item() == 0


@pytest.mark.parametrize("ue8m0", [False, True])
def test_sampled_fp32_values(ue8m0) -> None:
    """fp32 y from random bit patterns (every exponent), amax = |y| · (1 + a random factor) or
    |y| itself (the group's largest value, whose quotient is fp8_max); inf where that
    overflows (an inf group)."""
    g = torch.Generator(device="cuda").manual_seed(7)
    fp8 = torch.float8_e4m3fn
    fp8_max, min_scale = formats.fp8_max(fp8), formats.fp8_min_scale(fp8)
    total, n = 0, 1 << 24
    for _ in range(8):
        bits = torch.randint(-(2**31), 2**31, (n,), device="cuda", generator=g)
        y = bits.to(torch.int32).view(torch.float32)
        y = torch.where(y.isfinite(), y, 1.0)
        grow = torch.rand(n, device="cuda", generator=g)
        grow *= torch.randint(0, 2, (n,), device="cuda", generator=g)  # half: amax = |y|
        amax = y.abs() * (1 + grow)  # inf where it overflows: an inf group
        bad = torch.zeros(1, dtype=torch.int64, device="cuda")
        _sampled_kernel[(triton.cdiv(n, 1024),)](
            y, amax, n, bad, fp8_max, min_scale, UE8M0=ue8m0, BLOCK=1024
        )
        total += bad.item()
    assert total == 0


def test_the_comparison_can_fail() -> None:
    """Without the FMA correction (RN(y · RN(1/s)) alone) the bf16 sweep finds other fp32
    quotients, and other FP8 codes: the correction is needed and the comparison sees it."""

    @triton.jit
    def uncorrected_kernel(bad_ptr, fp8_max, min_scale, BLOCK: tl.constexpr):
        a_bits = (tl.program_id(0) + 1).to(tl.uint16)
        amax = a_bits.to(tl.bfloat16, bitcast=True).to(tl.float32)
        s = _fp8_scale(amax, amax != amax, fp8_max, min_scale, False)
        values = tl.zeros((BLOCK,), tl.int64)
        codes = tl.zeros((BLOCK,), tl.int64)
        for start in tl.range(0, 65536, BLOCK):
            y = (start + tl.arange(0, BLOCK)).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            y = y.to(tl.float32)
            got = tl.minimum(tl.maximum(y * tl.math.div_rn(1.0, s), -fp8_max), fp8_max)
            want = _by_division(y, s, fp8_max)
            in_group = tl.abs(y) <= amax
            values += ((got != want) & in_group).to(tl.int64)
            codes += ((_code(got) != _code(want)) & in_group).to(tl.int64)
        tl.atomic_add(bad_ptr, tl.sum(values, axis=0))
        tl.atomic_add(bad_ptr + 1, tl.sum(codes, axis=0))

    bad = torch.zeros(2, dtype=torch.int64, device="cuda")
    fp8 = torch.float8_e4m3fn
    fp8_max, min_scale = formats.fp8_max(fp8), formats.fp8_min_scale(fp8)
    uncorrected_kernel[(0x7F7F,)](bad, fp8_max, min_scale, BLOCK=4096)  # finite amax only
    values, codes = bad.tolist()
    print(f"uncorrected quotient: {values} fp32 values and {codes} FP8 codes differ")
    assert values > 0 and codes > 0
