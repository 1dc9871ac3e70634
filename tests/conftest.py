from __future__ import annotations

import pytest
import torch

import fusion_ops  # noqa: F401  (defines torch.ops.fusion_ops)


@pytest.fixture(scope="session")
def full_pass_session():
    from fusion_passes import FusionPass

    return FusionPass(keep_graphs=True)


@pytest.fixture
def full_pass(full_pass_session):
    """FusionPass() with every family and scheme, accounting reset for this test."""
    full_pass_session.reset()
    yield full_pass_session
    full_pass_session.reset()


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
