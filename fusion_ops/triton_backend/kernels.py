"""Triton kernels of every fusion_ops op (NVIDIA and AMD: no vendor-only launch options).

Bit-exactness with the reference backend rests on three rules:
* exponents are taken from float bits and powers of two are built from bits (no log2/exp2 calls,
  whose last ulp differs between vendors); no float is ever cast straight to an unsigned int
  (AITER's MXFP4 scale bug on NVIDIA, shared/reference/aiter-semantics.md);
* RoPE kernels are compiled with ``enable_fp_fusion=False`` so ``a·cos − b·sin`` rounds after
  each operation like the torch reference, not through an FMA;
* clamps keep NaN explicitly (hardware min/max drop it).
The norm's sum of squares comes from a load used only for it (see _sum_of_squares), so the
fused and the standalone norm kernels round identically.
"""

from __future__ import annotations

import triton
import triton.language as tl

SCHEME_NONE, SCHEME_MXFP4, SCHEME_MXFP8, SCHEME_FP8 = 0, 1, 2, 3


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
    fp32 sum of squares). The correctly rounded instructions cost 0.05–0.07 µs per launch at
    decode sizes against vLLM's approximate rsqrt (H100, benchmarks/q_kv_inv_rms.py)."""
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


# --- norm + quant: one row per program -------------------------------------------------------
@triton.jit
def norm_quant_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    res_ptr,
    q_ptr,
    s_ptr,
    x_stride,
    r_stride,
    K,
    eps,
    fp8_max,
    min_scale,
    HAS_RES: tl.constexpr,
    DO_NORM: tl.constexpr,
    WRITE_Y: tl.constexpr,
    SCHEME: tl.constexpr,
    GROUP: tl.constexpr,
    UE8M0: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
    WEIGHT_AFTER_ROUNDING: tl.constexpr = False,
    UNROUNDED_SUM: tl.constexpr = False,
    WEIGHTLESS: tl.constexpr = False,
    PIECE0: tl.constexpr = 0,
    PIECE1: tl.constexpr = 0,
    PIECE2: tl.constexpr = 0,
    PREFETCH_W: tl.constexpr = False,
    INV_BY_FMA: tl.constexpr = False,
):
    """One row per program: [x + r →] rms_norm → [quant]; the flags select other libraries'
    rounding points (fusion_ops.reference.norm): the weight applied after rounding the normed
    value to the weight's dtype, the norm of the unrounded fp32 sum; WEIGHTLESS: no weight
    (``weightless_rms_norm``; w_ptr is not read). PIECE0..2 (speed only, same bytes): the row
    after its sum of squares as up to three unpadded power-of-two pieces (_norm_quant_pieces).
    PREFETCH_W: the one-block path loads the weight before the PDL wait (see
    _pdl_start_with_weight); pieces are for many rows, where that wait hides nothing.
    INV_BY_FMA: the 1/rms steps by FMA corrections (_inv_rms; same bytes)."""
    row = tl.program_id(0).to(tl.int64)
    if PIECE0 == 0:
        w = _pdl_start_with_weight(w_ptr, K, BLOCK_K, USE_PDL, PREFETCH_W, PREFETCH_W)
        _norm_quant_row(
            row, x_ptr, r_ptr, w_ptr, y_ptr, res_ptr, q_ptr, s_ptr, x_stride, r_stride, K,
            eps, fp8_max, min_scale, HAS_RES, DO_NORM, WRITE_Y, SCHEME, GROUP, UE8M0, BLOCK_K,
            WEIGHT_AFTER_ROUNDING, UNROUNDED_SUM, WEIGHTLESS, w, PREFETCH_W, INV_BY_FMA,
        )  # fmt: skip
    else:
        if USE_PDL:  # see _pdl_start
            _pdl_start()
        _norm_quant_pieces(
            row, x_ptr, r_ptr, w_ptr, y_ptr, res_ptr, q_ptr, s_ptr, x_stride, r_stride, K,
            eps, fp8_max, min_scale, HAS_RES, DO_NORM, WRITE_Y, SCHEME, GROUP, UE8M0, BLOCK_K,
            WEIGHT_AFTER_ROUNDING, UNROUNDED_SUM, WEIGHTLESS, PIECE0, PIECE1, PIECE2, INV_BY_FMA,
        )  # fmt: skip


@triton.jit
def _pdl_start_with_weight(
    w_ptr, K, BLOCK: tl.constexpr, USE_PDL: tl.constexpr, LOAD_W: tl.constexpr,
    PREFETCH_W: tl.constexpr,
):  # fmt: skip
    """_pdl_start when USE_PDL; returns the weight row [BLOCK] (zeros past K) when LOAD_W, else a
    placeholder 0 (the row helpers load the weight themselves). PREFETCH_W: the weight is loaded
    before the PDL wait, so its load overlaps the previous kernel's tail, as in vLLM's DSV4
    kernels; this assumes the previous kernel does not write the weight (FUSION_OPS_PDL=0, or
    FUSION_OPS_PDL_PREFETCH_WEIGHT=0, when it may)."""
    cols = tl.arange(0, BLOCK)
    w = 0
    if LOAD_W and PREFETCH_W:
        w = tl.load(w_ptr + cols, mask=cols < K, other=0.0)
    if USE_PDL:
        _pdl_start()
    if LOAD_W and not PREFETCH_W:
        w = tl.load(w_ptr + cols, mask=cols < K, other=0.0)
    return w


