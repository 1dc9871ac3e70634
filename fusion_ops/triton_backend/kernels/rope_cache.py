"""RoPE, the MLA / DeepSeek-V4 cache write, their norm-fused chains and the cache dequant.

RoPE kernels are compiled with ``enable_fp_fusion=False`` so ``a·cos − b·sin`` rounds after
each operation like the torch reference."""

from __future__ import annotations

import triton
import triton.language as tl

from .norm_quant import NO_QUANT, NORM_ONLY, WEIGHTLESS_NORM, _norm_quant_row
from .numerics import _ceil_log2_ratio_448, _clamp_keep_nan, _mul_rn, _pdl_start, _pow2


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
    io = (x_ptr, w_ptr, kv_out_ptr, kv_out_ptr, kv_out_ptr, kv_out_ptr)  # normed row only
    _norm_quant_row(
        t, x_ptr, io, x_stride, x_stride, D, eps, 0.0, 0.0, NORM_ONLY, NO_QUANT, BLOCK_D,
        INV_BY_FMA=INV_BY_FMA,
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
            0, src, (src, src, row, row, row, row), 0, 0, D, q_eps, 0.0, 0.0, WEIGHTLESS_NORM,
            NO_QUANT, BLOCK_D, INV_BY_FMA=INV_BY_FMA,
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
    """Program (i, c): tokens c·TOK .. c·TOK+TOK−1 of requested block i → out rows.

    A token's slot: 448 FP8 codes in 7 tiles of 64 (one UE8M0 scale byte each, in the block's
    scale area, 8 bytes per token) and 64 bf16 rope values. Every load is issued before any
    store: the compiler cannot tell the output from the cache, so a store between loads would
    make each later load wait for it (one memory round trip per tile at decode sizes)."""
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    block, ok = _requested_block(ids_ptr, i, num_blocks)
    base = cache_ptr + block * block_stride
    tok = c * TOK + tl.arange(0, TOK)
    t = tl.arange(0, 8)  # tiles 0..6 (7: padding, masked)
    j = tl.arange(0, 64)
    col = t[None, :, None] * 64 + j[None, None, :]  # [1, 8, 64]: output column
    in_tile = col < 448
    codes = tl.load(base + tok[:, None, None] * 576 + col, mask=in_tile & ok, other=0)
    scale_bytes = base + BS * 576 + tok[:, None] * 8 + t[None, :]  # [TOK, 8]
    byte = tl.load(scale_bytes, mask=(t < 7)[None, :] & ok, other=0).to(tl.int32)
    rope_ptr = (base + 448).to(tl.pointer_type(tl.bfloat16))
    rope = tl.load(rope_ptr + tok[:, None] * 288 + j[None, :], mask=ok, other=0.0)
    factor = tl.where(byte == 255, float("nan"), _pow2(tl.minimum(byte, 254) - 127))
    vals = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    v = (vals * factor[:, :, None]).to(tl.bfloat16)
    rows = (i * BS + tok) * 512
    if TO_FP8:
        v = _cast_fp8_like_compiled(v, fp8_max, out_ptr.dtype.element_ty)
        rope = _cast_fp8_like_compiled(rope, fp8_max, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None, None] + col, v, mask=in_tile)
    tl.store(out_ptr + rows[:, None] + 448 + j[None, :], rope)


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
