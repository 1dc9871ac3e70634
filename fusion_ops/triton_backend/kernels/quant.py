"""Quantizers of one normed tile: MXFP4 (E2M1 codes, E8M0 block scales), MXFP8 and FP8 groups
(fp32 or UE8M0 scales), each writing codes and scales in the op's layout."""

from __future__ import annotations

import triton
import triton.language as tl

from .numerics import _ceil_log2, _ceil_log2_ratio_448, _clamp_keep_nan, _pow2

SCHEME_NONE, SCHEME_MXFP4, SCHEME_MXFP8, SCHEME_FP8 = 0, 1, 2, 3


@triton.jit
def _mxfp4(
    y, q_ptr, s_ptr, row, K, BLOCK_K: tl.constexpr, col0, INT_MAX: tl.constexpr,
    SHORT: tl.constexpr = False,
):  # fmt: skip
    """MXFP4 codes and scales of y = row[col0 : col0 + BLOCK_K] (col0 a multiple of 32); SHORT:
    y holds values of a 16-bit float type (see _e2m1_code_short)."""
    NB: tl.constexpr = BLOCK_K // 32
    yb = tl.reshape(y, (NB, 32))
    amax_bits, has_nan = _amax_bits_and_nan(yb, INT_MAX)
    finite_or_inf = tl.minimum(amax_bits, 0x7F800000)  # no int overflow; NaN: overridden below
    rounded = ((finite_or_inf + 0x200000) & -0x800000) >> 23
    field = rounded & 0xFF
    u = tl.where(field == 255, 127, tl.minimum(tl.maximum(field - 129, -127), 127))
    u = tl.where(has_nan, 127, u)
    byte = tl.where(has_nan, 255, u + 127)  # int32 in [0, 255]: no negative float→uint cast
    q = yb * _pow2(-u)[:, None]
    # q's sign bit moved to bit 3 (q's, not y's: a NaN keeps whatever sign the multiply gives it,
    # as in the reference computed on the same device)
    sign = (q.to(tl.int32, bitcast=True) >> 28) & 8
    if SHORT:  # a NaN block's codes are 0 (its signs stay): the cap 0 instead of 7
        code = _e2m1_code_short(tl.abs(q), tl.where(has_nan, 0, 7)[:, None]) | sign
    else:
        code = tl.where(has_nan[:, None], 0, _e2m1_code(tl.abs(q))) | sign
    # pack pairs (2j, 2j+1) as lo | hi << 4: a weighted sum over a size-2 axis stays inside a
    # thread, where tl.split may shuffle through shared memory
    nibble_weight = (1 + 15 * tl.arange(0, 2))[None, None, :]  # [1, 16]
    packed = tl.sum(tl.reshape(code, (NB, 16, 2)) * nibble_weight, axis=2).to(tl.uint8)
    blk = col0 // 32 + tl.arange(0, NB)
    pair = blk[:, None] * 16 + tl.arange(0, 16)[None, :]
    tl.store(q_ptr + row * (K // 2) + pair, packed, mask=pair < K // 2)
    tl.store(s_ptr + row * (K // 32) + blk, byte.to(tl.uint8), mask=blk < K // 32)


@triton.jit
def _amax_bits_and_nan(t, INT_MAX: tl.constexpr):
    """(max |t| of each row of t as int32 bits, whether the row holds a NaN); the maximum's
    bits are meaningful only where there is no NaN. INT_MAX: from one integer max of |t|'s bits
    (ordered like the floats, NaN patterns above inf's 0x7F800000), else from a float max and a
    NaN test: two reductions, which cost more where a block spans warps (decode-size parts), and
    less on many rows with a residual (add+rms→MXFP4 6–9 % faster; rms→MXFP4 7 % slower). The
    same bytes either way."""
    if INT_MAX:
        amax_bits = _abs_bits_max(t, 1)
        has_nan = amax_bits > 0x7F800000
    else:
        has_nan = tl.max((t != t).to(tl.int32), axis=1) > 0
        amax_bits = tl.max(tl.abs(t), axis=1).to(tl.int32, bitcast=True)
    return amax_bits, has_nan


@triton.jit
def _abs_bits_max(t, axis: tl.constexpr):
    """max |t| along ``axis`` (fp32 t) as int32 bits: ordered like the magnitudes, NaN patterns
    above inf's 0x7F800000, so one integer max gives the amax and whether a NaN is there."""
    return tl.max(t.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=axis)


@triton.jit
def _e2m1_code(mag):
    """E2M1 code (0..7) of |q| rounded to nearest, ties away from zero, saturating at 6.

    From the float's bits: for |q| >= 1 (bits >= 0x3F800000) adding half an ulp of the 1-bit
    mantissa (0x200000) and truncating rounds ties away, so code = 2 + 2·(exponent − 127) +
    mantissa bit = (rounded >> 22) − 252 (exponent and mantissa bit are bits 22..30 of the
    non-negative sum; capped at 7, inf gives 258); below 1 the two subnormal steps are two
    comparisons (a rounding add would round twice). Equal to the seven threshold comparisons of
    the contract for every fp32 (checked exhaustively on a stride of the fp32 range and densely
    around every threshold), and, for every non-NaN |q|, to the spelled-out field extraction
    ``2 + 2·(((rounded >> 23) & 0xFF) − 127) + ((rounded >> 22) & 1)`` it replaces (all 2³¹
    patterns compared; NaN blocks are overridden by the caller).
    """
    bits = mag.to(tl.int32, bitcast=True)
    big = ((bits + 0x200000) >> 22) - 252
    small = (mag >= 0.25).to(tl.int32) + (mag >= 0.75).to(tl.int32)
    return tl.where(bits >= 0x3F800000, tl.minimum(big, 7), small)


@triton.jit
def _e2m1_code_short(mag, cap):
    """_e2m1_code of |q| = |y|·2^−u for y of a 16-bit float type, in fewer instructions (the
    MXFP4 path spends most of its time issuing them), capped at ``cap`` (7; 0 for a NaN block).

    Below 1 the codes 0, 1, 2 (thresholds 0.25, 0.75) are those of (|q| + 1) / 2 in [0.5, 1)
    under the same bit formula (its thresholds 0.625 and 0.875 at exponent 126: (rounded >> 22)
    − 252 = 0, 1, 2), and (|q| + 1) / 2 < 1 <= |q| from 1 on, so v = max(|q|, (|q| + 1) / 2)
    takes either form without a compare. It needs (|q| + 1) / 2 exact: y has at most 11
    significant bits, so |q| + 1 is exact from |q| >= 2^−13, and below that it rounds to under
    0.625 (code 0). Equal to the seven threshold comparisons of the contract for every bf16 and
    fp16 value at every scale 2^−127 … 2^127 (tests/test_quant_numerics.py, exhaustive); for
    fp32 y the rounding of |q| + 1 could cross a threshold (_e2m1_code serves it)."""
    v = tl.maximum(mag, mag * 0.5 + 0.5)  # the product is exact: one rounding; NaN stays NaN
    # unsigned: 252 … 510 for finite or inf |q|, 512 … 1023 for NaN (no sign to shift in)
    raw = (v.to(tl.uint32, bitcast=True) + 0x200000) >> 22
    return (tl.minimum(raw, (cap + 252).to(tl.uint32)) - 252).to(tl.int32)


@triton.jit
def _mxfp8(y, q_ptr, s_ptr, row, K, BLOCK_K: tl.constexpr, col0, INT_MAX: tl.constexpr = False):
    """MXFP8 codes and scales of y = row[col0 : col0 + BLOCK_K] (col0 a multiple of 32)."""
    NB: tl.constexpr = BLOCK_K // 32
    yb = tl.reshape(y, (NB, 32))
    amax_bits, has_nan = _amax_bits_and_nan(yb, INT_MAX)
    amax = amax_bits.to(tl.float32, bitcast=True)
    is_inf = amax == float("inf")
    safe = tl.where(is_inf, 1.0, tl.maximum(amax, 1.1754943508222875e-38))
    e = _ceil_log2_ratio_448(safe)
    byte = tl.where(is_inf, 254, tl.minimum(tl.maximum(e + 127, 0), 254))
    byte = tl.where(has_nan, 255, byte)
    exp = tl.where(byte == 255, 127, byte - 127)
    q = _clamp_keep_nan(yb * _pow2(-exp)[:, None], -448.0, 448.0)
    blk = col0 // 32 + tl.arange(0, NB)
    idx = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
    tl.store(q_ptr + row * K + idx, q.to(tl.float8e4nv), mask=idx < K)
    tl.store(s_ptr + row * (K // 32) + blk, byte.to(tl.uint8), mask=blk < K // 32)


@triton.jit
def _fp8_groups(
    y,
    q_ptr,
    s_ptr,
    row,
    K,
    fp8_max,
    min_scale,
    GROUP: tl.constexpr,
    UE8M0: tl.constexpr,
    BLOCK_K: tl.constexpr,
    col0,
    INT_MAX: tl.constexpr = False,
):
    """FP8 codes and scales of groups of y = row[col0 : col0 + BLOCK_K] (col0 a multiple of
    GROUP; per-token: GROUP = BLOCK_K, col0 = 0); INT_MAX: see _amax_bits_and_nan."""
    NG: tl.constexpr = BLOCK_K // GROUP
    yg = tl.reshape(y, (NG, GROUP))
    amax_bits, has_nan = _amax_bits_and_nan(yg, INT_MAX)
    amax = amax_bits.to(tl.float32, bitcast=True)
    s = _fp8_scale(amax, has_nan, fp8_max, min_scale, UE8M0)
    q = _fp8_values(yg, s[:, None], fp8_max)
    grp = col0 // GROUP + tl.arange(0, NG)
    idx = grp[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    n_groups = tl.maximum(K // GROUP, 1)  # per-token: one group (GROUP = the padded row)
    tl.store(q_ptr + row * K + idx, q.to(q_ptr.dtype.element_ty), mask=idx < K)
    tl.store(s_ptr + row * n_groups + grp, s, mask=grp < n_groups)


@triton.jit
def _fp8_token_part(
    y, amax_bits, q_ptr, s_ptr, row, K, fp8_max, min_scale, UE8M0: tl.constexpr,
    BLOCK: tl.constexpr, col0,
):  # fmt: skip
    """FP8 codes of y = row[col0 : col0 + BLOCK] under the row's per-token scale, from the whole
    row's max |y| as int32 bits (NaN patterns above 0x7F800000: the row holds a NaN); the part
    at column 0 writes the scale. The scale and codes are _fp8_groups' of the whole row."""
    has_nan = amax_bits > 0x7F800000
    s = _fp8_scale(amax_bits.to(tl.float32, bitcast=True), has_nan, fp8_max, min_scale, UE8M0)
    q = _fp8_values(y, s, fp8_max)
    cols = col0 + tl.arange(0, BLOCK)
    tl.store(q_ptr + row * K + cols, q.to(q_ptr.dtype.element_ty), mask=cols < K)
    tl.store(s_ptr + row, s, mask=col0 == 0)


@triton.jit
def _fp8_scale(amax, has_nan, fp8_max, min_scale, UE8M0: tl.constexpr):
    """A group's FP8 scale: max(amax / fp8_max, min_scale) [rounded up to a power of two], NaN
    for a group holding a NaN."""
    s = tl.maximum(tl.math.div_rn(amax, fp8_max), min_scale)
    if UE8M0:
        finite = s != float("inf")
        s = tl.where(finite, _pow2(_ceil_log2(tl.where(finite, s, 1.0))), s)
    return tl.where(has_nan, float("nan"), s)


@triton.jit
def _fp8_values(y, s, fp8_max):
    """clamp(y / s, ±fp8_max) (NaN kept), what the FP8 codes are cast from; s is the group's
    scale (one per group, broadcast over its values), the quotient from one reciprocal per
    group (_div_by_rcp: the codes of ``div_rn`` per value)."""
    return _clamp_keep_nan(_div_by_rcp(y, s, tl.math.div_rn(1.0, s)), -fp8_max, fp8_max)


@triton.jit
def _div_by_rcp(y, s, r):
    """y / s for FP8 codes, given r = RN(1 / s): q = RN(y·r) corrected by one FMA with the exact
    remainder y − q·s (Markstein), the correctly rounded quotient — the bits of ``div_rn(y, s)``
    without its per-element reciprocal, range check and branch — for every finite s > 0 wherever
    |y / s| ≥ 2⁻⁶⁰ (smaller quotients may differ in their last fp32 bits: the remainder can
    underflow; both become the same FP8 zero). Where y·r is ±0 it is the result: a zero y keeps
    its sign (the corrected sum would turn −0 into +0), and s = inf gives y·0 = ±0 as y / s
    (NaN for an infinite y). NaN in, NaN out. tests/gpu/test_fp8_quotient.py checks every bf16
    and fp16 y against every scale a bf16 / fp16 group can get."""
    q = y * r
    return tl.where(q == 0.0, q, tl.fma(tl.fma(-q, s, y), r, q))
