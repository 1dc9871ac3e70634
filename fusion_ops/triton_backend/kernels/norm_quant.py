"""RMSNorm (+ residual add) (+ quant) of rows: one row per program (or a row in pieces), and the
two norms of q_kv_norm in one launch."""

from __future__ import annotations

import triton
import triton.language as tl

from .numerics import _inv_rms, _pdl_start, _sum_of_squares
from .quant import _abs_bits_max, _fp8_groups, _fp8_token_part, _mxfp4, _mxfp8

#: the row helpers' NORM / QUANT (see below) of a norm written out in the input's dtype
NORM_ONLY = tl.constexpr((False, True, True, False, False, False))
WEIGHTLESS_NORM = tl.constexpr((False, True, True, False, False, True))
NO_QUANT = tl.constexpr((0, 1, False))


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
    SPLIT: tl.constexpr = 1,
    INT_AMAX: tl.constexpr = False,
):
    """One row per program: [x + r →] rms_norm → [quant]; the flags select other libraries'
    rounding points (fusion_ops.reference.norm): the weight applied after rounding the normed
    value to the weight's dtype, the norm of the unrounded fp32 sum; WEIGHTLESS: no weight
    (``weightless_rms_norm``; w_ptr is not read). PIECE0..2 (speed only, same bytes): the row
    after its sum of squares as up to three unpadded power-of-two pieces (_norm_quant_pieces).
    PREFETCH_W: the one-block path loads the weight before the PDL wait (see
    _pdl_start_with_weight); pieces are for many rows, where that wait hides nothing.
    INV_BY_FMA: the 1/rms steps by FMA corrections (_inv_rms; same bytes). SPLIT > 1 (decode
    sizes; grid M · SPLIT; speed only, same bytes): program p does part p % SPLIT of row
    p // SPLIT (_norm_quant_split). INT_AMAX: the quant blocks' amax and NaN test from one
    integer max (_amax_bits_and_nan; speed only, same bytes)."""
    NORM: tl.constexpr = (
        HAS_RES, DO_NORM, WRITE_Y, WEIGHT_AFTER_ROUNDING, UNROUNDED_SUM, WEIGHTLESS
    )  # fmt: skip
    QUANT: tl.constexpr = (SCHEME, GROUP, UE8M0)
    io = (r_ptr, w_ptr, y_ptr, res_ptr, q_ptr, s_ptr)
    if SPLIT > 1:
        pid = tl.program_id(0)
        _norm_quant_split(
            (pid // SPLIT).to(tl.int64), pid % SPLIT, x_ptr, io, x_stride, r_stride, K, eps,
            fp8_max, min_scale, NORM, QUANT, BLOCK_K, USE_PDL, PREFETCH_W, INV_BY_FMA, SPLIT,
            INT_AMAX,
        )  # fmt: skip
        return
    row = tl.program_id(0).to(tl.int64)
    if PIECE0 == 0:
        w = _pdl_start_with_weight(w_ptr, K, BLOCK_K, USE_PDL, PREFETCH_W, PREFETCH_W)
        _norm_quant_row(
            row, x_ptr, io, x_stride, r_stride, K, eps, fp8_max, min_scale, NORM, QUANT, BLOCK_K,
            w, PREFETCH_W, INV_BY_FMA, INT_AMAX,
        )  # fmt: skip
    else:
        if USE_PDL:  # see _pdl_start
            _pdl_start()
        _norm_quant_pieces(
            row, x_ptr, io, x_stride, r_stride, K, eps, fp8_max, min_scale, NORM, QUANT, BLOCK_K,
            (PIECE0, PIECE1, PIECE2), INV_BY_FMA, INT_AMAX,
        )  # fmt: skip


# The row helpers below take their arguments grouped, as every row kernel passes them:
#   io    = (r_ptr, w_ptr, y_ptr, res_ptr, q_ptr, s_ptr): residual in, weight, normed out,
#           residual out, quant codes, quant scales
#   NORM  = (HAS_RES, DO_NORM, WRITE_Y, WEIGHT_AFTER_ROUNDING, UNROUNDED_SUM, WEIGHTLESS)
#   QUANT = (SCHEME, GROUP, UE8M0); SCHEME 0: no quant
# (Triton inlines them: the same instructions as with the arguments one by one.)


@triton.jit
def _norm_quant_split(
    row, part, x_ptr, io, x_stride, r_stride, K, eps, fp8_max, min_scale, NORM: tl.constexpr,
    QUANT: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH_W: tl.constexpr,
    INV_BY_FMA: tl.constexpr, SPLIT: tl.constexpr, INT_AMAX: tl.constexpr = False,
):  # fmt: skip
    """Part ``part`` of ``row`` split over SPLIT programs, as the all-reduce kernel splits one:
    each program takes the whole row's 1/rms from the dedicated sum-of-squares load over BLOCK_K
    (the same load, warps and order as the one-program kernel, so the same bits) and does the
    row work on its BLOCK_K / SPLIT columns (_norm_quant_part: every output depends on its
    column and 1/rms alone; parts hold whole quant blocks and groups). A per-token scale (GROUP
    = BLOCK_K) is the whole row's: each program also takes the row's amax
    (_row_normed_amax_bits; a maximum has no order, so the same scale). The part, its residual
    and its weight are loaded before the reduction (the weight before the PDL wait with
    PREFETCH_W), so their loads are in flight during it."""
    HAS_RES: tl.constexpr = NORM[0]
    DO_NORM: tl.constexpr = NORM[1]
    WEIGHTLESS: tl.constexpr = NORM[5]
    PER_TOKEN: tl.constexpr = QUANT[0] == 3 and QUANT[1] == BLOCK_K
    r_ptr, w_ptr = io[0], io[1]
    PART: tl.constexpr = BLOCK_K // SPLIT
    col0 = part * PART
    cols = col0 + tl.arange(0, PART)
    mask = cols < K
    w = 0
    LOAD_W: tl.constexpr = DO_NORM and not WEIGHTLESS
    if LOAD_W and PREFETCH_W:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    if USE_PDL:
        _pdl_start()
    if LOAD_W and not PREFETCH_W:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    r = 0
    if HAS_RES:
        r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0)
    inv = _row_inv_rms(x_ptr, r_ptr, row, x_stride, r_stride, K, eps, NORM, BLOCK_K, INV_BY_FMA)
    amax_bits = 0
    if PER_TOKEN:
        amax_bits = _row_normed_amax_bits(x_ptr, io, row, x_stride, r_stride, K, inv, NORM, BLOCK_K)
    _norm_quant_part(
        x, col0, inv, row, io, r_stride, K, fp8_max, min_scale, NORM, QUANT, PART, w, LOAD_W,
        r, HAS_RES, amax_bits, INT_AMAX,
    )  # fmt: skip