@triton.jit
def _norm_quant_row(
    row,
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    res_ptr,
    q_ptr,
    s_ptr,
    x_stride,
    r_stride,
    K,
    eps,
    fp8_max,
    min_scale,
    HAS_RES: tl.constexpr,
    DO_NORM: tl.constexpr,
    WRITE_Y: tl.constexpr,
    SCHEME: tl.constexpr,
    GROUP: tl.constexpr,
    UE8M0: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WEIGHT_AFTER_ROUNDING: tl.constexpr,
    UNROUNDED_SUM: tl.constexpr,
    WEIGHTLESS: tl.constexpr = False,
    w=0,
    W_LOADED: tl.constexpr = False,
    INV_BY_FMA: tl.constexpr = False,
):
    """norm_quant_kernel's work on one row (also the tail of all_reduce_norm_quant_kernel);
    W_LOADED: ``w`` is the weight row, already loaded; INV_BY_FMA: see _inv_rms."""
    cols = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + row * x_stride + cols, mask=cols < K, other=0.0)
    inv = _row_inv_rms(
        x_ptr, r_ptr, row, x_stride, r_stride, K, eps, HAS_RES, DO_NORM, UNROUNDED_SUM, BLOCK_K,
        INV_BY_FMA,
    )  # fmt: skip
    _norm_quant_part(
        x, 0, inv, row, r_ptr, w_ptr, y_ptr, res_ptr, q_ptr, s_ptr, r_stride, K, fp8_max,
        min_scale, HAS_RES, DO_NORM, WRITE_Y, SCHEME, GROUP, UE8M0, BLOCK_K,
        WEIGHT_AFTER_ROUNDING, UNROUNDED_SUM, WEIGHTLESS, w, W_LOADED,
    )  # fmt: skip


@triton.jit
def _norm_quant_pieces(
    row, x_ptr, r_ptr, w_ptr, y_ptr, res_ptr, q_ptr, s_ptr, x_stride, r_stride, K, eps, fp8_max,
    min_scale, HAS_RES: tl.constexpr, DO_NORM: tl.constexpr, WRITE_Y: tl.constexpr,
    SCHEME: tl.constexpr, GROUP: tl.constexpr, UE8M0: tl.constexpr, BLOCK_K: tl.constexpr,
    WEIGHT_AFTER_ROUNDING: tl.constexpr, UNROUNDED_SUM: tl.constexpr, WEIGHTLESS: tl.constexpr,
    PIECE0: tl.constexpr, PIECE1: tl.constexpr, PIECE2: tl.constexpr,
    INV_BY_FMA: tl.constexpr = False,
):  # fmt: skip
    """_norm_quant_row's bytes, with the row after its sum of squares handled as up to three
    power-of-two pieces at columns 0, PIECE0 and PIECE0 + PIECE1 (PIECEi = 0: none) instead of
    one block padded to a power of two (7168 = 4096 + 2048 + 1024: no masked lanes). Each
    piece is loaded before the sum of squares, so its load is in flight during the reduction.
    The sum of squares is the padded block's, as in every other row kernel; every other step
    is per column or per quant block, and pieces hold whole blocks (_norm_quant_part)."""
    x0 = _load_piece(x_ptr, row, x_stride, K, 0, PIECE0)
    if PIECE1 > 0:
        x1 = _load_piece(x_ptr, row, x_stride, K, PIECE0, PIECE1)
    if PIECE2 > 0:
        x2 = _load_piece(x_ptr, row, x_stride, K, PIECE0 + PIECE1, PIECE2)
    inv = _row_inv_rms(
        x_ptr, r_ptr, row, x_stride, r_stride, K, eps, HAS_RES, DO_NORM, UNROUNDED_SUM, BLOCK_K,
        INV_BY_FMA,
    )  # fmt: skip
    _norm_quant_part(
        x0, 0, inv, row, r_ptr, w_ptr, y_ptr, res_ptr, q_ptr, s_ptr, r_stride, K, fp8_max,
        min_scale, HAS_RES, DO_NORM, WRITE_Y, SCHEME, GROUP, UE8M0, PIECE0,
        WEIGHT_AFTER_ROUNDING, UNROUNDED_SUM, WEIGHTLESS,
    )  # fmt: skip
    if PIECE1 > 0:
        _norm_quant_part(
            x1, PIECE0, inv, row, r_ptr, w_ptr, y_ptr, res_ptr, q_ptr, s_ptr, r_stride, K,
            fp8_max, min_scale, HAS_RES, DO_NORM, WRITE_Y, SCHEME, GROUP, UE8M0, PIECE1,
            WEIGHT_AFTER_ROUNDING, UNROUNDED_SUM, WEIGHTLESS,
        )  # fmt: skip
    if PIECE2 > 0:
        _norm_quant_part(
            x2, PIECE0 + PIECE1, inv, row, r_ptr, w_ptr, y_ptr, res_ptr, q_ptr, s_ptr, r_stride,
            K, fp8_max, min_scale, HAS_RES, DO_NORM, WRITE_Y, SCHEME, GROUP, UE8M0, PIECE2,
            WEIGHT_AFTER_ROUNDING, UNROUNDED_SUM, WEIGHTLESS,
        )  # fmt: skip


@triton.jit
def _row_inv_rms(
    x_ptr, r_ptr, row, x_stride, r_stride, K, eps, HAS_RES: tl.constexpr, DO_NORM: tl.constexpr,
    UNROUNDED_SUM: tl.constexpr, BLOCK_K: tl.constexpr, INV_BY_FMA: tl.constexpr,
):  # fmt: skip
    """The row's 1/rms from its dedicated sum-of-squares load (_sum_of_squares); 0.0 without a
    norm. INV_BY_FMA: see _inv_rms."""
    inv = 0.0
    if DO_NORM:
        ss = _sum_of_squares(
            x_ptr, r_ptr, row, x_stride, r_stride, K, HAS_RES, UNROUNDED_SUM, BLOCK_K
        )
        inv = _inv_rms(ss, K, tl.cast(eps, tl.float32), INV_BY_FMA)
    return inv


@triton.jit
def _load_piece(x_ptr, row, x_stride, K, col0: tl.constexpr, P: tl.constexpr):
    cols = col0 + tl.arange(0, P)
    return tl.load(x_ptr + row * x_stride + cols, mask=cols < K, other=0.0)


