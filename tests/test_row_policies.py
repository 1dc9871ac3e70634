"""The Triton backend's launch policies that decide rounding or only speed, checked on CPU:
warps per row program (they set a row's sum order) and the unpadded pieces of a row (speed
only: the pieces must tile the row with whole quant blocks)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="the policies live in the Triton backend")
from fusion_ops.triton_backend import (  # noqa: E402
    MANY_ROWS,
    _num_warps,
    _pieces,
    _q_kv_rows_per_program,
    next_power_of_2,
    warps_depend_on_row_count,
)

WIDTHS = range(32, 16384 + 1, 32)


@pytest.mark.parametrize("residual", [False, True])
def test_warps_change_with_the_row_count_only_where_declared(residual: bool) -> None:
    """Beyond the lone row, the warps follow the row count exactly where
    warps_depend_on_row_count says (what FusionPass(inductor_launch=True) relies on)."""
    for block in sorted({next_power_of_2(k) for k in WIDTHS}):
        counts = {_num_warps(block, rows, residual) for rows in (2, 3, MANY_ROWS - 1, MANY_ROWS)}
        assert (len(counts) > 1) == warps_depend_on_row_count(block, residual), block
        assert _num_warps(block, 1, residual) >= max(counts)  # a lone row: never fewer


@pytest.mark.parametrize(
    "scheme,params,group",
    [("mxfp4", (), 32), ("mxfp8", (), 32), ("fp8_group", (128, False, None), 128),
     ("fp8_group", (64, True, None), 64)],
)  # fmt: skip
def test_pieces_tile_the_row_with_whole_quant_blocks(scheme, params, group) -> None:
    for kdim in range(group, 16384 + 1, group):
        block = next_power_of_2(kdim)
        pieces = [p for p in _pieces(kdim, block, 1 << 20, scheme, params, False) if p]
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
    assert _pieces(7168, 8192, MANY_ROWS, "mxfp4", (), False) == want
    assert _pieces(7168, 8192, MANY_ROWS - 1, "mxfp4", (), False) == (0, 0, 0)
    assert _pieces(7168, 8192, 1024, "fp8_group", (128, False, None), False) == want
    assert _pieces(7168, 8192, MANY_ROWS, "mxfp4", (), True) == (0, 0, 0)  # residual
    assert _pieces(7168, 8192, MANY_ROWS, None, (), False) == (0, 0, 0)  # norm alone
    assert _pieces(7168, 8192, MANY_ROWS, "fp8_per_token", (False, None), False) == (0, 0, 0)


def test_q_kv_rows_per_program() -> None:
    assert [_q_kv_rows_per_program(1024, m, False) for m in (1, 1023, 1024)] == [1, 1, 2]
    for block, quant in ((1024, True), (2048, False), (2048, True)):
        assert [_q_kv_rows_per_program(block, m, quant) for m in (1024, 2047, 2048)] == [1, 1, 2]
    assert _q_kv_rows_per_program(8192, 1 << 16, False) == 1  # wide rows: one per program