@triton.jit
def _row_normed_amax_bits(
    x_ptr, io, row, x_stride, r_stride, K, inv, NORM: tl.constexpr, BLOCK_K: tl.constexpr
):  # fmt: skip
    """max |y| over the whole normed row y (as _norm_quant_part computes it) as int32 bits
    (_abs_bits_max)."""
    r_ptr, w_ptr = io[0], io[1]
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    r = 0
    if NORM[0]:
        r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0)
    w = 0
    if NORM[1] and not NORM[5]:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    _, y = _add_and_norm(x, r, w, inv, NORM)
    return _abs_bits_max(y.to(tl.float32), 0)


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
    row, x_ptr, io, x_stride, r_stride, K, eps, fp8_max, min_scale, NORM: tl.constexpr,
    QUANT: tl.constexpr, BLOCK_K: tl.constexpr, w=0, W_LOADED: tl.constexpr = False,
    INV_BY_FMA: tl.constexpr = False, INT_AMAX: tl.constexpr = False,
):  # fmt: skip
    """norm_quant_kernel's work on one row (also the row work of the q_kv, norm-rope-cache and
    all-reduce kernels); W_LOADED: ``w`` is the weight row, already loaded; INV_BY_FMA: see
    _inv_rms."""
    cols = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + row * x_stride + cols, mask=cols < K, other=0.0)
    inv = _row_inv_rms(x_ptr, io[0], row, x_stride, r_stride, K, eps, NORM, BLOCK_K, INV_BY_FMA)
    _norm_quant_part(
        x, 0, inv, row, io, r_stride, K, fp8_max, min_scale, NORM, QUANT, BLOCK_K, w, W_LOADED,
        INT_AMAX=INT_AMAX,
    )  # fmt: skip


