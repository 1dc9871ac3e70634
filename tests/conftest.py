from __future__ import annotations

import importlib.util

import pytest
import torch

import fusion_ops  # noqa: F401  (defines torch.ops.fusion_ops)

# The vLLM test imports vLLM at module level; without vLLM it is not collected at all, so that
# `pytest -m vllm` in an environment lacking vLLM collects nothing and fails (exit code 5).
VLLM_TEST_FILES = ["test_vllm_integration.py", "test_vllm_quant_fp8.py", "test_vllm_all_reduce.py"]
collect_ignore = [] if importlib.util.find_spec("vllm") else [*VLLM_TEST_FILES, "vllm_support.py"]


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
