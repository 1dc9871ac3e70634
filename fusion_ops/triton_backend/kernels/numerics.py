"""Numeric primitives the kernels share: exact powers of two and exponents from float bits,
NaN-keeping clamps, the norm's sum of squares and 1/rms, reciprocals by FMA corrections, PDL."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pow2(e):
    """2**e as fp32 for int32 e in [-127, 127], exactly (2**-127 is subnormal)."""
    bits = tl.where(e == -127, 0x00400000, (e + 127) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _ceil_log2_ratio_448(a):
    """ceil(log2(a / 448)) for finite normal a > 0, exactly: a = m·2^p, 448 = 0.875·2^9."""
    bits = a.to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)


@triton.jit
def _ceil_log2(s):
    """ceil(log2(s)) for finite normal s > 0, exactly."""
    bits = s.to(tl.int32, bitcast=True)
    field = (bits >> 23) & 0xFF
    return tl.where((bits & 0x7FFFFF) == 0, field - 127, field - 126)


@triton.jit
def _clamp_keep_nan(x, lo, hi):
    return tl.where(x != x, x, tl.minimum(tl.maximum(x, lo), hi))


@triton.jit
def _sum_of_squares(
    x_ptr,
    r_ptr,
    row,
    x_stride,
    r_stride,
    K,
    HAS_RES: tl.constexpr,
    UNROUNDED_SUM: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Σ x² of the row from a load used for nothing else.

    tl.sum's order follows the register layout, which Triton also picks from how a tensor is
    used later; the fused and standalone kernels use the normed row differently. A dedicated
    load (re-read from cache) gets the same layout in every variant, so they round alike.
    """
    cols = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + row * x_stride + cols, mask=cols < K, other=0.0)
    return _sum_of_squares_of(x, r_ptr, row, r_stride, K, HAS_RES, UNROUNDED_SUM, BLOCK_K)


@triton.jit
def _sum_of_squares_of(
    x, r_ptr, row, r_stride, K, HAS_RES: tl.constexpr, UNROUNDED_SUM: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Σ (x [+ r])² of a whole row x (zeros past K) used for nothing else (see _sum_of_squares)."""
    cols = tl.arange(0, BLOCK_K)
    xf = x.to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + row * r_stride + cols, mask=cols < K, other=0.0)
        xf = xf + r.to(tl.float32)
        if not UNROUNDED_SUM:
            xf = xf.to(x.dtype).to(tl.float32)
    return tl.sum(xf * xf, axis=0)


@triton.jit
def _inv_rms(ss, K, eps, INV_BY_FMA: tl.constexpr = False):
    """1 / sqrt(Σx²/K + eps), each step correctly rounded, so every vendor and the reference
    round alike: RN(1 / RN(sqrt(RN(ss / K) + eps))).

    INV_BY_FMA (NVIDIA with eps ≥ 2⁻⁴⁰ only: the launchers' ``inv_rms_by_fma``): the same bits from
    hardware seeds and FMA corrections, without the range checks and branches of ``div.rn`` /
    ``sqrt.rn`` (_mean_by_fma, _rcp_sqrt_by_fma; tests/gpu/test_inv_rms_steps.py checks every
    fp32 sum of squares). The correctly rounded instructions are measurably slower at decode
    sizes than vLLM's approximate rsqrt (benchmarks/q_kv_inv_rms.py, RESULTS.md)."""
    if INV_BY_FMA:
        return _rcp_sqrt_by_fma(_mean_by_fma(ss, K) + eps, ss)
    mean = tl.math.div_rn(ss, tl.cast(K, tl.float32))
    return tl.math.div_rn(1.0, tl.sqrt_rn(mean + eps))


@triton.jit
def _mean_by_fma(ss, K):
    """RN(ss / K) for a sum of squares ss ≥ 2⁻⁹⁰ (Markstein: q = RN(ss·RN(1/K)) corrected by one
    FMA with the exact remainder), NaN for inf. Below 2⁻⁹⁰ its magnitude stays under 2⁻⁸⁹, so
    RN(mean + eps) = eps = RN(RN(ss / K) + eps) for every eps ≥ 2⁻⁴⁰ (under half an ulp of eps)."""
    k = tl.cast(K, tl.float32)
    rk = _rcp_by_fma(k)  # the row's data does not reach it: off the dependent chain
    q = ss * rk
    return tl.fma(tl.fma(-k, q, ss), rk, q)


@triton.jit
def _rcp_sqrt_by_fma(v, ss):
    """RN(1 / RN(sqrt(v))) for v in [2⁻⁴⁰, FLT_MAX] (NaN for NaN), 0 where ss is inf: CUDA's
    own fast path of ``sqrt.rn`` (rsqrt seed, one FMA correction of v·seed), then _rcp_by_fma."""
    y = _approx_f32("rsqrt.approx.ftz.f32 $0, $1;", v)
    s0 = v * y
    s = tl.fma(tl.fma(-s0, s0, v), 0.5 * y, s0)
    return tl.where(ss == float("inf"), 0.0, _rcp_by_fma(s))


@triton.jit
def _rcp_by_fma(s):
    """RN(1 / s) for s in [2⁻¹²⁵, 2¹²⁶]: CUDA's own fast path of ``rcp.rn`` (reciprocal seed, one
    FMA correction), whose slow path serves the rest of the range."""
    z = _approx_f32("rcp.approx.ftz.f32 $0, $1;", s)
    return tl.fma(z, tl.fma(-s, z, 1.0), z)


@triton.jit
def _approx_f32(asm: tl.constexpr, x):
    return tl.inline_asm_elementwise(asm, "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _bits(v, BITS: tl.constexpr):
    """v's bits as a signed int of its width (16 or 32)."""
    if BITS == 16:
        out = v.to(tl.int16, bitcast=True)
    else:
        out = v.to(tl.int32, bitcast=True)
    return out


@triton.jit
def _pdl_start():
    """Programmatic dependent launch (CUDA sm_90+, kernels launched with ``launch_pdl``): wait
    for the previous kernel to finish and flush, then let the next one launch. Nothing before it
    touches memory (a weight written by the previous kernel stays safe): only the launch and the
    index math overlap the previous kernel's tail."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _mul_rn(a, b, HIP: tl.constexpr):
    """a·b rounded to fp32 as its own instruction, which the compiler cannot contract with a
    following add into an FMA (what ``enable_fp_fusion=False`` gives a whole kernel): inline
    assembly is opaque to LLVM and ptxas (``mul.rn`` on NVIDIA, ``v_mul_f32`` on AMD)."""
    if HIP:
        return tl.inline_asm_elementwise(
            "v_mul_f32 $0, $1, $2", "=v,v,v", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
