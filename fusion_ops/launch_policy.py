"""Launch policy: what every Triton kernel of the backend is launched with.

Each function here is pure (no torch, no triton): shapes and :class:`DeviceFacts` in, a frozen
launch record out. The eager launchers (:mod:`fusion_ops.triton_backend`), the Inductor lowering
(:mod:`fusion_passes.inductor_launch`), the benchmarks (which override a record's fields with
:func:`dataclasses.replace`) and the compile check (which walks :func:`norm_launch_space`) all
read the same records, so what is compiled, benchmarked and launched cannot drift apart.

Two kinds of choice live here:

* **Speed only** — pieces, rows per program, the weight prefetch, the 1/rms steps, the split of a
  row over programs: every value gives the same bytes (the GPU suite compares them bit for bit).
* **Part of the bit contract** — a norm's warp count sets the order of its row's sum of squares,
  so the standalone and the fused launches of the same rows must take the same count
  (:func:`row_warps` is the one rule they share).

Measured thresholds are data (:data:`MANY_ROWS`, :data:`Q_KV_LOAD_BANDS`, ...), each with the file
that holds its evidence.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceFacts:
    """What the launch choices need to know of a device (read once per device by the backend)."""

    hip: bool  # ROCm: no PDL, and the 1/rms FMA seeds are NVIDIA PTX
    pdl: bool  # programmatic dependent launch: NVIDIA sm_90+ and a Triton with ``launch_pdl``
    prefetch_weight: bool  # with PDL, load a norm's weight before the PDL wait
    sm_count: int = (
        0  # streaming multiprocessors (the all-reduce kernel keeps all programs resident)
    )


#: a device without PDL (what Inductor's own launcher gives a kernel: it has no ``launch_pdl``)
NO_PDL = DeviceFacts(hip=False, pdl=False, prefetch_weight=False)

# --- measured thresholds --------------------------------------------------------------------------

#: from this many rows on, rows of 4097–8192 columns without a residual take 4 warps, not 8, and
#: MXFP4/MXFP8 rows go in pieces (evidence: benchmarks/results/short_row_warps_h100.json,
#: benchmarks/results/kernels_h100_pieces.json)
MANY_ROWS = 2048
#: FP8-group rows go in pieces from this many rows on (benchmarks/results/kernels_h100_pieces.json)
FP8_GROUP_PIECES_MIN_ROWS = 1024
#: the smallest piece of a row in pieces (columns)
MIN_PIECE = 256
#: decode sizes: up to this many rows, a row of norm_quant_kernel goes in several programs: for
#: each padded block, (programs for one row, programs for 2–NORM_SPLIT_MAX_ROWS rows), the norm
#: alone, with a block quant, with a per-token scale (each program then also takes the whole
#: row's amax); wider blocks take the widest entry; at most NORM_MAX_SPLIT. Evidence in
#: benchmarks/results/ (benchmarks/row_split.py): row_split_h200.json,
#: row_split_per_token_h200.json, row_split_int_amax_h200.json: a split of 2 slows add+rms; rows
#: of 512 columns and the norm alone at 2048 gain nothing; 16 programs pay for one row of 8192
#: with a quant, not for 16 rows; per-token at 2048: not measured.
NORM_SPLIT_MAX_ROWS = 16
NORM_SPLIT_BY_BLOCK = {4096: (4, 4), 8192: (8, 8)}
NORM_SPLIT_BY_BLOCK_QUANT = {2048: (4, 4), 4096: (4, 4), 8192: (16, 8)}
NORM_SPLIT_PER_TOKEN_BY_BLOCK = {4096: (8, 4), 8192: (16, 4)}
NORM_MAX_SPLIT = max(
    n
    for table in (NORM_SPLIT_BY_BLOCK, NORM_SPLIT_BY_BLOCK_QUANT, NORM_SPLIT_PER_TOKEN_BY_BLOCK)
    for pair in table.values()
    for n in pair
)
#: from this eps on, the FMA 1/rms steps equal the correctly rounded ones on every fp32 sum of
#: squares (proved exhaustively by tests/gpu/test_inv_rms_steps.py)
INV_RMS_BY_FMA_MIN_EPS = 2.0**-40
#: quant-group columns of the block schemes (pieces must hold whole groups)
_BLOCK_GROUP = {"mxfp4": 32, "mxfp8": 32}


@dataclass(frozen=True)
class LoadBand:
    """A measured band of q_kv row counts where a load choice differs from the device default."""

    block_q: int
    quant: bool
    rows: tuple[int, int]  # inclusive
    prefetch_weight: bool | None = None  # None: the device default
    inv_by_fma: bool | None = None
    evidence: str = "benchmarks/results/q_kv_launch_choices_1024_h100.json"


#: q_kv at q_lora 1024 without a quant (H100, three processes alike): at 768–1024 rows the weight
#: loaded after the PDL wait is faster, at 1025–1536 rows the division steps; elsewhere, and at
#: other widths, the defaults are as fast or faster
Q_KV_LOAD_BANDS = (
    LoadBand(block_q=1024, quant=False, rows=(768, 1024), prefetch_weight=False),
    LoadBand(block_q=1024, quant=False, rows=(1025, 1536), inv_by_fma=False),
)


@dataclass(frozen=True)
class QSplitBand:
    """q_kv without a quant: q's row in ``programs`` programs for q blocks of ``block_q`` columns
    over ``rows`` (inclusive)."""

    block_q: int
    rows: tuple[int, int]
    programs: int
    evidence: str = "benchmarks/results/q_kv_split_h200.json"


#: measured on an H200 at q_lora 1536 + kv 512 (16 rows 0.98 → 0.88 µs, 128 rows 1.22 → 1.14);
#: one row, and q_lora 1024 at 1–128 rows: level or slower; a quantized q: not measured
Q_KV_Q_SPLIT = (QSplitBand(block_q=2048, rows=(2, 128), programs=2),)

# one-shot all-reduce (benchmarks/results/all_reduce_h200x2.json): programs resident at once
# (they wait on their peers), and a row split over up to MAX_SPLIT programs of ≥ MIN_PART columns
ALL_REDUCE_MAX_PROGRAMS = 128
ALL_REDUCE_MAX_SPLIT = 8
ALL_REDUCE_MIN_PART = 256


# --- rules ----------------------------------------------------------------------------------------
def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def row_warps(block: int, rows: int = 2, residual: bool = False) -> int:
    """Warps per row program of every norm kernel (part of the bit contract: it sets the sum
    order). A lone row (decode) gets twice the warps: it is latency-bound and has the GPU to
    itself. Rows of 4097–8192 columns without a residual take 4 warps from MANY_ROWS rows on:
    more programs per SM (faster for the block-quant kernels, level for the plain norm; with a
    residual 8 stay faster)."""
    base = 4 if block <= 2048 else 8 if block <= 8192 else 16
    if rows == 1:
        return min(base * 2, 32)
    if warps_depend_on_row_count(block, residual) and rows >= MANY_ROWS:
        return 4
    return base


def warps_depend_on_row_count(block: int, residual: bool) -> bool:
    """Whether :func:`row_warps` (hence a row's rounding) changes with the row count beyond one
    row; FusionPass(inductor_launch=True) lowers such a launch only for a known row count."""
    return 4096 < block <= 8192 and not residual


def quant_group(scheme: str | None, params: tuple[Any, ...]) -> int:
    """Columns per quant group of a block scheme (0: none, or per-token: never in pieces)."""
    if scheme == "fp8_group":
        return int(params[0]) if params else 0
    return _BLOCK_GROUP.get(scheme or "", 0)


def row_pieces(
    kdim: int, rows: int, scheme: str | None, params: tuple[Any, ...], residual: bool
) -> tuple[int, int, int]:
    """norm_quant_kernel's PIECE0..2 (speed only): for a block-quant scheme without a residual on
    many padded rows, the row as up to three power-of-two pieces of at least MIN_PIECE columns
    (7168: 4096, 2048, 1024), the last one masked past ``kdim``; (0, 0, 0), one padded block,
    otherwise (faster for MXFP4/MXFP8 from MANY_ROWS rows and FP8 groups from
    FP8_GROUP_PIECES_MIN_ROWS; slower with a residual and for the norm alone)."""
    group = quant_group(scheme, params)
    min_rows = FP8_GROUP_PIECES_MIN_ROWS if scheme == "fp8_group" else MANY_ROWS
    if not group or residual or rows < min_rows or kdim == next_power_of_2(kdim):
        return (0, 0, 0)
    rest, out = -(-kdim // MIN_PIECE) * MIN_PIECE, []
    while rest > 0 and len(out) < 2:
        out.append(1 << (rest.bit_length() - 1))
        rest -= out[-1]
    if rest > 0:
        out.append(next_power_of_2(rest))
    if len(out) == 1 or min(out) % group:  # one piece: no better than the padded block
        return (0, 0, 0)
    return (out[0], out[1], out[2] if len(out) > 2 else 0)


def inv_rms_by_fma(device: DeviceFacts, *eps: float) -> bool:
    """The norm kernels' INV_BY_FMA (speed only: the same bits): on NVIDIA (the seeds are PTX)
    when every eps is at least INV_RMS_BY_FMA_MIN_EPS."""
    return not device.hip and min(eps) >= INV_RMS_BY_FMA_MIN_EPS


# --- records --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormLaunch:
    """A launch of norm_quant_kernel (and of the chain kernels that norm rows the same way)."""

    block_k: int
    num_warps: int
    pieces: tuple[int, int, int] = (0, 0, 0)
    use_pdl: bool = False
    prefetch_weight: bool = False
    inv_by_fma: bool = False
    split: int = 1  # programs per row (speed only: the same warps, hence the same sums)
    int_amax: bool = False  # a quant block's amax and NaN test from one integer max (speed only)

    def grid(self, rows: int) -> tuple[int]:
        return (rows * self.split,)


def smallest_part(scheme: str | None, params: tuple[Any, ...]) -> int:
    """The fewest columns a program of a split row may own: whole quant groups (MXFP blocks: 32),
    one column without a quant."""
    return max(quant_group(scheme, params), 32 if scheme is not None else 1)


def norm_parts_per_row(
    rows: int, block_k: int, scheme: str | None, params: tuple[Any, ...], programs: int
) -> int:
    """norm_quant_kernel's SPLIT: at decode sizes (<= NORM_SPLIT_MAX_ROWS rows) the programs per
    row of NORM_SPLIT_BY_BLOCK (the norm alone), NORM_SPLIT_BY_BLOCK_QUANT (a block quant) or
    NORM_SPLIT_PER_TOKEN_BY_BLOCK (a per-token scale), halved until every program is resident
    (rows · split <= programs) and parts hold whole quant groups; 1 beyond NORM_SPLIT_MAX_ROWS
    rows."""
    if rows > NORM_SPLIT_MAX_ROWS:
        return 1
    if scheme is None:
        table = NORM_SPLIT_BY_BLOCK
    elif quant_group(scheme, params) == 0:
        table = NORM_SPLIT_PER_TOKEN_BY_BLOCK
    else:
        table = NORM_SPLIT_BY_BLOCK_QUANT
    one_row, more = table[max(table)] if block_k > max(table) else table.get(block_k, (1, 1))
    split = one_row if rows == 1 else more
    part = smallest_part(scheme, params)
    while split > 1 and (rows * split > programs or block_k // split < part):
        split //= 2
    return split


def norm_launch(
    kdim: int,
    rows: int,
    device: DeviceFacts,
    *,
    scheme: str | None = None,
    params: tuple[Any, ...] = (),
    residual: bool = False,
    has_weight: bool = True,
    eps: float = 1e-6,
) -> NormLaunch:
    """norm_quant_kernel over ``rows`` rows of ``kdim`` columns (``scheme`` None: no quant)."""
    block = next_power_of_2(kdim)
    split = norm_parts_per_row(rows, block, scheme, params, device.sm_count)
    return NormLaunch(
        block_k=block,
        num_warps=row_warps(block, rows, residual),
        pieces=row_pieces(kdim, rows, scheme, params, residual),
        use_pdl=device.pdl,
        prefetch_weight=has_weight and device.prefetch_weight,
        inv_by_fma=inv_rms_by_fma(device, eps),
        split=split,
        int_amax=amax_by_one_max(split, scheme, residual),
    )


def amax_by_one_max(split: int, scheme: str | None, residual: bool = False) -> bool:
    """The row kernels' INT_AMAX (speed only: the same bytes): a quant block's amax and NaN test
    from one integer max of its bits instead of a float max and a NaN test. A split row takes it
    (a decode-size part spreads a block over warps, where each reduction costs a barrier;
    benchmarks/results/row_split_int_amax_h200.json), and MXFP4 without a residual at every row
    count (rms→MXFP4 7 % faster on many rows, add+rms→MXFP4 6–9 % slower: H100,
    benchmarks/results/log.md)."""
    if scheme is None:
        return False
    return split > 1 or (scheme == "mxfp4" and not residual)


#: the row counts at which :func:`norm_launch` can change (it is constant between them, for a
#: device of at least NORM_MAX_SPLIT · NORM_SPLIT_MAX_ROWS programs)
ROW_BOUNDARIES = (
    1,
    2,
    NORM_SPLIT_MAX_ROWS + 1,
    FP8_GROUP_PIECES_MIN_ROWS,
    MANY_ROWS,
)


def norm_launch_space(
    kdim: int,
    device: DeviceFacts,
    *,
    scheme: str | None = None,
    params: tuple[Any, ...] = (),
    residual: bool = False,
) -> Iterator[tuple[int, NormLaunch]]:
    """Every distinct record :func:`norm_launch` gives at this width, with the first row count
    that gets it (what the compile check compiles)."""
    seen: set[NormLaunch] = set()
    for rows in ROW_BOUNDARIES:
        launch = norm_launch(kdim, rows, device, scheme=scheme, params=params, residual=residual)
        if launch not in seen:
            seen.add(launch)
            yield rows, launch


@dataclass(frozen=True)
class QKvLaunch:
    """A launch of q_kv_norm_quant_kernel (both norms of one projection's rows)."""

    paired: bool  # False: the two norms run as their two standalone launches (other warps)
    block_q: int
    block_kv: int
    num_warps: int
    rows_per_program: int = 1
    pieces: tuple[int, int, int] = (0, 0, 0)
    use_pdl: bool = False
    prefetch_weight: bool = False
    inv_by_fma: bool = False
    q_split: int = 1  # programs per q row (speed only: the same warps, hence the same sums)
    int_amax: bool = False  # q's quant blocks' amax and NaN test from one integer max (speed only)

    def __post_init__(self) -> None:
        if self.q_split > 1 and (self.rows_per_program > 1 or self.pieces[0]):
            raise ValueError(
                f"QKvLaunch: q_split={self.q_split} takes one row per program and no pieces, "
                f"got rows_per_program={self.rows_per_program}, pieces={self.pieces}"
            )

    def grid(self, rows: int) -> tuple[int, int]:
        return ((rows + self.rows_per_program - 1) // self.rows_per_program, self.q_split + 1)


def q_kv_rows_per_program(block_q: int, rows: int, quant: bool, q_in_pieces: bool = False) -> int:
    """Rows per q_kv program (speed only): 2 for many short rows (each program then loads its
    weights once for both), 1 otherwise. Measured at q_lora 1024 / 1536 + kv 512
    (benchmarks/results/deeper_q_kv_h100.json): 2 is faster from 2048 rows, and from 1024 rows at
    1024 columns without a quant; wider rows: not measured, 1. q's rows in pieces: 1, as the
    standalone pieces kernel takes them."""
    if block_q > 2048 or q_in_pieces:
        return 1
    return 2 if rows >= (1024 if block_q <= 1024 and not quant else 2048) else 1


def q_kv_launch(
    k_q: int,
    k_kv: int,
    rows: int,
    device: DeviceFacts,
    *,
    scheme: str | None = None,
    params: tuple[Any, ...] = (),
    q_eps: float = 1e-6,
    kv_eps: float = 1e-6,
) -> QKvLaunch:
    """q_kv_norm_quant_kernel over ``rows`` rows of q [k_q] and kv [k_kv]. One launch has one warp
    count, and the warp count sets a row's sum order: when the standalone launches would use
    different counts the record is not ``paired``."""
    block_q, block_kv = next_power_of_2(k_q), next_power_of_2(k_kv)
    warps = row_warps(block_q, rows)
    if warps != row_warps(block_kv, rows):
        return QKvLaunch(paired=False, block_q=block_q, block_kv=block_kv, num_warps=warps)
    quant = scheme is not None
    pieces = row_pieces(k_q, rows, scheme, params, False)
    prefetch, by_fma = device.prefetch_weight, inv_rms_by_fma(device, q_eps, kv_eps)
    for band in Q_KV_LOAD_BANDS:
        if band.block_q == block_q and band.quant == quant and band.rows[0] <= rows <= band.rows[1]:
            prefetch = prefetch if band.prefetch_weight is None else band.prefetch_weight
            by_fma = by_fma if band.inv_by_fma is None else band.inv_by_fma
    per_program = q_kv_rows_per_program(block_q, rows, quant, pieces[0] > 0)
    q_split = q_kv_q_split(block_q, rows, quant) if per_program == 1 and not pieces[0] else 1
    return QKvLaunch(
        paired=True,
        block_q=block_q,
        block_kv=block_kv,
        num_warps=warps,
        rows_per_program=per_program,
        pieces=pieces,
        use_pdl=device.pdl,
        prefetch_weight=prefetch,
        inv_by_fma=by_fma,
        q_split=q_split,
        int_amax=amax_by_one_max(q_split, scheme),
    )


def q_kv_q_split(block_q: int, rows: int, quant: bool) -> int:
    """Programs per q row of q_kv_norm_quant_kernel (speed only; one row per program, no
    pieces): Q_KV_Q_SPLIT's band for these rows, 1 elsewhere."""
    for band in Q_KV_Q_SPLIT:
        if not quant and band.block_q == block_q and band.rows[0] <= rows <= band.rows[1]:
            return band.programs
    return 1


def chain_launch(d: int, rows: int, device: DeviceFacts, eps: float) -> NormLaunch:
    """The norm + rope + cache-write kernels (kv norm over ``rows`` tokens, or the per-head q norm
    over tokens · heads rows): the standalone norm's warps for those rows, hence the same sums."""
    block = next_power_of_2(d)
    return NormLaunch(
        block_k=block,
        num_warps=row_warps(block, rows),
        use_pdl=device.pdl,
        inv_by_fma=inv_rms_by_fma(device, eps),
    )


@dataclass(frozen=True)
class AllReduceLaunch:
    """A launch of all_reduce_norm_quant_kernel."""

    block_k: int
    num_warps: int  # the fused add-norm op's, for the same rows: the same sums
    split: int  # programs per row (speed only)
    grid: tuple[int]
    use_pdl: bool = False
    inv_by_fma: bool = False


def all_reduce_parts_per_row(rows: int, block_k: int, group: int, programs: int) -> int:
    """Programs per row (the kernel's SPLIT): the most, up to ALL_REDUCE_MAX_SPLIT, with every
    program resident (rows · split <= programs), parts of at least ALL_REDUCE_MIN_PART columns and
    whole quant groups; 1 from a few dozen rows on."""
    split = ALL_REDUCE_MAX_SPLIT
    while split > 1 and (
        rows * split > programs or block_k // split < max(ALL_REDUCE_MIN_PART, group)
    ):
        split //= 2
    return split


def all_reduce_launch(
    kdim: int, rows: int, device: DeviceFacts, *, group: int, eps: float
) -> AllReduceLaunch:
    """The one-shot all-reduce + add + norm (+ quant) kernel over ``rows`` rows of ``kdim``;
    ``group``: the kernel's GROUP (quant-group columns, 1 without)."""
    block = next_power_of_2(kdim)
    programs = min(ALL_REDUCE_MAX_PROGRAMS, device.sm_count)
    split = all_reduce_parts_per_row(rows, block, group, programs)
    return AllReduceLaunch(
        block_k=block,
        num_warps=row_warps(block, rows, residual=True),
        split=split,
        grid=(rows * split,) if split > 1 else (min(rows, programs),),
        use_pdl=device.pdl,
        inv_by_fma=inv_rms_by_fma(device, eps),
    )


#: KV-cache dequant of the DSV4 layout: tokens of a block per program and warps. 4 and 4 beat
#: the former 16 and 4 at 5–1024 blocks, bf16 and FP8 output (5 blocks, one decode sequence:
#: 1.65 → 1.47 µs bf16, 2.32 → 1.50 FP8), but bf16 at 64 blocks (2.55 vs 2.62); the fastest of
#: 2–32 tokens × 1–8 warps differs by size and is up to 1.2 µs faster at 320 blocks FP8 (one
#: run: benchmarks/results/dequant_tiles_h200.json)
DEQUANT_DSV4_TOKENS = 4
DEQUANT_DSV4_WARPS = 4
#: elements per program of the bf16 layout's gather
GATHER_BLOCK = 4096


@dataclass(frozen=True)
class DequantLaunch:
    """A launch of dequant_dsv4_kernel: ``tokens`` tokens of a cache block per program (speed
    only: every output element depends on its token's slot alone)."""

    tokens: int
    num_warps: int

    def grid(self, blocks: int, block_size: int) -> tuple[int, int]:
        return (blocks, block_size // self.tokens)


def dequant_launch(block_size: int) -> DequantLaunch:
    """dequant_dsv4_kernel over blocks of ``block_size`` tokens (the same record for every block
    count and output type, as measured): DEQUANT_DSV4_TOKENS tokens per program, fewer where
    they would not divide the block (a power of two: the kernel's tile)."""
    tokens = math.gcd(block_size, DEQUANT_DSV4_TOKENS)
    return DequantLaunch(tokens=tokens, num_warps=DEQUANT_DSV4_WARPS)