@triton.jit
def _norm_quant_pieces(
    row, x_ptr, io, x_stride, r_stride, K, eps, fp8_max, min_scale, NORM: tl.constexpr,
    QUANT: tl.constexpr, BLOCK_K: tl.constexpr, PIECES: tl.constexpr,
    INV_BY_FMA: tl.constexpr = False, INT_AMAX: tl.constexpr = False,
):  # fmt: skip
    """_norm_quant_row's bytes, with the row after its sum of squares handled as up to three
    power-of-two pieces at columns 0, PIECE0 and PIECE0 + PIECE1 (PIECES = (PIECE0, PIECE1,
    PIECE2), 0: none) instead of one block padded to a power of two (7168 = 4096 + 2048 +
    1024: no masked lanes). Each piece is loaded before the sum of squares, so its load is in
    flight during the reduction. The sum of squares is the padded block's, as in every other
    row kernel; every other step is per column or per quant block, and pieces hold whole blocks
    (_norm_quant_part)."""
    PIECE0: tl.constexpr = PIECES[0]
    PIECE1: tl.constexpr = PIECES[1]
    PIECE2: tl.constexpr = PIECES[2]
    x0 = _load_piece(x_ptr, row, x_stride, K, 0, PIECE0)
    if PIECE1 > 0:
        x1 = _load_piece(x_ptr, row, x_stride, K, PIECE0, PIECE1)
    if PIECE2 > 0:
        x2 = _load_piece(x_ptr, row, x_stride, K, PIECE0 + PIECE1, PIECE2)
    inv = _row_inv_rms(x_ptr, io[0], row, x_stride, r_stride, K, eps, NORM, BLOCK_K, INV_BY_FMA)
    _norm_quant_part(
        x0, 0, inv, row, io, r_stride, K, fp8_max, min_scale, NORM, QUANT, PIECE0,
        INT_AMAX=INT_AMAX,
    )  # fmt: skip
    if PIECE1 > 0:
        _norm_quant_part(
            x1, PIECE0, inv, row, io, r_stride, K, fp8_max, min_scale, NORM, QUANT, PIECE1,
            INT_AMAX=INT_AMAX,
        )  # fmt: skip
    if PIECE2 > 0:
        _norm_quant_part(
            x2, PIECE0 + PIECE1, inv, row, io, r_stride, K, fp8_max, min_scale, NORM, QUANT,
            PIECE2, INT_AMAX=INT_AMAX,
        )  # fmt: skip


@triton.jit
def _row_inv_rms(
    x_ptr, r_ptr, row, x_stride, r_stride, K, eps, NORM: tl.constexpr, BLOCK_K: tl.constexpr,
    INV_BY_FMA: tl.constexpr,
):  # fmt: skip
    """The row's 1/rms from its dedicated sum-of-squares load (_sum_of_squares); 0.0 without a
    norm. INV_BY_FMA: see _inv_rms."""
    HAS_RES: tl.constexpr = NORM[0]
    DO_NORM: tl.constexpr = NORM[1]
    UNROUNDED_SUM: tl.constexpr = NORM[4]
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
def _add_and_norm(x, r, w, inv, NORM: tl.constexpr):
    """(x [+ r] rounded to x's dtype, the normed value in x's dtype) of loaded columns x, r, w
    and the row's 1/rms, with NORM's rounding points (fusion_ops.reference.norm)."""
    HAS_RES: tl.constexpr = NORM[0]
    DO_NORM: tl.constexpr = NORM[1]
    WEIGHT_AFTER_ROUNDING: tl.constexpr = NORM[3]
    UNROUNDED_SUM: tl.constexpr = NORM[4]
    WEIGHTLESS: tl.constexpr = NORM[5]
    out_dtype = x.dtype
    xf = x.to(tl.float32)
    if HAS_RES:
        total = xf + r.to(tl.float32)
        x = total.to(out_dtype)  # residual_out, rounded
        xf = total if UNROUNDED_SUM else x.to(tl.float32)
    if DO_NORM and WEIGHTLESS:
        y = (xf * inv).to(out_dtype)
    elif DO_NORM:
        if WEIGHT_AFTER_ROUNDING:  # (n.to(w.dtype) * w).to(x.dtype)
            n = (xf * inv).to(w.dtype).to(tl.float32)
            y = (n * w.to(tl.float32)).to(w.dtype).to(out_dtype)
        else:
            y = ((xf * inv) * w.to(tl.float32)).to(out_dtype)  # rounded once to x.dtype
    else:
        y = x
    return x, y


