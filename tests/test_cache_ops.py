"""MLA cache write / dequant: exact bytes, untouched bytes, round trip, FP8 overflow."""

from __future__ import annotations

import math

import pytest
import torch

import fusion_ops
import fusion_ops.reference.cache
from fusion_ops.formats import DSV4_SLOT_BYTES, dsv4_padded_block_bytes
from tests import oracles

ops = torch.ops.fusion_ops


def random_kv(tokens: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-3, 2, 512) * scale  # tiles of very different magnitude
    return (torch.randn(tokens, 512, generator=g) * spread).to(torch.bfloat16)


def expected_cache_bytes(
    before: torch.Tensor, kv: torch.Tensor, slots: list[int], block_size: int
) -> bytearray:
    """Whole-storage bytes after writing kv to slots, built token by token with the oracle."""
    stride = before.stride(0)
    flat = before.as_strided((before.shape[0], stride), (stride, 1))
    storage = bytearray(bytes(flat.reshape(-1).tolist()))
    for t, slot in enumerate(slots):
        if slot < 0:
            continue
        block, off = divmod(slot, block_size)
        rope_bytes = bytes(kv[t, 448:].contiguous().view(torch.uint8).tolist())
        data, scales = oracles.dsv4_encode_token(kv[t].float().tolist(), rope_bytes)
        base = block * stride
        storage[base + off * 576 : base + off * 576 + 576] = data
        s0 = base + block_size * 576 + off * 8
        storage[s0 : s0 + 8] = scales
    return storage


def storage_bytes(cache: torch.Tensor) -> bytearray:
    stride = cache.stride(0)
    flat = cache.as_strided((cache.shape[0], stride), (stride, 1))
    return bytearray(bytes(flat.reshape(-1).tolist()))


@pytest.mark.parametrize("padded", [False, True])
def test_dsv4_write_bytes_exact_and_nothing_else_touched(padded: bool) -> None:
    num_blocks, block_size = 3, 16
    cache = fusion_ops.alloc_mla_cache(num_blocks, block_size, padded=padded)
    # fill every byte (padding included) with a pattern the write must not disturb
    stride = cache.stride(0)
    base = cache.as_strided((num_blocks, stride), (stride, 1))
    base.copy_(torch.randint(0, 256, base.shape, dtype=torch.uint8))
    snapshot = storage_bytes(cache)
    kv = random_kv(7)
    slots = [0, 17, -1, 47, 5, -3, 31]
    want = expected_cache_bytes(cache, kv, slots, block_size)
    assert want != snapshot
    ops.mla_cache_write(kv, cache, torch.tensor(slots), "dsv4_fp8")
    assert storage_bytes(cache) == want


def test_bf16_layout_write_and_dequant() -> None:
    cache = fusion_ops.alloc_mla_cache(2, 4, layout="bf16", head_dim=64)
    cache.normal_()
    before = cache.clone()
    kv = torch.randn(3, 64, dtype=torch.bfloat16)
    ops.mla_cache_write(kv, cache, torch.tensor([6, -1, 1]), "bf16")
    expect = before.clone()
    expect[1, 2] = kv[0]
    expect[0, 1] = kv[2]
    assert torch.equal(cache, expect)
    out = ops.dequant_cache(cache, torch.tensor([1, 0]), "bf16")
    assert torch.equal(out, torch.cat((expect[1], expect[0])))


@pytest.mark.parametrize("scale", [1.0, 1e-3, 300.0])
def test_dsv4_round_trip_within_format_error(scale: float) -> None:
    cache = fusion_ops.alloc_mla_cache(2, 8)
    kv = random_kv(16, seed=3, scale=scale)
    ops.mla_cache_write(kv, cache, torch.arange(16), "dsv4_fp8")
    out = ops.dequant_cache(cache, torch.tensor([0, 1]), "dsv4_fp8")
    assert out.dtype == torch.bfloat16 and out.shape == (16, 512)
    assert torch.equal(out[:, 448:], kv[:, 448:])  # RoPE part stored exactly
    # e4m3 has 3 mantissa bits: relative error ≤ 2^-4 of the tile's scale·448 range; values under
    # the smallest subnormal step of their tile may flush to 0
    nope_in = kv[:, :448].float().reshape(16, 7, 64)
    nope_out = out[:, :448].float().reshape(16, 7, 64)
    amax = nope_in.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    step = 2.0 ** torch.ceil(torch.log2(amax / 448.0)) * 2.0**-9  # e4m3 smallest subnormal
    bound = torch.maximum(nope_in.abs() * 2.0**-4, step)
    assert ((nope_out - nope_in).abs() <= bound).all()