@triton.jit
def _norm_quant_part(
    x,
    col0,
    inv,
    row,
    r_ptr,
    w_ptr,
    y_ptr,
    res_ptr,
    q_ptr,
    s_ptr,
    r_stride,
    K,
    fp8_max,
    min_scale,
    HAS_RES: tl.constexpr,
    DO_NORM: tl.constexpr,
    WRITE_Y: tl.constexpr,
    SCHEME: tl.constexpr,
    GROUP: tl.constexpr,
    UE8M0: tl.constexpr,
    BLOCK: tl.constexpr,
    WEIGHT_AFTER_ROUNDING: tl.constexpr,
    UNROUNDED_SUM: tl.constexpr,
    WEIGHTLESS: tl.constexpr = False,
    w=0,
    W_LOADED: tl.constexpr = False,
):
    """The row work on columns [col0, col0 + BLOCK) of the row (x: those columns, loaded; inv:
    the whole row's 1/rms; w: those columns of the weight when W_LOADED): residual add, norm,
    stores, quant. Every output element depends on its column and inv alone, and quant
    blocks/groups lie inside a part (col0 a multiple of BLOCK, BLOCK of the group size), so
    parts of a row give the bytes of the whole row."""
    cols = col0 + tl.arange(0, BLOCK)
    mask = cols < K
    # fp32 whatever the launcher typed the floats as (Triton's JIT: fp32; Inductor: fp64)
    fp8_max = tl.cast(fp8_max, tl.float32)
    min_scale = tl.cast(min_scale, tl.float32)
    out_dtype = x.dtype
    xf = x.to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0)
        total = xf + r.to(tl.float32)
        x = total.to(out_dtype)  # residual_out, rounded
        tl.store(res_ptr + row * K + cols, x, mask=mask)
        xf = total if UNROUNDED_SUM else x.to(tl.float32)
    if DO_NORM and WEIGHTLESS:
        y = (xf * inv).to(out_dtype)
    elif DO_NORM:
        if not W_LOADED:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        if WEIGHT_AFTER_ROUNDING:  # (n.to(w.dtype) * w).to(x.dtype)
            n = (xf * inv).to(w.dtype).to(tl.float32)
            y = (n * w.to(tl.float32)).to(w.dtype).to(out_dtype)
        else:
            y = ((xf * inv) * w.to(tl.float32)).to(out_dtype)  # rounded once to x.dtype
    else:
        y = x
    if WRITE_Y:
        tl.store(y_ptr + row * K + cols, y, mask=mask)
    if SCHEME == 1:
        _mxfp4(y.to(tl.float32), q_ptr, s_ptr, row, K, BLOCK, col0, not HAS_RES)
    elif SCHEME == 2:
        _mxfp8(y.to(tl.float32), q_ptr, s_ptr, row, K, BLOCK, col0)
    elif SCHEME == 3:
        _fp8_groups(
            y.to(tl.float32), q_ptr, s_ptr, row, K, fp8_max, min_scale, GROUP, UE8M0, BLOCK,
            col0,
        )  # fmt: skip


# --- two norms of the same rows in one launch (q_kv_norm) ----------------------------------------
@triton.jit
def q_kv_norm_quant_kernel(
    q_ptr,
    qw_ptr,
    y_ptr,
    codes_ptr,
    scales_ptr,
    kv_ptr,
    kvw_ptr,
    kv_out_ptr,
    M,
    q_stride,
    kv_stride,
    K_Q,
    K_KV,
    q_eps,
    kv_eps,
    fp8_max,
    min_scale,
    WRITE_Y: tl.constexpr,
    SCHEME: tl.constexpr,
    GROUP: tl.constexpr,
    UE8M0: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    USE_PDL: tl.constexpr,
    WEIGHT_AFTER_ROUNDING: tl.constexpr = False,
    ROWS: tl.constexpr = 1,
    PREFETCH_W: tl.constexpr = False,
    PIECE0: tl.constexpr = 0,
    PIECE1: tl.constexpr = 0,
    PIECE2: tl.constexpr = 0,
    INV_BY_FMA: tl.constexpr = False,
):
    """Programs (i, 0): rms_norm of q's rows i·ROWS … i·ROWS + ROWS - 1 [→ quant]; programs
    (i, 1): rms_norm of the same kv rows. Each row is norm_quant_kernel's row work (same helper,
    same flags), so with the standalone kernels' warp count both halves round exactly as two
    standalone launches would. ROWS > 1 (many short rows) loads the weight once for them;
    PREFETCH_W: see _pdl_start_with_weight; PIECE0..2: q's rows as norm_quant_kernel's pieces
    (one row per program); INV_BY_FMA: see _inv_rms (both eps allow it)."""
    LOAD_W: tl.constexpr = PREFETCH_W or ROWS > 1
    first = tl.program_id(0).to(tl.int64) * ROWS
    if tl.program_id(1) == 0 and PIECE0 > 0:
        if USE_PDL:  # see _pdl_start
            _pdl_start()
        _norm_quant_pieces(
            first, q_ptr, q_ptr, qw_ptr, y_ptr, y_ptr, codes_ptr, scales_ptr, q_stride, q_stride,
            K_Q, q_eps, fp8_max, min_scale, False, True, WRITE_Y, SCHEME, GROUP, UE8M0, BLOCK_Q,
            WEIGHT_AFTER_ROUNDING, False, False, PIECE0, PIECE1, PIECE2, INV_BY_FMA,
        )  # fmt: skip
    elif tl.program_id(1) == 0:
        qw = _pdl_start_with_weight(qw_ptr, K_Q, BLOCK_Q, USE_PDL, LOAD_W, PREFETCH_W)
        for i in tl.static_range(ROWS):
            if first + i < M:
                _norm_quant_row(
                    first + i, q_ptr, q_ptr, qw_ptr, y_ptr, y_ptr, codes_ptr, scales_ptr,
                    q_stride, q_stride, K_Q, q_eps, fp8_max, min_scale, False, True, WRITE_Y,
                    SCHEME, GROUP, UE8M0, BLOCK_Q, WEIGHT_AFTER_ROUNDING, False, False, qw,
                    LOAD_W, INV_BY_FMA,
                )  # fmt: skip
    else:
        kvw = _pdl_start_with_weight(kvw_ptr, K_KV, BLOCK_KV, USE_PDL, LOAD_W, PREFETCH_W)
        for i in tl.static_range(ROWS):
            if first + i < M:
                _norm_quant_row(
                    first + i, kv_ptr, kv_ptr, kvw_ptr, kv_out_ptr, kv_out_ptr, kv_out_ptr,
                    kv_out_ptr, kv_stride, kv_stride, K_KV, kv_eps, fp8_max, min_scale, False,
                    True, True, 0, 1, False, BLOCK_KV, False, False, False, kvw,
                    LOAD_W, INV_BY_FMA,  # SCHEME 0: none
                )  # fmt: skip


