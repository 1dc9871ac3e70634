"""norm_quant_kernel with a row split over programs (decode sizes, launch_policy's
``NormLaunch.split``) writes the bytes of the one-program launch, for every scheme, residual
and flag (run on a GPU: pytest -m gpu). The policy's own choice at 1–16 rows is also checked
against the reference backend by tests/gpu/test_triton_kernels.py."""

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
    if scheme is not None and policy.quant_group(scheme, params) == 0:
        pytest.skip("a per-token scale is the whole row's: never split")
    expected = outputs(x, r, w, scheme, params, base)
    for split in (2, 4, 8):
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
