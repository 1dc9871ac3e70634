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
