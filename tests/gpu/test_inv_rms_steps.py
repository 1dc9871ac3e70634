"""The norm kernels' 1/rms by FMA corrections (kernels._inv_rms, INV_BY_FMA) equals the correctly
rounded steps bit for bit on every fp32 sum of squares, at row widths and eps values of real
models and at the smallest eps the launchers allow (pytest -m gpu; NVIDIA: the seeds are PTX).

A sum of squares is never negative, so the sweep covers its whole domain: the 2³¹ non-negative
bit patterns per (K, eps), inf and NaN included. A second sweep checks the square root and
reciprocal steps alone on every v the first one can reach (every float from 2⁻⁴⁰ up). The ops
themselves then give the same bytes with the FMA steps as with the division instructions.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import fusion_ops  # noqa: F401  (registers the ops)
import fusion_ops.triton_backend as triton_backend
from fusion_ops import launch_policy as policy
from fusion_ops.launch_policy import INV_RMS_BY_FMA_MIN_EPS
from fusion_ops.triton_backend.kernels import _inv_rms, _rcp_by_fma, _rcp_sqrt_by_fma
from fusion_passes.testing import assert_bitwise_equal

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.version.hip is not None,
        reason="needs an NVIDIA GPU",
    ),
]

_BLOCK = 1024
_CHUNK = 1 << 28


@triton.jit
def _differ(a, b):
    """Different bits, any NaN counting as equal to any NaN."""
    same = (a.to(tl.int32, bitcast=True) == b.to(tl.int32, bitcast=True)) | ((a != a) & (b != b))
    return (~same).to(tl.int64)


@triton.jit
def _inv_rms_mismatches_kernel(start, end, K, eps, bad_ptr, BLOCK: tl.constexpr):
    bits = start + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ss = bits.to(tl.int32).to(tl.float32, bitcast=True)
    eps = tl.cast(eps, tl.float32)
    bad = _differ(_inv_rms(ss, K, eps, True), _inv_rms(ss, K, eps, False)) * (bits < end)
    tl.atomic_add(bad_ptr, tl.sum(bad, axis=0))


@triton.jit
def _rcp_sqrt_mismatches_kernel(start, end, bad_ptr, BLOCK: tl.constexpr):
    bits = start + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = bits.to(tl.int32).to(tl.float32, bitcast=True)
    exact = tl.math.div_rn(1.0, tl.sqrt_rn(v))
    bad = _differ(_rcp_sqrt_by_fma(v, v), exact) * (bits < end)
    tl.atomic_add(bad_ptr, tl.sum(bad, axis=0))


@triton.jit
def _rcp_mismatches_kernel(start, end, bad_ptr, BLOCK: tl.constexpr):
    """Row widths K = 1 … 2²⁴ (every integer a float holds exactly)."""
    k = start + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    kf = k.to(tl.float32)
    bad = _differ(_rcp_by_fma(kf), tl.math.div_rn(1.0, kf)) * (k < end)
    tl.atomic_add(bad_ptr, tl.sum(bad, axis=0))


def _sweep(kernel, start: int, end: int, *args) -> int:  # type: ignore[no-untyped-def]
    bad = torch.zeros(1, dtype=torch.int64, device="cuda")
    for lo in range(start, end, _CHUNK):
        hi = min(lo + _CHUNK, end)
        kernel[(triton.cdiv(hi - lo, _BLOCK),)](lo, hi, *args, bad, BLOCK=_BLOCK)
    return int(bad.item())


def _bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float32).view(torch.int32).item())


@pytest.mark.parametrize("eps", [INV_RMS_BY_FMA_MIN_EPS, 1e-12, 1e-6, 1e-5, 0.25])
@pytest.mark.parametrize("k", [1, 3, 64, 128, 512, 576, 1024, 1536, 4096, 7168, 16384])
def test_inv_rms_by_fma_is_the_correctly_rounded_chain(k: int, eps: float) -> None:
    assert _sweep(_inv_rms_mismatches_kernel, 0, 1 << 31, k, eps) == 0


def test_rcp_sqrt_by_fma_on_every_reachable_v() -> None:
    """v = RN(mean + eps) ≥ eps ≥ 2⁻⁴⁰: every float from there to inf (where ss = v = inf)."""
    assert _sweep(_rcp_sqrt_mismatches_kernel, _bits(INV_RMS_BY_FMA_MIN_EPS), 0x7F800001) == 0


def test_rcp_by_fma_of_every_row_width() -> None:
    """The mean's RN(1/K) (Markstein's theorem needs it correctly rounded)."""
    assert _sweep(_rcp_mismatches_kernel, 1, (1 << 24) + 1) == 0


def test_the_sweep_can_fail() -> None:
    """Below the allowed eps the shortcut is wrong somewhere: the sweep sees it."""
    assert _sweep(_inv_rms_mismatches_kernel, 0, 1 << 31, 1536, 0.0) > 0


def _rows_of_every_magnitude(tokens: int, k: int) -> torch.Tensor:
    """Rows scaled by 2^-140 … 2^120 (sums of squares from subnormal to overflow), a zero row,
    rows with inf and NaN."""
    g = torch.Generator(device="cuda").manual_seed(0)
    scale = torch.exp2(torch.linspace(-140, 120, tokens, device="cuda"))
    x = torch.randn(tokens, k, device="cuda", generator=g) * scale[:, None]
    x[0] = 0.0
    x[1, 7] = float("inf")
    x[2, 9] = float("nan")
    return x.to(torch.bfloat16)


_FP8 = (128, True, torch.float8_e4m3fn)
_CALLS = {  # op -> its arguments from (x, w)
    "rms_norm": lambda x, w: (x, w, 1e-6),
    "weightless_rms_norm": lambda x, w: (x, 1e-6),
    "fused_add_rms_norm": lambda x, w: (x, x.flip(0), w, 1e-5),
    "q_kv_rms_norm": lambda x, w: (x, w, 1e-6, x[:, :512], w[:512], 1e-6),
    "rms_norm_fp8_group_quant": lambda x, w: (x, w, 1e-6, *_FP8, True),
    "q_kv_rms_norm_fp8_group_quant": lambda x, w: (x, w, 1e-6, x[:, :512], w[:512], 1e-6, *_FP8),
}
ops = torch.ops.fusion_ops


@pytest.mark.parametrize("tokens", [1, 300, 2048])
@pytest.mark.parametrize("op", sorted(_CALLS))
def test_ops_by_fma_equal_the_division_instructions(op: str, tokens: int, monkeypatch) -> None:
    # one token: a row of small values (2^-65 … ), whose squares need the mean's correction
    x = _rows_of_every_magnitude(max(tokens, 3), 1536)[:tokens] if tokens > 1 else None
    x = _rows_of_every_magnitude(300, 1536)[87:88] if x is None else x
    w = (1 + 0.1 * torch.randn(1536, device="cuda")).to(torch.bfloat16)
    args = _CALLS[op](x, w)
    # the Python kernel (a C++ replay of the first call would not choose the steps again)
    python_kernel = getattr(ops, f"_python_{op}", None) or getattr(ops, op)
    assert policy.inv_rms_by_fma(triton_backend.device_facts(0), 1e-6, 1e-5)
    by_fma = python_kernel(*args)
    asked: list[tuple[float, ...]] = []

    def division_steps(device: policy.DeviceFacts, *eps: float) -> bool:
        asked.append(eps)
        return False

    monkeypatch.setattr(policy, "inv_rms_by_fma", division_steps)
    by_division = python_kernel(*args)
    assert asked, "the second call did not choose its 1/rms steps"
    assert_bitwise_equal(by_fma, by_division, op)
