"""Triton kernels run by Triton's interpreter on the CPU: launch choices that must not change the
bytes, checked where no GPU is (the GPU suite compares the same against the reference).

The interpreter's own float semantics differ from a GPU's around NaN and FP8 conversions, so
these tests compare launches with each other, not with the reference.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import fusion_ops
from fusion_ops import launch_policy as policy

triton = pytest.importorskip("triton", reason="needs triton (CI installs it)")
knobs = pytest.importorskip("triton.knobs", reason="needs a Triton with knobs (3.4+)")

KERNELS = Path(fusion_ops.__file__).parent / "triton_backend" / "kernels"


@pytest.fixture(scope="module")
def interpreted() -> ModuleType:
    """fusion_ops' kernels module loaded again with the interpreter on: its @triton.jit
    functions become interpreted functions that run on CPU tensors."""
    name = "fusion_ops_interpreted_kernels"
    spec = importlib.util.spec_from_file_location(
        name, KERNELS / "__init__.py", submodule_search_locations=[str(KERNELS)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    previous = knobs.runtime.interpret
    knobs.runtime.interpret = True
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        knobs.runtime.interpret = previous
    return module


@pytest.mark.parametrize("fp8", [False, True])
def test_dequant_bytes_do_not_depend_on_the_tile(interpreted: ModuleType, fp8: bool) -> None:
    """dequant_dsv4_kernel with every tile of a 64-token block (1–32 tokens per program, 1 or 4
    warps) writes the same bytes as the policy's record, rows of out-of-range block ids are
    zeros, and every output row is written (none keeps the fill)."""
    torch.manual_seed(0)
    blocks, block_size = 6, 64
    cache = fusion_ops.alloc_mla_cache(blocks, block_size, device="cpu")
    cache.random_(0, 256)
    ids = torch.tensor([3, 0, 5, blocks, -1])  # the last two out of range
    out_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    bits_dtype = torch.uint8 if fp8 else torch.int16

    def run(launch: policy.DequantLaunch) -> torch.Tensor:
        out = torch.full((len(ids) * block_size, 512), 7.0).to(out_dtype)
        interpreted.dequant_dsv4_kernel[launch.grid(len(ids), block_size)](
            cache, ids, out, cache.stride(0), blocks, 448.0 if fp8 else 0.0,
            BS=block_size, TOK=launch.tokens, TO_FP8=fp8, num_warps=launch.num_warps,
        )  # fmt: skip
        return out.view(bits_dtype)

    want = run(policy.dequant_launch(block_size))
    assert (want[3 * block_size :] == 0).all(), "out-of-range blocks must read as zeros"
    fill = torch.full((1,), 7.0).to(out_dtype).view(bits_dtype)
    assert not (want[: 3 * block_size] == fill).all(dim=-1).any(), "a row was not written"
    for tokens in (1, 2, 8, 16, 32):
        for warps in (1, 4):
            got = run(policy.DequantLaunch(tokens=tokens, num_warps=warps))
            assert torch.equal(got, want), (tokens, warps)