def test_dequant_reads_only_requested_blocks_in_given_order() -> None:
    cache = fusion_ops.alloc_mla_cache(4, 8, padded=True)
    kv = random_kv(32, seed=5)
    ops.mla_cache_write(kv, cache, torch.arange(32), "dsv4_fp8")
    full = ops.dequant_cache(cache, torch.arange(4), "dsv4_fp8")
    picked = ops.dequant_cache(cache, torch.tensor([3, 1, 3]), "dsv4_fp8")
    assert picked.shape == (24, 512)
    assert torch.equal(picked, torch.cat((full[24:32], full[8:16], full[24:32])))
    assert ops.dequant_cache(cache, torch.tensor([], dtype=torch.long), "dsv4_fp8").shape == (
        0,
        512,
    )


def test_dequant_scale_byte_semantics() -> None:
    """Scale byte b multiplies by 2^(b−127) exactly; 255 decodes to NaN; values above 448 occur."""
    cache = fusion_ops.alloc_mla_cache(1, 4)
    rows = fusion_ops.reference.cache.block_rows(cache)  # raw byte access for the test
    one = int(torch.tensor([1.0]).to(torch.float8_e4m3fn).view(torch.uint8))
    rows[0, 0:448] = one  # token 0 NoPE codes all 1.0
    rows[0, 4 * 576 : 4 * 576 + 7] = torch.tensor(
        [127, 128, 137, 0, 200, 255, 126], dtype=torch.uint8
    )
    out = ops.dequant_cache(cache, torch.tensor([0]), "dsv4_fp8")[0, :448].float().reshape(7, 64)
    assert out[:, 0].tolist()[:5] == [1.0, 2.0, 1024.0, 2.0**-127, 2.0**73]
    assert math.isnan(out[5, 0].item()) and out[6, 0].item() == 0.5


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
def test_dequant_cache_fp8_overflow_matches_compiled_cast(fp8_dtype: torch.dtype) -> None:
    """dequant_cache_fp8 == torch.compile'd (dequant_cache → .to(fp8)) on this device, overflow
    included: scale bytes above 127 give values far above 448 (and above fnuz's 240)."""
    cache = fusion_ops.alloc_mla_cache(2, 4)
    kv = random_kv(8, seed=9, scale=10.0)
    ops.mla_cache_write(kv, cache, torch.arange(8), "dsv4_fp8")
    rows = fusion_ops.reference.cache.block_rows(cache)
    rows[0, 4 * 576 : 4 * 576 + 7] = torch.tensor([130, 140, 200, 127, 120, 255, 254])
    ids = torch.tensor([0, 1])

    def unfused(c: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ops.dequant_cache(c, b, "dsv4_fp8").to(fp8_dtype)

    compiled = torch.compile(unfused, fullgraph=True)(cache, ids)
    fused = ops.dequant_cache_fp8(cache, ids, "dsv4_fp8", fp8_dtype)
    assert torch.equal(fused.view(torch.uint8), compiled.view(torch.uint8))
    deq = ops.dequant_cache(cache, ids, "dsv4_fp8").float()
    assert (deq[:, :448].abs() > 448).any()  # the overflow case really is exercised
    fmax = torch.finfo(fp8_dtype).max
    if fp8_dtype == torch.float8_e4m3fn:  # saturates; NaN only where the scale byte was 255
        assert fused.float()[deq.abs() > fmax].abs().eq(fmax).all()
        assert torch.equal(fused.float().isnan(), deq.isnan())
    else:  # CPU: rounding past 240 gives NaN (measured in eager and compiled alike)
        assert fused.float()[deq.abs() >= 248].isnan().all()


def test_padded_stride_is_vllms() -> None:
    assert dsv4_padded_block_bytes(64) == 37440
    cache = fusion_ops.alloc_mla_cache(2, 64, padded=True)
    assert cache.stride() == (37440, DSV4_SLOT_BYTES, 1)


def test_nonfinite_tile_encodes_nan() -> None:
    cache = fusion_ops.alloc_mla_cache(1, 2)
    kv = random_kv(2, seed=11)
    kv[0, 70] = float("inf")
    kv[1, 3] = float("nan")
    ops.mla_cache_write(kv, cache, torch.tensor([0, 1]), "dsv4_fp8")
    out = ops.dequant_cache(cache, torch.tensor([0]), "dsv4_fp8").float()
    assert out[0, 64:128].isnan().all() and not out[0, :64].isnan().any()
    assert out[1, 0:64].isnan().all() and not out[1, 64:448].isnan().any()
    want = expected_cache_bytes(fusion_ops.alloc_mla_cache(1, 2), kv, [0, 1], 2)
    assert storage_bytes(cache) == want
