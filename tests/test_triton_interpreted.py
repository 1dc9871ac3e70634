"""Triton kernels run by Triton's interpreter on the CPU: launch choices that must not change the
bytes, checked where no GPU is (the GPU suite compares the same against the reference).

The interpreter's own float semantics differ from a GPU's around NaN and FP8 conversions, so
these tests compare launches with each other, not with the reference.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import fusion_ops
from fusion_ops import launch_policy as policy

triton = pytest.importorskip("triton", reason="needs triton (CI installs it)")
knobs = pytest.importorskip("triton.knobs", reason="needs a Triton with knobs (3.4+)")

KERNELS = Path(fusion_ops.__file__).parent / "triton_backend" / "kernels"
# numpy's own warnings where the interpreter computes an inf (large rows, NaN/inf payloads)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


@pytest.fixture(scope="module")
def interpreted() -> Iterator[ModuleType]:
    """fusion_ops' kernels module loaded again with the interpreter on: its @triton.jit
    functions become interpreted functions that run on CPU tensors. triton.language's own jit
    functions (tl.sum, tl.max, ...) were made when Triton was imported, interpreter off: while
    the fixture lives, ``tl`` names interpreted copies of them."""
    from triton import language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

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
    # the interpreter patches triton.language's modules while it runs a function and does not
    # restore all of it for nested interpreted functions: put every attribute back afterwards,
    # so kernels compiled later in this process see the real language
    spaces = (tl, tl.core, tl.standard, tl.math, tl.tensor, tl.dtype)
    saved = [(space, dict(vars(space))) for space in spaces]
    try:
        with pytest.MonkeyPatch.context() as patch:
            for attr in dir(tl):
                member = getattr(tl, attr)
                if isinstance(member, JITFunction):
                    patch.setattr(tl, attr, InterpretedFunction(member.fn))
            yield module
    finally:
        for space, attrs in saved:
            for attr, value in attrs.items():
                if vars(space).get(attr) is not value:
                    setattr(space, attr, value)


_TRITON = tuple(int(part) for part in triton.__version__.split(".")[:2])


@pytest.mark.skipif(
    _TRITON >= (3, 9),
    reason="Triton 3.9's interpreter rejects a load mask of a tensor & a scalar bool ('mask has "
    "unsupported dtype'); compiled kernels take it (the compile check builds this one)",
)
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


_SPLIT_SCHEMES = {  # name -> (scheme, params)
    "norm": (None, ()),
    "mxfp4": ("mxfp4", ()),
    "fp8_group128": ("fp8_group", (128, False, torch.float8_e4m3fn)),
    "fp8_per_token": ("fp8_per_token", (False, torch.float8_e4m3fn)),
}
_NO_GPU = policy.DeviceFacts(hip=False, pdl=False, prefetch_weight=False, sm_count=132)


def _launcher(kernel: Any) -> Any:
    """A launcher's stand-in (grid, runtime args, meta) that runs ``kernel`` interpreted (the
    interpreter takes no ``launch_pdl``; the records here have PDL off)."""

    def launch(grid: tuple[int, ...], args: tuple[Any, ...], meta: Any) -> None:
        kernel[grid](*args, **{key: value for key, value in meta if key != "launch_pdl"})

    return launch


def _assert_same_bytes(got: tuple[Any, ...], want: tuple[Any, ...], parts: tuple[str, ...],
                       label: str) -> None:  # fmt: skip
    for a, b, part in zip(got, want, parts, strict=True):
        assert (a is None) == (b is None), (label, part)
        if a is not None:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (label, part)


def _norm_variants(
    base: policy.NormLaunch, kdim: int, scheme: str | None, params: tuple[Any, ...], res: bool
) -> dict[str, policy.NormLaunch]:
    """Every speed-only choice of a NormLaunch against ``base`` (one program per row, one
    padded block): a row over 2–16 programs, unpadded pieces (block quants without a residual),
    the other amax reduction, the weight loaded first."""
    out = {}
    for split in (2, 4, 8, 16):
        if base.block_k // split >= policy.smallest_part(scheme, params):
            one_max = policy.amax_by_one_max(split, scheme, res)
            out[f"split {split}"] = replace(base, split=split, int_amax=one_max)
    pieces = policy.row_pieces(kdim, policy.MANY_ROWS, scheme, params, res)
    if pieces[0]:
        out[f"pieces {pieces}"] = replace(base, pieces=pieces)
    if scheme is not None:
        out["other amax reduction"] = replace(base, int_amax=not base.int_amax)
    out["weight first"] = replace(base, prefetch_weight=True)
    return out


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("name", sorted(_SPLIT_SCHEMES))
def test_speed_only_launch_choices_keep_the_bytes(
    interpreted: ModuleType, monkeypatch: pytest.MonkeyPatch, name: str, residual: bool
) -> None:
    """norm_quant_kernel launched with each speed-only choice of its record (_norm_variants;
    the decode-size split among them) writes the bytes of one program per row: the normed row,
    residual_out, codes and scales (a NaN block, group and row included), through the op's own
    launcher with the interpreted kernel in place of the compiled one."""
    from fusion_ops.triton_backend import norms

    monkeypatch.setattr(norms, "_norm_quant_launch", _launcher(interpreted.norm_quant_kernel))
    scheme, params = _SPLIT_SCHEMES[name]
    torch.manual_seed(0)
    kdim, rows = 1792, 3  # one padded block of 2048 (parts of 1024 … 128), or pieces 1024+512+256
    x = torch.randn(rows, kdim).to(torch.bfloat16)
    x[1, 17] = float("nan")  # a NaN block / group / row
    x[2] *= 1e4
    r = torch.randn_like(x) if residual else None
    w = (1 + 0.1 * torch.randn(kdim)).to(torch.bfloat16)
    base = policy.norm_launch(kdim, rows, _NO_GPU, scheme=scheme, params=params, residual=residual)
    base = replace(base, split=1, int_amax=policy.amax_by_one_max(1, scheme, residual))
    base = replace(base, inv_by_fma=False)  # its seeds are PTX: the interpreter runs no PTX
    want = norms.norm_quant(x, r, w, 1e-6, scheme, params, scheme is None, launch=base)
    variants = _norm_variants(base, kdim, scheme, params, residual)
    assert any(label.startswith("split") for label in variants)
    assert any(label.startswith("pieces") for label in variants) == (
        scheme in ("mxfp4", "fp8_group") and not residual
    )
    for label, forced in variants.items():
        got = norms.norm_quant(x, r, w, 1e-6, scheme, params, scheme is None, launch=forced)
        _assert_same_bytes(got, want, ("y", "residual_out", "codes", "scales"), label)


@pytest.mark.parametrize("name", sorted(_SPLIT_SCHEMES))
def test_q_kv_speed_only_launch_choices_keep_the_bytes(
    interpreted: ModuleType, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """q_kv_norm_quant_kernel with q's row over 2 or 4 programs (Q_SPLIT), two rows per program,
    q in pieces (with a quant), or the weights loaded first writes the bytes of one program per
    row (normed q or its codes and scales, and the normed kv)."""
    from fusion_ops.triton_backend import norms

    monkeypatch.setattr(norms, "_q_kv_launch", _launcher(interpreted.q_kv_norm_quant_kernel))
    scheme, params = _SPLIT_SCHEMES[name]
    torch.manual_seed(0)
    q = torch.randn(3, 1536).to(torch.bfloat16)
    kv = torch.randn(3, 512).to(torch.bfloat16)
    q[1, 40] = float("nan")
    wq = (1 + 0.1 * torch.randn(1536)).to(torch.bfloat16)
    wkv = (1 + 0.1 * torch.randn(512)).to(torch.bfloat16)
    base = policy.q_kv_launch(1536, 512, 3, _NO_GPU, scheme=scheme, params=params)
    base = replace(base, inv_by_fma=False, q_split=1, rows_per_program=1)  # (FMA seeds: PTX)
    want = norms.q_kv_norm(q, wq, 1e-6, kv, wkv, 1e-6, scheme, params, launch=base)
    variants = {
        "q split 2": replace(base, q_split=2),
        "q split 4": replace(base, q_split=4),
        "2 rows per program": replace(base, rows_per_program=2),
        "weights first": replace(base, prefetch_weight=True),
    }
    if scheme is not None and policy.quant_group(scheme, params):
        variants["q in pieces"] = replace(base, pieces=(1024, 512, 0))
    for label, forced in variants.items():
        got = norms.q_kv_norm(q, wq, 1e-6, kv, wkv, 1e-6, scheme, params, launch=forced)
        _assert_same_bytes(got, want, ("q", "codes", "scales", "kv"), label)
