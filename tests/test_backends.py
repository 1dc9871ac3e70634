"""Backend selection and its override (API and environment variable)."""

from __future__ import annotations

import pytest
import torch

import fusion_ops
from fusion_ops import backends

ops = torch.ops.fusion_ops


def test_cpu_tensors_run_the_reference_backend() -> None:
    ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
    assert fusion_ops.last_backend("rms_norm") == "reference"
    assert fusion_ops.select_backend("mxfp4_quant", torch.device("cpu")) == "reference"


def test_forcing_a_backend_that_cannot_run_here_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    backends.register_impl("rms_norm", "triton")(lambda *a: None)  # a stand-in kernel
    try:
        with fusion_ops.use_backend("triton"):
            with pytest.raises(RuntimeError, match="backend 'triton' is forced but cannot run"):
                ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
        monkeypatch.setenv(backends.ENV_VAR, "triton")
        with pytest.raises(RuntimeError, match="cannot run on device cpu"):
            ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
        with fusion_ops.use_backend("reference"):  # the API wins over the variable
            ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
    finally:
        del backends._IMPLS["rms_norm"]["triton"]


def test_forcing_a_backend_without_the_op_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backends.ENV_VAR, "aiter")
    with pytest.raises(NotImplementedError, match="'aiter' is forced but has no implementation"):
        ops.mxfp4_quant(torch.randn(2, 32))


def test_bad_override_values_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        fusion_ops.set_backend("cuda")
    monkeypatch.setenv(backends.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="FUSION_OPS_BACKEND='fast'"):
        ops.mxfp4_quant(torch.randn(2, 32))
    monkeypatch.setenv(backends.ENV_VAR, "auto")
    ops.mxfp4_quant(torch.randn(2, 32))
    assert fusion_ops.last_backend("mxfp4_quant") == "reference"
