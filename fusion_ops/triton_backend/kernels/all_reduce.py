"""Tensor parallel: the one-shot all-reduce over symmetric memory followed by the row work of
:mod:`.norm_quant` (the sum in rank order, then add + RMSNorm + quant)."""

from __future__ import annotations

import triton
import triton.language as tl

from .norm_quant import _norm_quant_part, _norm_quant_row
from .numerics import _bits, _inv_rms, _pdl_start, _sum_of_squares_of


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
    NORM: tl.constexpr = (HAS_RES, DO_NORM, WRITE_Y, WEIGHT_AFTER_ROUNDING, UNROUNDED_SUM, False)
    QUANT: tl.constexpr = (SCHEME, GROUP, UE8M0)
    io = (r_ptr, w_ptr, y_ptr, res_ptr, q_ptr, s_ptr)
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
            row.to(tl.int64), io, r_stride, K, fp8_max, min_scale, NORM, QUANT, PART,
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
                row.to(tl.int64), red_ptr, io, K, r_stride, K, eps, fp8_max, min_scale, NORM,
                QUANT, BLOCK_K, INV_BY_FMA=INV_BY_FMA,
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
