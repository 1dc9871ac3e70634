"""``python -m fusion_passes report``: bad flags, devices and paths end in one clear line (exit 2),
before anything heavy runs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def report(*flags: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fusion_passes", "report", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--layers", "0"), "argument --layers: expected a positive integer, got 0"),
        (("--layers", "-1"), "argument --layers: expected a positive integer, got -1"),
        (("--batch", "0"), "argument --batch: expected a positive integer, got 0"),
        (("--dump-dir", "/proc/fusion_passes"), "--dump-dir /proc/fusion_passes: cannot write"),
        (("--device", "tpu"), "--device tpu: expected cpu or cuda[:N]"),
        (("--preset", "huge"), "argument --preset: invalid choice: 'huge'"),
    ],
)
def test_bad_flags_end_in_one_line(flags: tuple[str, ...], message: str) -> None:
    done = report(*flags)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr.strip().splitlines()[-1], done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA device")
def test_cuda_on_a_machine_without_one() -> None:
    done = report("--device", "cuda")
    assert done.returncode == 2
    assert "--device cuda: torch" in done.stderr and "sees no CUDA device" in done.stderr


def test_a_model_that_does_not_fit_is_refused_with_an_estimate() -> None:
    done = report("--preset", "pro", "--layers", "61")  # far above any CI machine's memory
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--preset pro with 61 layers needs about" in done.stderr
    assert "GB of weights" in done.stderr


def test_table_rows_hold_only_their_family(capsys) -> None:
    """A family's row shows its own matches and near misses; op counts (an op like rms_norm feeds
    several families) appear once, for the whole run."""
    from fusion_passes import FusionPass
    from fusion_passes.accounting import GraphRecord
    from fusion_passes.report import _print_table
    from patterns import FAMILIES, NearMiss

    p = FusionPass()
    matches = {"rms_quant/mxfp4/bf16": 3, "add_rms_quant/mxfp4/bf16": 2}
    p.match_table.update(matches)
    p.graphs.append(
        GraphRecord(
            index=0,
            matches=matches,
            ops_before={"rms_norm": 4, "fused_add_rms_norm": 2, "mxfp4_quant": 5},
            ops_after={"rms_norm": 1, "rms_norm_mxfp4_quant": 3, "add_rms_norm_mxfp4_quant": 2},
            near_misses=[NearMiss("rms_quant", "rms_norm_1", "rms_norm", "why")],
            ms=1.0,
        )
    )
    _print_table(p)
    lines = capsys.readouterr().out.splitlines()
    row = {line.split()[0]: line.split()[1:] for line in lines[3 : 3 + len(FAMILIES) + 1]}
    assert row["rms_quant/mxfp4/bf16"] == ["3", "1"]
    assert row["add_rms_quant/mxfp4/bf16"] == ["2", "-"]
    assert row["add_rms"] == ["(no", "match)", "0", "-"]
    totals = [line for line in lines if "rms_norm 4→1" in line]
    assert len(totals) == 1 and "mxfp4_quant 5→0" in totals[0]
    assert "total matches: 5 in 1 graphs" in lines