@triton.jit
def _norm_quant_part(
    x, col0, inv, row, io, r_stride, K, fp8_max, min_scale, NORM: tl.constexpr,
    QUANT: tl.constexpr, BLOCK: tl.constexpr, w=0, W_LOADED: tl.constexpr = False, r=0,
    R_LOADED: tl.constexpr = False, amax_bits=0, INT_AMAX: tl.constexpr = False,
):  # fmt: skip
    """The row work on columns [col0, col0 + BLOCK) of the row (x: those columns, loaded; inv:
    the whole row's 1/rms; w, r: those columns of the weight and residual when W_LOADED,
    R_LOADED): residual add, norm, stores, quant. Every output element depends on its column
    and inv alone, and quant blocks/groups lie inside a part (col0 a multiple of BLOCK, BLOCK of
    the group size), so parts of a row give the bytes of the whole row; a per-token scale of a
    part (GROUP > BLOCK) comes from ``amax_bits``, the whole row's (_row_normed_amax_bits).
    INT_AMAX: the blocks' amax and NaN test from one integer max (_amax_bits_and_nan; the
    launch policy's ``amax_by_one_max``)."""
    r_ptr, w_ptr, y_ptr, res_ptr, q_ptr, s_ptr = io
    HAS_RES: tl.constexpr = NORM[0]
    DO_NORM: tl.constexpr = NORM[1]
    WRITE_Y: tl.constexpr = NORM[2]
    WEIGHTLESS: tl.constexpr = NORM[5]
    SCHEME: tl.constexpr = QUANT[0]
    GROUP: tl.constexpr = QUANT[1]
    UE8M0: tl.constexpr = QUANT[2]
    cols = col0 + tl.arange(0, BLOCK)
    mask = cols < K
    # fp32 whatever the launcher typed the floats as (Triton's JIT: fp32; Inductor: fp64)
    fp8_max = tl.cast(fp8_max, tl.float32)
    min_scale = tl.cast(min_scale, tl.float32)
    if HAS_RES and not R_LOADED:
        r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0)
    if DO_NORM and not WEIGHTLESS and not W_LOADED:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    x, y = _add_and_norm(x, r, w, inv, NORM)
    if HAS_RES:
        tl.store(res_ptr + row * K + cols, x, mask=mask)
    if WRITE_Y:
        tl.store(y_ptr + row * K + cols, y, mask=mask)
    if SCHEME == 1:
        _mxfp4(
            y.to(tl.float32), q_ptr, s_ptr, row, K, BLOCK, col0, INT_AMAX,
            y.dtype.primitive_bitwidth == 16,
        )  # fmt: skip
    elif SCHEME == 2:
        _mxfp8(y.to(tl.float32), q_ptr, s_ptr, row, K, BLOCK, col0, INT_AMAX)
    elif SCHEME == 3 and GROUP > BLOCK:  # a part of a row with a per-token scale
        _fp8_token_part(
            y.to(tl.float32), amax_bits, q_ptr, s_ptr, row, K, fp8_max, min_scale, UE8M0, BLOCK,
            col0,
        )  # fmt: skip
    elif SCHEME == 3:
        _fp8_groups(
            y.to(tl.float32), q_ptr, s_ptr, row, K, fp8_max, min_scale, GROUP, UE8M0, BLOCK,
            col0, INT_AMAX,
        )  # fmt: skip


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
    Q_SPLIT: tl.constexpr = 1,
    INT_AMAX: tl.constexpr = False,
):
    """Programs (i, 0): rms_norm of q's rows i·ROWS … i·ROWS + ROWS - 1 [→ quant]; programs
    (i, 1): rms_norm of the same kv rows. Each row is norm_quant_kernel's row work (same helper,
    same flags), so with the standalone kernels' warp count both halves round exactly as two
    standalone launches would. ROWS > 1 (many short rows) loads the weight once for them;
    PREFETCH_W: see _pdl_start_with_weight; PIECE0..2: q's rows as norm_quant_kernel's pieces
    (one row per program); INV_BY_FMA: see _inv_rms (both eps allow it). Q_SPLIT > 1 (decode
    sizes, one row per program; speed only): q's row in Q_SPLIT programs (i, 0 … Q_SPLIT - 1)
    as norm_quant_kernel splits one (_norm_quant_split), kv's row in program (i, Q_SPLIT).
    INT_AMAX: q's quant blocks' amax and NaN test from one integer max (see norm_quant_kernel)."""
    LOAD_W: tl.constexpr = PREFETCH_W or ROWS > 1
    Q_NORM: tl.constexpr = (False, True, WRITE_Y, WEIGHT_AFTER_ROUNDING, False, False)
    QUANT: tl.constexpr = (SCHEME, GROUP, UE8M0)
    q_io = (q_ptr, qw_ptr, y_ptr, y_ptr, codes_ptr, scales_ptr)  # no residual (r, res unused)
    kv_io = (kv_ptr, kvw_ptr, kv_out_ptr, kv_out_ptr, kv_out_ptr, kv_out_ptr)
    first = tl.program_id(0).to(tl.int64) * ROWS
    q_part = tl.program_id(1)
    if Q_SPLIT > 1 and q_part < Q_SPLIT:
        _norm_quant_split(
            first, q_part, q_ptr, q_io, q_stride, q_stride, K_Q, q_eps, fp8_max, min_scale,
            Q_NORM, QUANT, BLOCK_Q, USE_PDL, PREFETCH_W, INV_BY_FMA, Q_SPLIT, INT_AMAX,
        )  # fmt: skip
    elif tl.program_id(1) == 0 and PIECE0 > 0:
        if USE_PDL:  # see _pdl_start
            _pdl_start()
        _norm_quant_pieces(
            first, q_ptr, q_io, q_stride, q_stride, K_Q, q_eps, fp8_max, min_scale, Q_NORM,
            QUANT, BLOCK_Q, (PIECE0, PIECE1, PIECE2), INV_BY_FMA, INT_AMAX,
        )  # fmt: skip
    elif Q_SPLIT == 1 and tl.program_id(1) == 0:
        qw = _pdl_start_with_weight(qw_ptr, K_Q, BLOCK_Q, USE_PDL, LOAD_W, PREFETCH_W)
        for i in tl.static_range(ROWS):
            if first + i < M:
                _norm_quant_row(
                    first + i, q_ptr, q_io, q_stride, q_stride, K_Q, q_eps, fp8_max, min_scale,
                    Q_NORM, QUANT, BLOCK_Q, qw, LOAD_W, INV_BY_FMA, INT_AMAX,
                )  # fmt: skip
    else:
        kvw = _pdl_start_with_weight(kvw_ptr, K_KV, BLOCK_KV, USE_PDL, LOAD_W, PREFETCH_W)
        for i in tl.static_range(ROWS):
            if first + i < M:
                _norm_quant_row(
                    first + i, kv_ptr, kv_io, kv_stride, kv_stride, K_KV, kv_eps, fp8_max,
                    min_scale, NORM_ONLY, NO_QUANT, BLOCK_KV, kvw, LOAD_W, INV_BY_FMA,
                )  # fmt: skip