# --- tensor parallel: one-shot all-reduce over symmetric memory + the row work ----------------
@triton.jit
def all_reduce_norm_quant_kernel(
    x_ptr,
    buf_ptrs,
    state_ptr,
    red_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    res_ptr,
    q_ptr,
    s_ptr,
    x_stride,
    r_stride,
    M,
    K,
    eps,
    fp8_max,
    min_scale,
    rank,
    slot_elems,
    WORLD: tl.constexpr,
    BITS: tl.constexpr,
    HAS_RES: tl.constexpr,
    DO_NORM: tl.constexpr,
    WRITE_Y: tl.constexpr,
    SCHEME: tl.constexpr,
    GROUP: tl.constexpr,
    UE8M0: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WEIGHT_AFTER_ROUNDING: tl.constexpr,
    UNROUNDED_SUM: tl.constexpr,
    ALIGNED: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    SPLIT: tl.constexpr = 1,
    INV_BY_FMA: tl.constexpr = False,
):
    """Σ over the ranks of x, then norm_quant_kernel's row work, in one launch (INV_BY_FMA: see
    _inv_rms).

    Every rank's symmetric buffer holds ``[3 sets][WORLD sources][slot_elems]`` elements (rows
    of K), every element not yet written holding the *empty* pattern (all bits set: a NaN);
    ``buf_ptrs`` are the int64 addresses of every rank's buffer (peer memory mapped here),
    ``state_ptr`` this rank's int32 [call counter, finished programs, bytes used per slot of
    each set × 3].
    The same grid on every rank. ``SPLIT == 1``: program p owns rows p, p + G, ….
    ``SPLIT > 1`` (decode sizes; grid M · SPLIT): program p owns part p % SPLIT (BLOCK_K / SPLIT
    columns) of row p // SPLIT: it sends that part, waits for the whole row, takes the row's
    sum of squares itself (the same tensor shape and warps as the one-program row: the same
    order) and does the row work on its part (see _norm_quant_part): the same bytes, the
    per-element work spread over SPLIT programs.

    Call c uses set c % 3. A program stores its rows (parts) of x into source slot ``rank`` of
    that set on every rank (plain stores into peer memory; an x element that happens to be the
    empty pattern is stored as another NaN: NaN payloads are not part of the contract), then
    reads its rows of every source slot here until no element is empty (the data is its own
    flag: no barrier, no round trip), sums them in rank order in fp32, rounds once to x's
    dtype and runs the row work on the sum. It then empties the bytes the previous call
    used in set (c + 2) % 3 (whatever its K and dtype were), which this rank finished reading
    then, and which a peer writes next in call c + 2: after its call c + 1, which needed this
    rank's call c + 1 data, stored after this call ended.
    """
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    dtype = x_ptr.dtype.element_ty
    if USE_PDL:  # see _pdl_start: the previous call has finished before anything is touched
        _pdl_start()
    call = tl.load(state_ptr)
    cur = call % 3
    own = tl.load(buf_ptrs + rank).to(tl.pointer_type(dtype))
    if SPLIT > 1:
        PART: tl.constexpr = BLOCK_K // SPLIT
        row = pid // SPLIT
        col0 = (pid % SPLIT) * PART
        pcols = col0 + tl.arange(0, PART)
        pmask = pcols < K
        _send_row(x_ptr, buf_ptrs, row, x_stride, pcols, pmask, cur, rank, slot_elems, K,
                  WORLD, BITS, ALIGNED)  # fmt: skip
        total = _await_sum(own, cur, slot_elems, row, K, cols, mask, WORLD, ALIGNED, BITS)
        ss = _sum_of_squares_of(
            total.to(dtype), r_ptr, row.to(tl.int64), r_stride, K, HAS_RES, UNROUNDED_SUM,
            BLOCK_K,
        )  # fmt: skip
        # the part's columns again (arrived: the whole row has), summed the same way
        part = _await_sum(own, cur, slot_elems, row, K, pcols, pmask, WORLD, ALIGNED, BITS)
        _norm_quant_part(
            part.to(dtype), col0, _inv_rms(ss, K, tl.cast(eps, tl.float32), INV_BY_FMA),
            row.to(tl.int64),
            r_ptr, w_ptr, y_ptr, res_ptr, q_ptr, s_ptr, r_stride, K, fp8_max, min_scale,
            HAS_RES, DO_NORM, WRITE_Y, SCHEME, GROUP, UE8M0, PART, WEIGHT_AFTER_ROUNDING,
            UNROUNDED_SUM,
        )  # fmt: skip
    else:
        for row in range(pid, M, n_programs):
            _send_row(x_ptr, buf_ptrs, row, x_stride, cols, mask, cur, rank, slot_elems, K,
                      WORLD, BITS, ALIGNED)  # fmt: skip
        for row in range(pid, M, n_programs):
            total = _await_sum(own, cur, slot_elems, row, K, cols, mask, WORLD, ALIGNED, BITS)
            tl.store(red_ptr + row.to(tl.int64) * K + cols, total.to(dtype), mask=mask)
            tl.debug_barrier()  # the row is read back by other threads of this program
            _norm_quant_row(
                row.to(tl.int64), red_ptr, r_ptr, w_ptr, y_ptr, res_ptr, q_ptr, s_ptr, K,
                r_stride, K, eps, fp8_max, min_scale, HAS_RES, DO_NORM, WRITE_Y, SCHEME, GROUP,
                UE8M0, BLOCK_K, WEIGHT_AFTER_ROUNDING, UNROUNDED_SUM, INV_BY_FMA=INV_BY_FMA,
            )  # fmt: skip
    # empty what the previous call used in set (c + 2) % 3: its bytes, whatever its K and dtype
    # were, as int32 words of all bits set
    old = (call + 2) % 3
    words = tl.load(buf_ptrs + rank).to(tl.pointer_type(tl.int32))
    slot_words = slot_elems * (BITS // 8) // 4
    used_words = (tl.load(state_ptr + 2 + old) + 3) // 4
    for off in range(pid * BLOCK_K, used_words, n_programs * BLOCK_K):
        for src in tl.static_range(WORLD):
            ptrs = words + (old * WORLD + src).to(tl.int64) * slot_words + off + cols
            tl.store(ptrs, tl.full([BLOCK_K], -1, tl.int32), mask=off + cols < used_words)
    if pid == 0:
        tl.store(state_ptr + 2 + cur, M * K * (BITS // 8))  # bytes this call uses per slot
    # the last program to finish advances the call counter (every program has read it)
    tl.debug_barrier()
    finished = tl.atomic_add(state_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if finished == n_programs - 1:
        tl.store(state_ptr + 1, 0)
        tl.store(state_ptr, call + 1)


@triton.jit
def _bits(v, BITS: tl.constexpr):
    """v's bits as a signed int of its width (16 or 32)."""
    if BITS == 16:
        out = v.to(tl.int16, bitcast=True)
    else:
        out = v.to(tl.int32, bitcast=True)
    return out


@triton.jit
def _await_row(
    base, slot, slot_elems, row, K, cols, mask, ALIGNED: tl.constexpr, BITS: tl.constexpr
):
    """Row ``row`` of slot ``slot`` once every element has been written (none empty); volatile
    loads: never served from a stale cache line."""
    ptrs = _slot_row(base, slot, slot_elems, row, K, cols, ALIGNED)
    v = tl.load(ptrs, mask=mask, other=0.0, volatile=True)
    while tl.max((_bits(v, BITS) == -1).to(tl.int32), axis=0) > 0:
        v = tl.load(ptrs, mask=mask, other=0.0, volatile=True)
    return v


@triton.jit
def _send_row(
    x_ptr, buf_ptrs, row, x_stride, cols, mask, cur, rank, slot_elems, K, WORLD: tl.constexpr,
    BITS: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Columns ``cols`` of x's row into source slot ``rank`` of set ``cur`` on every rank (an
    element equal to the empty pattern goes as another NaN)."""
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row.to(tl.int64) * x_stride + cols, mask=mask)
    bits = _bits(x, BITS)
    x = tl.where(bits == -1, bits & (2 ** (BITS - 1) - 1), bits).to(dtype, bitcast=True)
    for dst in tl.static_range(WORLD):
        base = tl.load(buf_ptrs + dst).to(tl.pointer_type(dtype))
        ptrs = _slot_row(base, cur * WORLD + rank, slot_elems, row, K, cols, ALIGNED)
        tl.store(ptrs, x, mask=mask)


@triton.jit
def _await_sum(
    own, cur, slot_elems, row, K, cols, mask, WORLD: tl.constexpr, ALIGNED: tl.constexpr,
    BITS: tl.constexpr,
):  # fmt: skip
    """Σ in rank order, fp32, of columns ``cols`` of the row in every source slot of set
    ``cur`` here, once they have all arrived."""
    total = _await_row(own, cur * WORLD, slot_elems, row, K, cols, mask, ALIGNED, BITS)
    total = total.to(tl.float32)
    for src in tl.static_range(1, WORLD):
        part = _await_row(own, cur * WORLD + src, slot_elems, row, K, cols, mask, ALIGNED, BITS)
        total = total + part.to(tl.float32)
    return total


@triton.jit
def _slot_row(base, slot, slot_elems, row, K, cols, ALIGNED: tl.constexpr):
    """Pointers to row ``row`` of slot ``slot`` of a symmetric buffer. The base address comes
    from memory, so Triton cannot see its alignment: ``ALIGNED`` (every row starts on 16 bytes)
    says it, for vector loads and stores."""
    ptrs = base + slot.to(tl.int64) * slot_elems + row.to(tl.int64) * K + cols
    if ALIGNED:
        ptrs = tl.multiple_of(ptrs, 16)
    return ptrs


@triton.jit
def _mxfp4(y, q_ptr, s_ptr, row, K, BLOCK_K: tl.constexpr, col0, INT_MAX: tl.constexpr):
    """MXFP4 codes and scales of y = row[col0 : col0 + BLOCK_K] (col0 a multiple of 32)."""
    NB: tl.constexpr = BLOCK_K // 32
    yb = tl.reshape(y, (NB, 32))
    if INT_MAX:
        # |y| as int bits: ordered like the floats, NaN patterns above inf's 0x7F800000, so one
        # integer max gives the block maximum and whether the block holds a NaN (measured: 7 %
        # faster for rms→MXFP4, 6–9 % slower for add+rms→MXFP4, hence a switch; same bytes)
        amax_bits = tl.max(yb.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
        has_nan = amax_bits > 0x7F800000
    else:
        has_nan = tl.max((yb != yb).to(tl.int32), axis=1) > 0
        amax_bits = tl.max(tl.abs(yb), axis=1).to(tl.int32, bitcast=True)
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
def _e2m1_code(mag):
    """E2M1 code (0..7) of |q| rounded to nearest, ties away from zero, saturating at 6.

    From the float's bits: for |q| >= 1 adding half an ulp of the 1-bit mantissa (0x200000) and
    truncating rounds ties away, so code = 2 + 2·exponent + mantissa bit (capped at 7; inf gives
    exponent 128); below 1 the two subnormal steps are two comparisons (a rounding add would
    round twice). Equal to the seven threshold comparisons of the contract for every fp32 (checked
    exhaustively on a stride of the fp32 range and densely around every threshold).
    """
    bits = mag.to(tl.int32, bitcast=True)
    rounded = bits + 0x200000
    big = 2 + 2 * (((rounded >> 23) & 0xFF) - 127) + ((rounded >> 22) & 1)
    small = (mag >= 0.25).to(tl.int32) + (mag >= 0.75).to(tl.int32)
    return tl.where(((bits >> 23) & 0xFF) >= 127, tl.minimum(big, 7), small)


@triton.jit
def _pdl_start():
    """Programmatic dependent launch (CUDA sm_90+, kernels launched with ``launch_pdl``): wait
    for the previous kernel to finish and flush, then let the next one launch. Nothing before it
    touches memory (a weight written by the previous kernel stays safe): only the launch and the
    index math overlap the previous kernel's tail."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _mxfp8(y, q_ptr, s_ptr, row, K, BLOCK_K: tl.constexpr, col0):
    """MXFP8 codes and scales of y = row[col0 : col0 + BLOCK_K] (col0 a multiple of 32)."""
    NB: tl.constexpr = BLOCK_K // 32
    yb = tl.reshape(y, (NB, 32))
    has_nan = tl.max((yb != yb).to(tl.int32), axis=1) > 0
    amax = tl.max(tl.abs(yb), axis=1)
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
):
    """FP8 codes and scales of groups of y = row[col0 : col0 + BLOCK_K] (col0 a multiple of
    GROUP; per-token: GROUP = BLOCK_K, col0 = 0)."""
    NG: tl.constexpr = BLOCK_K // GROUP
    yg = tl.reshape(y, (NG, GROUP))
    has_nan = tl.max((yg != yg).to(tl.int32), axis=1) > 0
    amax = tl.max(tl.abs(yg), axis=1)
    s = _fp8_scale(amax, has_nan, fp8_max, min_scale, UE8M0)
    q = _fp8_values(yg, s[:, None], fp8_max)
    grp = col0 // GROUP + tl.arange(0, NG)
    idx = grp[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    n_groups = tl.maximum(K // GROUP, 1)  # per-token: one group (GROUP = the padded row)
    tl.store(q_ptr + row * K + idx, q.to(q_ptr.dtype.element_ty), mask=idx < K)
    tl.store(s_ptr + row * n_groups + grp, s, mask=grp < n_groups)


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


# --- RoPE (compile with enable_fp_fusion=False) -------------------------------------------------
@triton.jit
def _rope_row(
    src,
    dst,
    cs_ptr,
    pos,
    D: tl.constexpr,
    ROPE: tl.constexpr,
    IS_NEOX: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MUL_RN: tl.constexpr = False,
    HIP: tl.constexpr = False,
):
    """dst[0:D] = src[0:D] with the last ROPE dims rotated at position ``pos``. ``MUL_RN``: each
    product rounded on its own (:func:`_mul_rn`), for a kernel compiled with FP fusion on."""
    HALF: tl.constexpr = ROPE // 2
    cols = tl.arange(0, BLOCK_D)
    head = cols < D - ROPE
    tl.store(dst + cols, tl.load(src + cols, mask=head), mask=head)
    i = tl.arange(0, HALF)
    cos = tl.load(cs_ptr + pos * ROPE + i)
    sin = tl.load(cs_ptr + pos * ROPE + HALF + i)
    if IS_NEOX:
        ia, ib = D - ROPE + i, D - ROPE + HALF + i
    else:
        ia, ib = D - ROPE + 2 * i, D - ROPE + 2 * i + 1
    a = tl.load(src + ia).to(tl.float32)
    b = tl.load(src + ib).to(tl.float32)
    out_ty = dst.dtype.element_ty
    if MUL_RN:
        a_cos, b_sin = _mul_rn(a, cos, HIP), _mul_rn(b, sin, HIP)
        b_cos, a_sin = _mul_rn(b, cos, HIP), _mul_rn(a, sin, HIP)
        tl.store(dst + ia, (a_cos - b_sin).to(out_ty))
        tl.store(dst + ib, (b_cos + a_sin).to(out_ty))
    else:
        tl.store(dst + ia, (a * cos - b * sin).to(out_ty))
        tl.store(dst + ib, (b * cos + a * sin).to(out_ty))


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


@triton.jit
def rope_kernel(
    pos_ptr,
    x_ptr,
    out_ptr,
    cs_ptr,
    x_stride_t,
    x_stride_h,
    HEADS,
    D: tl.constexpr,
    ROPE: tl.constexpr,
    IS_NEOX: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    _rope_row(
        x_ptr + t * x_stride_t + h * x_stride_h,
        out_ptr + (t * HEADS + h) * D,
        cs_ptr,
        pos,
        D,
        ROPE,
        IS_NEOX,
        BLOCK_D,
    )


# --- DeepSeek-V4 cache slot ----------------------------------------------------------------------
@triton.jit
def _write_dsv4_slot(cache_ptr, row_ptr, slot, block_stride, BS: tl.constexpr, num_slots):
    """Encode the bf16 row (512 values at row_ptr) into ``slot`` of the dsv4_fp8 cache (a slot
    outside [0, num_slots) is skipped: negative ones by contract, too large ones for safety)."""
    if (slot >= 0) & (slot < num_slots):
        block = slot // BS
        off = slot % BS
        base = cache_ptr + block * block_stride
        tile = tl.arange(0, 8)
        j = tl.arange(0, 64)
        valid = (tile < 7)[:, None] & (j >= 0)[None, :]
        x = tl.load(row_ptr + tile[:, None] * 64 + j[None, :], mask=valid, other=0.0)
        x = x.to(tl.float32)
        nonfinite = tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1) > 0
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
        e = _ceil_log2_ratio_448(tl.where(nonfinite, 1.0, amax))
        codes = _clamp_keep_nan(x * _pow2(-e)[:, None], -448.0, 448.0).to(tl.float8e4nv)
        codes = codes.to(tl.uint8, bitcast=True)
        codes = tl.where(nonfinite[:, None], 0x7F, codes.to(tl.int32)).to(tl.uint8)
        tl.store(base + off * 576 + tile[:, None] * 64 + j[None, :], codes, mask=valid)
        rope = tl.load(row_ptr + 448 + j)
        tl.store((base + off * 576 + 448).to(tl.pointer_type(tl.bfloat16)) + j, rope)
        byte = tl.where(nonfinite, 255, tl.minimum(tl.maximum(e + 127, 0), 255))
        byte = tl.where(tile < 7, byte, 0)
        tl.store(base + BS * 576 + off * 8 + tile, byte.to(tl.uint8))


@triton.jit
def _write_slot(
    cache_ptr,
    row_ptr,
    slot,
    block_stride,
    num_slots,
    BS: tl.constexpr,
    D: tl.constexpr,
    DSV4: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Write the row at row_ptr into ``slot`` (skipped outside [0, num_slots)): the dsv4_fp8
    encoding, or a plain copy for the bf16 layout. Shared by the standalone and fused kernels."""
    if DSV4:
        _write_dsv4_slot(cache_ptr, row_ptr, slot, block_stride, BS, num_slots)
    elif (slot >= 0) & (slot < num_slots):
        cols = tl.arange(0, BLOCK_D)
        v = tl.load(row_ptr + cols, mask=cols < D)
        dst = cache_ptr + (slot // BS) * block_stride + (slot % BS) * D
        tl.store(dst + cols, v, mask=cols < D)


@triton.jit
def cache_write_kernel(
    kv_ptr,
    kv_stride,
    cache_ptr,
    slot_ptr,
    block_stride,
    num_slots,
    BS: tl.constexpr,
    D: tl.constexpr,
    DSV4: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    _write_slot(
        cache_ptr, kv_ptr + t * kv_stride, slot, block_stride, num_slots, BS, D, DSV4, BLOCK_D
    )


@triton.jit
def rope_cache_kernel(
    pos_ptr,
    q_ptr,
    kv_ptr,
    q_out_ptr,
    kv_out_ptr,
    cs_ptr,
    cache_ptr,
    slot_ptr,
    q_stride_t,
    q_stride_h,
    kv_stride,
    block_stride,
    num_slots,
    HEADS,
    BS: tl.constexpr,
    D: tl.constexpr,
    ROPE: tl.constexpr,
    IS_NEOX: tl.constexpr,
    DSV4: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Programs (t, h < HEADS): rope q head h. Program (t, HEADS): rope kv, then write it."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    if h < HEADS:
        _rope_row(
            q_ptr + t * q_stride_t + h * q_stride_h,
            q_out_ptr + (t * HEADS + h) * D,
            cs_ptr,
            pos,
            D,
            ROPE,
            IS_NEOX,
            BLOCK_D,
        )
    else:
        _rope_write_kv(
            t, pos, kv_ptr, kv_stride, kv_out_ptr, cs_ptr, cache_ptr, slot_ptr, block_stride,
            num_slots, BS, D, ROPE, IS_NEOX, DSV4, BLOCK_D,
        )  # fmt: skip


@triton.jit
def _rope_write_kv(
    t, pos, kv_ptr, kv_stride, kv_out_ptr, cs_ptr, cache_ptr, slot_ptr, block_stride, num_slots,
    BS: tl.constexpr, D: tl.constexpr, ROPE: tl.constexpr, IS_NEOX: tl.constexpr,
    DSV4: tl.constexpr, BLOCK_D: tl.constexpr, MUL_RN: tl.constexpr = False,
    HIP: tl.constexpr = False,
):  # fmt: skip
    """The kv program of the rope + write kernels: rope kv's row ``t`` into kv_out, then write
    it to its slot (``MUL_RN``: see _rope_row)."""
    row = kv_out_ptr + t * D
    _rope_row(kv_ptr + t * kv_stride, row, cs_ptr, pos, D, ROPE, IS_NEOX, BLOCK_D, MUL_RN, HIP)
    tl.debug_barrier()  # the rotated row is re-read by other threads of this program
    slot = tl.load(slot_ptr + t).to(tl.int64)
    _write_slot(cache_ptr, row, slot, block_stride, num_slots, BS, D, DSV4, BLOCK_D)


@triton.jit
def norm_rope_cache_kernel(
    pos_ptr,
    x_ptr,
    w_ptr,
    kv_out_ptr,
    cs_ptr,
    cache_ptr,
    slot_ptr,
    x_stride,
    eps,
    block_stride,
    num_slots,
    BS: tl.constexpr,
    D: tl.constexpr,
    ROPE: tl.constexpr,
    IS_NEOX: tl.constexpr,
    DSV4: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HIP: tl.constexpr,
    USE_PDL: tl.constexpr,
    INV_BY_FMA: tl.constexpr = False,
):
    """One token per program: rms_norm (norm_quant_kernel's row work, stored to the output row
    in its dtype: the cast), rope in place, then the cache write of the row. Compiled with FP
    fusion on like the norm kernel (same sum of squares); the rope's products are rounded one
    by one (_mul_rn) like the rope kernel's, compiled without it."""
    t = tl.program_id(0).to(tl.int64)
    if USE_PDL:  # see _pdl_start
        _pdl_start()
    _norm_quant_row(
        t, x_ptr, x_ptr, w_ptr, kv_out_ptr, kv_out_ptr, kv_out_ptr, kv_out_ptr, x_stride,
        x_stride, D, eps, 0.0, 0.0, False, True, True, 0, 1, False, BLOCK_D, False,
        False, INV_BY_FMA=INV_BY_FMA,
    )  # fmt: skip
    tl.debug_barrier()  # the normed row is re-read by other threads of this program
    row = kv_out_ptr + t * D
    pos = tl.load(pos_ptr + t).to(tl.int64)
    _rope_row(row, row, cs_ptr, pos, D, ROPE, IS_NEOX, BLOCK_D, True, HIP)
    tl.debug_barrier()
    slot = tl.load(slot_ptr + t).to(tl.int64)
    _write_slot(cache_ptr, row, slot, block_stride, num_slots, BS, D, DSV4, BLOCK_D)


@triton.jit
def qnorm_rope_cache_kernel(
    pos_ptr,
    q_ptr,
    kv_ptr,
    q_out_ptr,
    kv_out_ptr,
    cs_ptr,
    cache_ptr,
    slot_ptr,
    q_stride_t,
    q_stride_h,
    kv_stride,
    q_eps,
    block_stride,
    num_slots,
    HEADS,
    BS: tl.constexpr,
    D: tl.constexpr,
    ROPE: tl.constexpr,
    IS_NEOX: tl.constexpr,
    DSV4: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HIP: tl.constexpr,
    USE_PDL: tl.constexpr,
    INV_BY_FMA: tl.constexpr = False,
):
    """Programs (t, h < HEADS): weightless rms_norm of q head h (norm_quant_kernel's row work,
    stored to the output row), then its rope in place. Program (t, HEADS): rope kv, then write
    it. Compiled with FP fusion on like the norm kernel (same sum of squares); the ropes'
    products are rounded one by one (_mul_rn) like the rope kernel's, compiled without it."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    if USE_PDL:  # see _pdl_start
        _pdl_start()
    pos = tl.load(pos_ptr + t).to(tl.int64)
    if h < HEADS:
        src = q_ptr + t * q_stride_t + h * q_stride_h
        row = q_out_ptr + (t * HEADS + h) * D
        _norm_quant_row(
            0, src, src, src, row, row, row, row, 0, 0, D, q_eps, 0.0, 0.0, False, True,
            True, 0, 1, False, BLOCK_D, False, False, True,  # SCHEME 0, WEIGHTLESS
            INV_BY_FMA=INV_BY_FMA,
        )  # fmt: skip
        tl.debug_barrier()  # the normed row is re-read by other threads of this program
        _rope_row(row, row, cs_ptr, pos, D, ROPE, IS_NEOX, BLOCK_D, True, HIP)
    else:
        _rope_write_kv(
            t, pos, kv_ptr, kv_stride, kv_out_ptr, cs_ptr, cache_ptr, slot_ptr, block_stride,
            num_slots, BS, D, ROPE, IS_NEOX, DSV4, BLOCK_D, True, HIP,
        )  # fmt: skip


@triton.jit
def _cast_fp8_like_compiled(v, fp8_max, out_ty: tl.constexpr):
    """``v.to(fp8)`` as compiled torch code computes it (reference/cache.py
    cast_fp8_like_compiled): e4m3fn saturates at ±fp8_max (NaN kept); e4m3fnuz (gfx942) is a
    plain cast, in the output pointer's own FP8 type."""
    if out_ty == tl.float8e4nv:
        return _clamp_keep_nan(v.to(tl.float32), -fp8_max, fp8_max).to(out_ty)
    return v.to(tl.float32).to(out_ty)


@triton.jit
def _requested_block(ids_ptr, i, num_blocks):
    """Block id i of the request and whether it lies in the cache; an out-of-range id reads
    block 0 under a false mask, so the kernel never reads outside the cache (its rows are 0)."""
    block = tl.load(ids_ptr + i).to(tl.int64)
    ok = (block >= 0) & (block < num_blocks)
    return tl.where(ok, block, 0), ok


@triton.jit
def dequant_dsv4_kernel(
    cache_ptr,
    ids_ptr,
    out_ptr,
    block_stride,
    num_blocks,
    fp8_max,
    BS: tl.constexpr,
    TOK: tl.constexpr,
    TO_FP8: tl.constexpr,
):
    """Program (i, c): tokens c·TOK .. c·TOK+TOK−1 of requested block i → out rows."""
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    block, ok = _requested_block(ids_ptr, i, num_blocks)
    base = cache_ptr + block * block_stride
    tok = c * TOK + tl.arange(0, TOK)
    j = tl.arange(0, 64)
    out_rows = out_ptr + (i * BS + tok)[:, None] * 512
    for tile in tl.static_range(7):
        codes = tl.load(base + tok[:, None] * 576 + tile * 64 + j[None, :], mask=ok, other=0)
        vals = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        byte = tl.load(base + BS * 576 + tok * 8 + tile, mask=ok, other=0).to(tl.int32)
        factor = tl.where(byte == 255, float("nan"), _pow2(tl.minimum(byte, 254) - 127))
        v = (vals * factor[:, None]).to(tl.bfloat16)
        if TO_FP8:
            v = _cast_fp8_like_compiled(v, fp8_max, out_ptr.dtype.element_ty)
        tl.store(out_rows + tile * 64 + j[None, :], v)
    rope_ptr = (base + 448).to(tl.pointer_type(tl.bfloat16))
    rope = tl.load(rope_ptr + tok[:, None] * 288 + j[None, :], mask=ok, other=0.0)
    if TO_FP8:
        rope = _cast_fp8_like_compiled(rope, fp8_max, out_ptr.dtype.element_ty)
    tl.store(out_rows + 448 + j[None, :], rope)


@triton.jit
def gather_rows_kernel(
    cache_ptr,
    ids_ptr,
    out_ptr,
    block_stride,
    num_blocks,
    fp8_max,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
    TO_FP8: tl.constexpr,
):
    """bf16 layout: out[i] = cache block ids[i] (bs·ROW values), optionally cast to fp8."""
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    block, ok = _requested_block(ids_ptr, i, num_blocks)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    mask = (cols < ROW) & ok
    v = tl.load(cache_ptr + block * block_stride + cols, mask=mask)
    if TO_FP8:
        v = _cast_fp8_like_compiled(v, fp8_max, out_ptr.dtype.element_ty)
    tl.store(out_ptr + i * ROW + cols, v, mask=mask)
