"""norm_quant_kernel with a row split over programs (decode sizes, launch_policy's
``NormLaunch.split``) writes the bytes of the one-program launch, for every scheme (a per-token
scale included), residual and flag, and so does q_kv_norm with q's row split
(``QKvLaunch.q_split``) (run on a GPU: pytest -m gpu). The policy's own choice at 1–16 rows is
also checked against the reference backend by tests/gpu/test_triton_kernels.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import fusion_ops.triton_backend as triton_backend
from fusion_ops import launch_policy as policy
from fusion_ops.reference.norm import NormNumerics
from tests.gpu.kernel_cases import DEV, SCHEME_PARAMS, activations, assert_same

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU"),
]
EPS = 1e-6


def run(x, r, w, scheme, params, launch, numerics=None, weightless=False):  # type: ignore[no-untyped-def]
    numerics = numerics or NormNumerics()
    return triton_backend.norm_quant(
        x, r, w, EPS, scheme, params, True, numerics, weightless=weightless, launch=launch
    )


def outputs(*a, **k):  # type: ignore[no-untyped-def]
    return [t for t in run(*a, **k) if t is not None]


# one and a few rows (other warps), a padded width (1536 in a 2048 block) at 16 rows
@pytest.mark.parametrize("kdim,rows", [(512, 1), (512, 5), (1536, 16), (7168, 1), (7168, 5)])
@pytest.mark.parametrize("scheme,params", [(None, ()), *SCHEME_PARAMS])
@pytest.mark.parametrize("residual", [False, True])
def test_split_rows_write_the_bytes_of_one_program(kdim, rows, scheme, params, residual) -> None:
    x = activations(rows, kdim, torch.bfloat16, seed=kdim + rows)
    r = activations(rows, kdim, torch.bfloat16, seed=7 * rows, specials=False) if residual else None
    w = (1 + 0.1 * torch.randn(kdim, device=DEV)).to(torch.bfloat16)
    device = triton_backend.device_facts(0)
    base = replace(
        policy.norm_launch(kdim, rows, device, scheme=scheme, params=params, residual=residual),
        split=1,
    )
    group = max(policy.quant_group(scheme, params), 32 if scheme else 1)
    expected = outputs(x, r, w, scheme, params, base)
    for split in (2, 4, 8, 16):
        if base.block_k // split < group:
            continue
        got = outputs(x, r, w, scheme, params, replace(base, split=split))
        assert_same(got, expected, f"split {split}")
    numerics = NormNumerics(False, True, residual)  # other libraries' rounding points
    expected = outputs(x, r, w, scheme, params, base, numerics)
    assert_same(
        outputs(x, r, w, scheme, params, replace(base, split=4), numerics), expected, "flags"
    )


@pytest.mark.parametrize("kdim", [512, 7168])
def test_split_weightless_and_quant_alone(kdim) -> None:
    x = activations(3, kdim, torch.bfloat16, seed=1)
    base = replace(policy.norm_launch(kdim, 3, triton_backend.device_facts(0)), split=1)
    for split in (2, 8):
        launch = replace(base, split=split)
        assert_same(
            outputs(x, None, None, None, (), launch, weightless=True),
            outputs(x, None, None, None, (), base, weightless=True),
            f"weightless split {split}",
        )
        assert_same(
            outputs(x, None, None, "mxfp4", (), launch),
            outputs(x, None, None, "mxfp4", (), base),
            f"mxfp4_quant split {split}",
        )


@pytest.mark.parametrize("k_q", [1024, 1536])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("scheme,params", [(None, ()), *SCHEME_PARAMS])
def test_q_kv_with_q_split_writes_the_bytes_of_one_program(k_q, rows, scheme, params) -> None:
    q = activations(rows, k_q, torch.bfloat16, seed=k_q + rows)
    kv = activations(rows, 512, torch.bfloat16, seed=3 * rows, specials=False)
    wq = (1 + 0.1 * torch.randn(k_q, device=DEV)).to(torch.bfloat16)
    wkv = (1 + 0.1 * torch.randn(512, device=DEV)).to(torch.bfloat16)
    device = triton_backend.device_facts(0)
    base = replace(
        policy.q_kv_launch(k_q, 512, rows, device, scheme=scheme, params=params), q_split=1
    )
    assert base.paired and base.rows_per_program == 1 and base.pieces == (0, 0, 0)

    def run_q_kv(launch: policy.QKvLaunch) -> list[torch.Tensor]:
        out = triton_backend.q_kv_norm(q, wq, EPS, kv, wkv, EPS, scheme, params, launch=launch)
        return [t for t in out if t is not None]

    expected = run_q_kv(base)
    for q_split in (2, 4):
        assert_same(run_q_kv(replace(base, q_split=q_split)), expected, f"q_split {q_split}")
