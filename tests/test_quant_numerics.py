"""Quant ops against the contract: independent oracles, explicit ties/zeros/NaN/inf, properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusion_ops  # noqa: F401
from tests import oracles

ops = torch.ops.fusion_ops
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> codes [..., K] (even element = low nibble)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def check_mxfp4(x: torch.Tensor) -> None:
    packed, scales = ops.mxfp4_quant(x)
    codes = unpack_fp4(packed).reshape(-1, 32).tolist()
    xs = x.float().reshape(-1, 32).tolist()
    for row, (vals, got_codes, got_scale) in enumerate(
        zip(xs, codes, scales.reshape(-1).tolist(), strict=True)
    ):
        want_codes, want_scale = oracles.mxfp4_block(vals)
        assert got_scale == want_scale, f"block {row}: scale {got_scale} != {want_scale}"
        assert got_codes == want_codes, f"block {row}: codes differ for {vals}"


def check_mxfp8(x: torch.Tensor) -> None:
    q, scales = ops.mxfp8_quant(x)
    got = q.view(torch.uint8).reshape(-1, 32).tolist()
    for vals, got_codes, got_scale in zip(
        x.float().reshape(-1, 32).tolist(), got, scales.reshape(-1).tolist(), strict=True
    ):
        want_codes, want_scale = oracles.mxfp8_block(vals)
        assert got_scale == want_scale
        assert got_codes == want_codes


def check_fp8_group(x: torch.Tensor, group: int, ue8m0: bool, dtype: torch.dtype) -> None:
    if group == x.shape[-1]:
        q, s = ops.fp8_per_token_quant(x, ue8m0, dtype)
    else:
        q, s = ops.fp8_group_quant(x, group, ue8m0, dtype)
    got = q.view(torch.uint8).reshape(-1, group).tolist()
    for vals, got_codes, got_scale in zip(
        x.float().reshape(-1, group).tolist(), got, s.reshape(-1).tolist(), strict=True
    ):
        want_codes, want_scale = oracles.fp8_group(vals, ue8m0, dtype)
        assert got_scale == want_scale or (math.isnan(got_scale) and math.isnan(want_scale))
        assert got_codes == want_codes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mxfp4_random_matches_oracle(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 128, generator=g) * torch.logspace(-6, 6, 128)).to(dtype)
    check_mxfp4(x)


def test_mxfp4_ties_round_away_from_zero() -> None:
    # amax 6·2^u sets the block exponent u; every element is an exact tie between two codes
    for u in (-10, 0, 7):
        ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
        vals = [6.0] + ties + [-t for t in ties] + [0.0] * 17
        x = torch.tensor(vals, dtype=torch.float32) * 2.0**u
        packed, scales = ops.mxfp4_quant(x)
        assert scales.item() == u + 127
        codes = unpack_fp4(packed).tolist()
        away = [1, 2, 3, 4, 5, 6, 7]  # 0.25→0.5, 0.75→1, 1.25→1.5, 1.75→2, 2.5→3, 3.5→4, 5→6
        assert codes[1:8] == away
        assert codes[8:15] == [c | 8 for c in away]


def test_mxfp4_zero_block_and_signed_zero() -> None:
    x = torch.zeros(2, 32)
    x[1] = -0.0
    packed, scales = ops.mxfp4_quant(x)
    assert scales.tolist() == [[0], [0]]  # u = -127
    assert unpack_fp4(packed)[0].tolist() == [0] * 32
    assert unpack_fp4(packed)[1].tolist() == [8] * 32  # negative zero keeps its sign bit


def test_mxfp4_amax_rounding_examples() -> None:
    # vLLM 0.33.0 mxfp4_utils.py, AITER dynamic_mxfp4_quant:
    # amax 1.0 → u −2; 7.0 → rounds to 8 → u 1; 1.74 → u −2;
    # 1.76 → u −1; 0.3 → u −4
    for amax, u in ((1.0, -2), (7.0, 1), (1.74, -2), (1.76, -1), (0.3, -4), (6.0, 0)):
        x = torch.zeros(32)
        x[0] = amax
        assert ops.mxfp4_quant(x)[1].item() == u + 127, amax


def test_mxfp4_nan_and_inf_blocks() -> None:
    x = torch.ones(3, 32)
    x[0, 5] = float("nan")
    x[1, 3] = float("inf")
    x[2, 0] = -float("inf")
    packed, scales = ops.mxfp4_quant(x)
    assert scales[:, 0].tolist() == [255, 254, 254]
    codes = unpack_fp4(packed)
    assert codes[0].tolist() == [0] * 32
    assert codes[1, 3].item() == 7 and codes[2, 0].item() == 15  # inf saturates to ±6
    check_mxfp4(x)


def test_mxfp8_saturation_and_specials() -> None:
    x = torch.ones(4, 32)
    x[0, 0] = 448.0 * 2**5
    x[1] = 0.0
    x[2, 1] = float("nan")
    x[3, 2] = float("inf")
    q, scales = ops.mxfp8_quant(x)
    assert scales[:, 0].tolist() == [132, 0, 255, 254]
    assert q[0, 0].float().item() == 448.0
    assert q[3, 2].float().item() == 448.0
    assert math.isnan(q[2, 1].float().item())
    check_mxfp8(x)


@pytest.mark.parametrize("dtype", FP8_DTYPES)
@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_quant_random_matches_oracle(dtype: torch.dtype, ue8m0: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 256, generator=g) * 10).to(torch.bfloat16)
    check_fp8_group(x, 128, ue8m0, dtype)
    check_fp8_group(x, 256, ue8m0, dtype)


@pytest.mark.parametrize("dtype", FP8_DTYPES)
def test_fp8_quant_clamps_never_overflows(dtype: torch.dtype) -> None:
    # tiny rows use the scale floor 1/(FP8_MAX·512): values clamp at ±FP8_MAX instead of NaN
    x = torch.full((2, 128), 1e-9)
    x[1, 0] = 1.0  # large against the other values: scale from amax, max code = FP8_MAX
    q, s = ops.fp8_group_quant(x, 128, False, dtype)
    fmax = torch.finfo(dtype).max
    assert s[0, 0].item() == pytest.approx(1.0 / (fmax * 512.0), rel=1e-6)
    assert q.float().abs().max().item() == fmax
    assert not q.float().isnan().any()


def test_fp8_quant_nan_and_inf_rows() -> None:
    x = torch.ones(2, 128)
    x[0, 1] = float("nan")
    x[1, 2] = float("inf")
    q, s = ops.fp8_per_token_quant(x, False, torch.float8_e4m3fn)
    assert math.isnan(s[0, 0].item()) and q[0].float().isnan().all()
    assert math.isinf(s[1, 0].item())
    assert math.isnan(q[1, 2].float().item()) and q[1, 0].float().item() == 0.0


def test_fp8_ue8m0_scales_are_powers_of_two() -> None:
    x = torch.randn(8, 512) * 37
    _, s = ops.fp8_group_quant(x, 128, True, torch.float8_e4m3fn)
    m, _ = torch.frexp(s)
    assert (m == 0.5).all()


# --- properties -------------------------------------------------------------------------------
special = st.sampled_from(
    [0.0, -0.0, 1e-45, -1e-45, 1e-40, 2.0**-126, 3e38, -3e38, 65504.0, 0.25, -0.75, 5.0]
)
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
any32 = st.one_of(finite32, special, st.floats(width=32))  # the last adds NaN and ±inf
blocks = st.lists(st.one_of(finite32, special), min_size=32, max_size=32)
blocks_with_nonfinite = st.lists(any32, min_size=32, max_size=32)


@settings(max_examples=150, deadline=None)
@given(blocks_with_nonfinite)
def test_property_mxfp4_matches_oracle(values: list[float]) -> None:
    check_mxfp4(torch.tensor(values, dtype=torch.float32))


@settings(max_examples=150, deadline=None)
@given(blocks_with_nonfinite)
def test_property_mxfp8_matches_oracle(values: list[float]) -> None:
    check_mxfp8(torch.tensor(values, dtype=torch.float32))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.one_of(finite32, special), min_size=128, max_size=128),
    st.booleans(),
    st.sampled_from(FP8_DTYPES),
)
def test_property_fp8_group_matches_oracle(
    values: list[float], ue8m0: bool, dtype: torch.dtype
) -> None:
    check_fp8_group(torch.tensor(values, dtype=torch.float32).reshape(1, 128), 128, ue8m0, dtype)


@settings(max_examples=100, deadline=None)
@given(blocks)
def test_property_mxfp4_dequant_error_bound(values: list[float]) -> None:
    """Decoded MXFP4 is within half an E2M1 step (at most 1·2^u) of finite input, or saturated."""
    x = torch.tensor(values, dtype=torch.float32)
    packed, scales = ops.mxfp4_quant(x)
    u = scales.item() - 127
    codes = unpack_fp4(packed)
    mags = torch.tensor(oracles.FP4, dtype=torch.float64)[(codes & 7).long()]
    decoded = torch.where((codes & 8) > 0, -mags, mags) * 2.0**u
    err = (decoded - x.double()).abs()
    saturated = x.double().abs() > 6 * 2.0**u
    assert ((err <= 2.0**u) | saturated).all()


def _e2m1_short_form(mag: torch.Tensor) -> torch.Tensor:
    """The Triton kernel's E2M1 code of 16-bit input (kernels.quant._e2m1_code_short), in
    torch: v = max(|q|, |q|·0.5 + 0.5) (the product exact, one rounding), then the bit formula
    ((bits(v) + 0x200000) >> 22, unsigned) − 252 capped at 7."""
    v = torch.maximum(mag, mag * 0.5 + 0.5)
    raw = ((v.view(torch.int32).to(torch.int64) + 0x200000) & 0xFFFFFFFF) >> 22
    return raw.clamp(max=259) - 252


def _e2m1_by_thresholds(mag: torch.Tensor) -> torch.Tensor:
    """The contract: the number of E2M1 midpoints at or below |q| (ties away from zero)."""
    return sum((mag >= m).to(torch.int64) for m in fusion_ops.formats.FP4_MIDPOINTS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_e2m1_short_form_equals_the_thresholds_for_every_16_bit_value(dtype) -> None:
    """Exhaustive: every non-NaN value of the 16-bit type at every MXFP4 block scale 2^−127 …
    2^127 (q = y·2^−u rounded to fp32, subnormals included) gets the contract's code from the
    kernel's shorter form."""
    y = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    y = y[~y.isnan()].abs()
    for u in range(-127, 128, 17):  # 17 scales at a time keep the memory small
        scales = torch.tensor([2.0 ** -(u + i) for i in range(17) if u + i <= 127])
        mag = (y[None, :] * scales[:, None]).abs()
        assert torch.equal(_e2m1_short_form(mag), _e2m1_by_thresholds(mag)), (dtype, u)


def test_e2m1_short_form_is_not_for_fp32_values() -> None:
    """Why fp32 input keeps the comparisons: |q| + 1 rounds there, e.g. 0.25 − 2^−26 (code 0)
    gives (|q| + 1) / 2 = 0.625 after rounding (code 1), 0.75 − 2^−24 gives 0.875 (code 2)."""
    mag = torch.tensor([0.25 - 2.0**-26, 0.75 - 2.0**-24])
    assert _e2m1_by_thresholds(mag).tolist() == [0, 1]
    assert _e2m1_short_form(mag).tolist() == [1, 2]
