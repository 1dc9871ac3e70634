"""The launch policy (fusion_ops.launch_policy), checked on CPU: the rules that decide rounding
(warps per row program set a row's sum order) and those that decide only speed (the pieces must
tile the row with whole quant blocks), that the compile check's walk of the policy meets every
record a launch can get, and that each kernel's calling convention (fusion_ops.triton_backend.calls)
names exactly the kernel's parameters."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from fusion_ops import launch_policy as policy
from fusion_ops.launch_policy import (
    MANY_ROWS,
    NO_PDL,
    DeviceFacts,
    next_power_of_2,
    q_kv_rows_per_program,
    row_pieces,
    row_warps,
    warps_depend_on_row_count,
)

WIDTHS = range(32, 16384 + 1, 32)
PDL = DeviceFacts(hip=False, pdl=True, prefetch_weight=True, sm_count=132)
ROCM = DeviceFacts(hip=True, pdl=False, prefetch_weight=False, sm_count=304)
FP8_GROUP = ("fp8_group", (128, False, None))


def test_the_policy_imports_neither_torch_nor_triton() -> None:
    """A pure module: the lowering, the benchmarks and the compile check read it without a GPU
    stack (loaded on its own, in a fresh interpreter)."""
    path = importlib.util.find_spec("fusion_ops.launch_policy").origin  # type: ignore[union-attr]
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('launch_policy', {path!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['launch_policy'] = m\n"
        "spec.loader.exec_module(m)\n"
        "print(sorted({'torch', 'triton'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("residual", [False, True])
def test_warps_change_with_the_row_count_only_where_declared(residual: bool) -> None:
    """Beyond the lone row, the warps follow the row count exactly where
    warps_depend_on_row_count says (what FusionPass(inductor_launch=True) relies on)."""
    for block in sorted({next_power_of_2(k) for k in WIDTHS}):
        counts = {row_warps(block, rows, residual) for rows in (2, 3, MANY_ROWS - 1, MANY_ROWS)}
        assert (len(counts) > 1) == warps_depend_on_row_count(block, residual), block
        assert row_warps(block, 1, residual) >= max(counts)  # a lone row: never fewer


@pytest.mark.parametrize(
    "scheme,params,group",
    [("mxfp4", (), 32), ("mxfp8", (), 32), ("fp8_group", (128, False, None), 128),
     ("fp8_group", (64, True, None), 64)],
)  # fmt: skip
def test_pieces_tile_the_row_with_whole_quant_blocks(scheme, params, group) -> None:
    for kdim in range(group, 16384 + 1, group):
        block = next_power_of_2(kdim)
        pieces = [p for p in row_pieces(kdim, 1 << 20, scheme, params, False) if p]
        if not pieces:
            assert kdim == block or kdim <= 256 or -(-kdim // 256) * 256 == block, kdim
            continue
        assert all(p & (p - 1) == 0 and p % group == 0 for p in pieces), (kdim, pieces)
        assert pieces == sorted(pieces, reverse=True) and len(pieces) <= 3
        # every column covered once, and only the last piece reaches past the row
        assert sum(pieces[:-1]) < kdim <= sum(pieces), (kdim, pieces)
        assert sum(pieces) <= block


def test_pieces_only_for_many_rows_of_block_quant_without_residual() -> None:
    want = (4096, 2048, 1024)
    assert row_pieces(7168, MANY_ROWS, "mxfp4", (), False) == want
    assert row_pieces(7168, MANY_ROWS - 1, "mxfp4", (), False) == (0, 0, 0)
    assert row_pieces(7168, policy.FP8_GROUP_PIECES_MIN_ROWS, *FP8_GROUP, False) == want
    assert row_pieces(7168, policy.FP8_GROUP_PIECES_MIN_ROWS - 1, *FP8_GROUP, False) == (0, 0, 0)
    assert row_pieces(7168, MANY_ROWS, "mxfp4", (), True) == (0, 0, 0)  # residual
    assert row_pieces(7168, MANY_ROWS, None, (), False) == (0, 0, 0)  # norm alone
    assert row_pieces(7168, MANY_ROWS, "fp8_per_token", (False, None), False) == (0, 0, 0)


def test_q_kv_rows_per_program() -> None:
    assert [q_kv_rows_per_program(1024, m, False) for m in (1, 1023, 1024)] == [1, 1, 2]
    for block, quant in ((1024, True), (2048, False), (2048, True)):
        assert [q_kv_rows_per_program(block, m, quant) for m in (1024, 2047, 2048)] == [1, 1, 2]
    assert q_kv_rows_per_program(8192, 1 << 16, False) == 1  # wide rows: one per program
    assert q_kv_rows_per_program(1024, 4096, True, q_in_pieces=True) == 1


SCHEMES = [(None, ()), ("mxfp4", ()), ("mxfp8", ()), FP8_GROUP, ("fp8_per_token", (False, None))]


@pytest.mark.parametrize("scheme,params", SCHEMES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("device", [NO_PDL, PDL], ids=["no programs named", "132 SMs"])
def test_the_walk_of_the_policy_meets_every_launch(scheme, params, residual, device) -> None:
    """Every record norm_launch gives any row count is one norm_launch_space yields (what the
    compile check compiles), and the space has no record twice."""
    for kdim in (256, 1536, 4096, 4352, 7168, 8192, 9000, 16384):
        space = [
            launch
            for _, launch in policy.norm_launch_space(
                kdim, device, scheme=scheme, params=params, residual=residual
            )
        ]
        assert len(space) == len(set(space))
        for rows in [*range(1, 70), *range(1000, 1100), *range(2000, 2100), 5000, 1 << 20]:
            launch = policy.norm_launch(
                kdim, rows, device, scheme=scheme, params=params, residual=residual
            )
            assert launch in space, (kdim, rows)


@pytest.mark.parametrize("scheme,params", [*SCHEMES, ("fp8_group", (64, True, None))])
@pytest.mark.parametrize("residual", [False, True])
def test_a_split_row_keeps_its_warps_and_whole_quant_groups(scheme, params, residual) -> None:
    """SPLIT changes nothing a row's bytes depend on: the warps (the sum order) are the unsplit
    record's, parts are powers of two holding whole quant groups (MXFP blocks and per-token
    parts: 32); no split beyond NORM_SPLIT_MAX_ROWS rows, or beyond the device's programs."""
    group = max(policy.quant_group(scheme, params), 32 if scheme else 1)
    for kdim in (256, 512, 1536, 4096, 7168, 8192, 16384):
        for rows in (1, 2, 7, policy.NORM_SPLIT_MAX_ROWS, policy.NORM_SPLIT_MAX_ROWS + 1, 4096):
            launch = policy.norm_launch(
                kdim, rows, PDL, scheme=scheme, params=params, residual=residual
            )
            unsplit = policy.norm_launch(
                kdim, rows, NO_PDL, scheme=scheme, params=params, residual=residual
            )
            assert unsplit.split == 1 and launch.num_warps == unsplit.num_warps
            assert launch.split & (launch.split - 1) == 0 and launch.split <= policy.NORM_MAX_SPLIT
            assert launch.grid(rows) == (rows * launch.split,)
            if launch.split > 1:
                assert rows <= policy.NORM_SPLIT_MAX_ROWS and launch.pieces == (0, 0, 0)
                assert (launch.block_k // launch.split) % group == 0
                assert rows * launch.split <= PDL.sm_count
    few = DeviceFacts(hip=False, pdl=True, prefetch_weight=True, sm_count=20)
    assert policy.norm_launch(7168, 4, few, scheme="mxfp4").split == 4  # 4 · 8 > 20 programs
    assert policy.norm_launch(7168, 4, PDL, scheme="mxfp4").split == 8


def test_device_facts_reach_the_record() -> None:
    """PDL and the weight prefetch as the device allows them; the FMA 1/rms steps on NVIDIA
    only and from INV_RMS_BY_FMA_MIN_EPS on; no prefetch without a weight."""
    on_pdl = policy.norm_launch(7168, 4, PDL, scheme="mxfp4")
    assert (on_pdl.use_pdl, on_pdl.prefetch_weight, on_pdl.inv_by_fma) == (True, True, True)
    assert not policy.norm_launch(7168, 4, PDL, has_weight=False).prefetch_weight
    on_rocm = policy.norm_launch(7168, 4, ROCM, scheme="mxfp4")
    assert (on_rocm.use_pdl, on_rocm.prefetch_weight, on_rocm.inv_by_fma) == (False,) * 3
    tiny = policy.INV_RMS_BY_FMA_MIN_EPS / 2
    assert policy.inv_rms_by_fma(PDL, policy.INV_RMS_BY_FMA_MIN_EPS)
    assert not policy.norm_launch(7168, 4, PDL, eps=tiny).inv_by_fma
    assert not policy.q_kv_launch(1536, 512, 4, PDL, q_eps=1e-6, kv_eps=tiny).inv_by_fma


def test_q_kv_pairs_only_rows_of_one_warp_count() -> None:
    """One launch has one warp count: widths whose standalone norms take different counts run as
    two launches (the record says so), so pairing never changes a row's sum order."""
    for k_q, k_kv in ((1536, 512), (2048, 512), (4096, 512), (7168, 512), (16384, 1024)):
        for rows in (1, 2, 2048, 4096):
            launch = policy.q_kv_launch(k_q, k_kv, rows, PDL)
            want = row_warps(next_power_of_2(k_q), rows) == row_warps(next_power_of_2(k_kv), rows)
            assert launch.paired == want, (k_q, k_kv, rows)
            assert launch.num_warps == row_warps(next_power_of_2(k_q), rows)


@pytest.mark.parametrize("band", policy.Q_KV_LOAD_BANDS)
def test_q_kv_load_bands_apply_inside_their_rows_only(band: policy.LoadBand) -> None:
    k_q = band.block_q
    scheme = "mxfp4" if band.quant else None
    lo, hi = band.rows
    for rows, inside in ((lo - 1, False), (lo, True), (hi, True), (hi + 1, False)):
        got = policy.q_kv_launch(k_q, 512, rows, PDL, scheme=scheme)
        # outside every band: the device's defaults
        others = [b for b in policy.Q_KV_LOAD_BANDS if b.rows[0] <= rows <= b.rows[1]]
        if inside:
            if band.prefetch_weight is not None:
                assert got.prefetch_weight == band.prefetch_weight
            if band.inv_by_fma is not None:
                assert got.inv_by_fma == band.inv_by_fma
        elif not others:
            assert (got.prefetch_weight, got.inv_by_fma) == (True, True), rows


@pytest.mark.parametrize("band", policy.Q_KV_Q_SPLIT)
def test_q_kv_splits_q_inside_its_band_only(band: policy.QSplitBand) -> None:
    """q's row goes in several programs for plain q inside the band's rows (one row per
    program, no pieces, the grid's second axis one wider per program), never with a quant."""
    k_q = band.block_q * 3 // 4  # a padded width of that block (1536 in 2048)
    lo, hi = band.rows
    for rows, inside in ((lo - 1, False), (lo, True), (hi, True), (hi + 1, False)):
        got = policy.q_kv_launch(k_q, 512, rows, PDL)
        assert got.q_split == (band.programs if inside else 1), rows
        assert got.grid(rows)[1] == got.q_split + 1
        if got.q_split > 1:
            assert got.rows_per_program == 1 and got.pieces == (0, 0, 0)
        assert policy.q_kv_launch(k_q, 512, rows, PDL, scheme="mxfp4").q_split == 1


def test_a_q_split_record_takes_one_row_per_program() -> None:
    with pytest.raises(ValueError, match="q_split=2 takes one row per program"):
        policy.QKvLaunch(True, 2048, 512, 8, rows_per_program=2, q_split=2)
    with pytest.raises(ValueError, match="no pieces"):
        policy.QKvLaunch(True, 2048, 512, 8, pieces=(1024, 512, 0), q_split=2)


def test_a_per_token_scale_splits_by_its_own_table() -> None:
    """Per-token rows take NORM_SPLIT_PER_TOKEN_BY_BLOCK's split: one row, then 2–16 rows."""
    per_token = ("fp8_per_token", (False, None))
    for block, (one_row, more) in policy.NORM_SPLIT_PER_TOKEN_BY_BLOCK.items():
        kdim = block * 7 // 8
        for rows, want in ((1, one_row), (2, more), (policy.NORM_SPLIT_MAX_ROWS, more)):
            got = policy.norm_launch(kdim, rows, PDL, scheme=per_token[0], params=per_token[1])
            assert got.split == want and got.int_amax, (block, rows)
        many = policy.NORM_SPLIT_MAX_ROWS + 1
        got = policy.norm_launch(kdim, many, PDL, scheme=per_token[0], params=per_token[1])
        assert (got.split, got.int_amax) == (1, False)


@pytest.mark.parametrize("residual", [False, True])
def test_the_one_max_amax_for_split_rows_and_mxfp4_without_residual(residual: bool) -> None:
    """INT_AMAX is the policy's, not a rule inside the kernel: every split quant row takes it,
    and MXFP4 without a residual at every row count (also q of q_kv, which has none); a norm
    without a quant never does."""
    schemes = (("mxfp4", ()), ("mxfp8", ()), ("fp8_group", (128, False, None)), (None, ()))
    for scheme, params in schemes:
        for rows in (*policy.ROW_BOUNDARIES, 4 * policy.MANY_ROWS):
            got = policy.norm_launch(7168, rows, PDL, scheme=scheme, params=params,
                                     residual=residual)  # fmt: skip
            always = scheme == "mxfp4" and not residual
            assert got.int_amax == (scheme is not None and (got.split > 1 or always)), (
                scheme, rows, got,
            )  # fmt: skip
    for rows in (1, 16, 4096):
        mxfp4 = policy.q_kv_launch(1536, 512, rows, PDL, scheme="mxfp4")
        fp8 = policy.q_kv_launch(1536, 512, rows, PDL, scheme="fp8_group", params=(128,))
        assert mxfp4.int_amax and not fp8.int_amax, rows
        assert not policy.q_kv_launch(1536, 512, rows, PDL).int_amax, rows


def test_all_reduce_launch_keeps_the_fused_ops_warps() -> None:
    """The one-shot kernel rounds a row as the fused add-norm op does: the same warps for the
    same rows; its split keeps every program resident."""
    for rows in (1, 2, 16, 17, 128, 129, 4096):
        launch = policy.all_reduce_launch(7168, rows, PDL, group=128, eps=1e-6)
        assert launch.num_warps == row_warps(8192, rows, residual=True)
        assert launch.grid[0] <= min(rows * launch.split, policy.ALL_REDUCE_MAX_PROGRAMS)


triton = pytest.importorskip("triton", reason="the calling conventions name the Triton kernels")


def _names(meta) -> list[str]:  # type: ignore[no-untyped-def]
    return [n for n, _ in meta]


def test_calling_conventions_name_the_kernels_parameters() -> None:
    """Runtime arguments in the kernel's order, then every constexpr, then launch options only:
    a parameter added to a kernel and not to its builder (or the reverse) fails here."""
    from fusion_ops.reference.norm import NormNumerics
    from fusion_ops.triton_backend import calls
    from fusion_ops.triton_backend import kernels as k

    consts = calls.scheme_constants("mxfp4", (), 8192)
    options = {"num_warps", "launch_pdl"}
    norm = calls.norm_quant_meta(policy.norm_launch(7168, 4, PDL), calls.NormFlags(), consts)
    q_kv = calls.q_kv_meta(policy.q_kv_launch(1536, 512, 4, PDL), True, False, consts)
    ar = calls.all_reduce_meta(
        policy.all_reduce_launch(7168, 4, PDL, group=32, eps=1e-6), 2, 16, True, True,
        NormNumerics(), consts,
    )  # fmt: skip
    for kernel, args, meta in (
        (k.norm_quant_kernel, calls.NORM_QUANT_ARGS, norm),
        (k.q_kv_norm_quant_kernel, calls.Q_KV_ARGS, q_kv),
        (k.all_reduce_norm_quant_kernel, calls.ALL_REDUCE_ARGS, ar),
    ):
        names = _names(meta)
        constexprs = [kernel.arg_names[i] for i in sorted(kernel.constexprs)]
        assert list(args) + [n for n in names if n not in options] == kernel.arg_names
        assert sorted(set(names) - set(constexprs)) == sorted(options), kernel.__name__
    chain = _names(calls.chain_meta(policy.chain_launch(512, 4, PDL, 1e-6), hip=False))
    for kernel in (k.norm_rope_cache_kernel, k.qnorm_rope_cache_kernel):
        constexprs = {kernel.arg_names[i] for i in kernel.constexprs}
        assert set(chain) - options <= constexprs, kernel.__name__
    assert len(calls.norm_quant_args(*range(11), consts)) == len(calls.NORM_QUANT_ARGS)


@pytest.mark.parametrize("block_size", [1, 2, 3, 6, 16, 64, 256])
def test_dequant_tiles_divide_the_cache_block(block_size: int) -> None:
    """Every record's tile is a power of two that divides the block, so the kernel covers each
    block exactly (no fallback to the reference) and never reads past it."""
    launch = policy.dequant_launch(block_size)
    assert launch.tokens & (launch.tokens - 1) == 0 and block_size % launch.tokens == 0
    assert launch.tokens <= policy.DEQUANT_DSV4_TOKENS
    assert launch.grid(5, block_size) == (5, block_size // launch.tokens)
