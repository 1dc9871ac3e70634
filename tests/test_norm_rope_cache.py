"""norm_rope_cache: the compressor's norm → cast → rope → cache write in one op. Fires exactly
where expected, never where it must not, keeps every byte."""

from __future__ import annotations

import pytest
import torch

from fusion_passes.testing import (
    assert_bitwise_equal,
    assert_fully_replaced,
    assert_ops_present,
    near_miss_reasons,
    run_compiled,
)
from tests.cache_inputs import target_cache

ops = torch.ops.fusion_ops
FN = torch.float8_e4m3fn


def compressor_case(layout: str, x_dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pooled = (torch.randn(4, 512, generator=g) * 3).to(x_dtype)
    weight = (1 + 0.1 * torch.randn(512, generator=g)).to(x_dtype)
    cos_sin = torch.randn(32, 64, generator=g)
    cache = target_cache(layout, g)
    positions = torch.tensor([0, 4, 8, 28])
    slots = torch.tensor([2, -1, 11, 5])  # -1: a group not complete yet (skipped)
    return pooled, weight, cos_sin, cache, positions, slots


def compressor_fn(layout: str, is_neox: bool, cast: bool):
    def fn(pooled, weight, cos_sin, cache, positions, slots):
        entry = ops.rms_norm(pooled, weight, 1e-6)
        if cast:
            entry = entry.to(torch.bfloat16)
        entry = ops.rope(positions, entry, cos_sin, 64, is_neox)
        ops.mla_cache_write(entry, cache, slots, layout)
        return entry * 1.0

    return fn


@pytest.mark.parametrize("hop", ["v1", "v2"])
@pytest.mark.parametrize("layout", ["dsv4_fp8", "bf16"])
@pytest.mark.parametrize("is_neox,cast", [(False, True), (True, False)])
def test_norm_rope_cache(full_pass, hop: str, layout: str, is_neox: bool, cast: bool) -> None:
    """The compressor chain (fp32 pooled rows → norm → bf16 → rope → cache), or a bf16 chain
    with no cast: one fused op; rows and every cache byte equal eager's."""
    fn = compressor_fn(layout, is_neox, cast)
    case = compressor_case(layout, torch.float32 if cast else torch.bfloat16)
    eager_cache = case[3].clone()
    expected = fn(*case[:3], eager_cache, *case[4:])
    with torch._inductor.config.patch(enable_auto_functionalized_v2=(hop == "v2")):
        out = run_compiled(fn, *case, fusion_pass=full_pass)
    style = "neox" if is_neox else "gptj"
    dtype = "fp32" if cast else "bf16"
    variant = f"{style}_{layout}{'_to_bf16' if cast else ''}_{hop}"
    assert full_pass.match_table == {f"norm_rope_cache/{variant}/{dtype}": 1}
    assert_fully_replaced(full_pass, ["rms_norm", "rope", "mla_cache_write"])
    assert_ops_present(full_pass, ["rms_norm_rope_mla_cache_write"])
    assert_bitwise_equal(out, expected, "rotated rows")
    assert_bitwise_equal(case[3], eager_cache, "whole cache")


def test_norm_rope_cache_must_not_fire(full_pass) -> None:
    """The normed value read elsewhere: the chain stays (a near miss says why). A kv rope with
    a q rope beside it goes to rope_cache, its norm to nothing (no sibling): never to this
    family."""

    def fn(pooled, weight, cos_sin, cache, positions, slots, q):
        normed = ops.rms_norm(pooled, weight, 1e-6)
        entry = ops.rope(positions, normed.to(torch.bfloat16), cos_sin, 64, False)
        ops.mla_cache_write(entry, cache, slots, "dsv4_fp8")
        kv = ops.rms_norm(pooled.to(torch.bfloat16), weight.to(torch.bfloat16), 1e-6)
        q_rot = ops.rope(positions, q, cos_sin, 64, False)
        kv_rot = ops.rope(positions, kv, cos_sin, 64, False)
        ops.mla_cache_write(kv_rot, cache, slots - 1, "dsv4_fp8")
        return normed * 2, q_rot

    case = compressor_case("dsv4_fp8", torch.float32)
    q = torch.randn(4, 2, 512).to(torch.bfloat16)
    eager_cache = case[3].clone()
    expected = fn(*case[:3], eager_cache, *case[4:], q)
    out = run_compiled(fn, *case, q, fusion_pass=full_pass)
    assert full_pass.match_table == {"rope_cache/gptj_dsv4_fp8_v2/bf16": 1}
    reasons = near_miss_reasons(full_pass, "norm_rope_cache")
    assert reasons == [
        "the normed value has other users (convert_element_type.default, mul.Tensor); the fused "
        "op returns "
        "only the rotated rows"
    ]
    assert_bitwise_equal(out, expected)
    assert_bitwise_equal(case[3], eager_cache, "whole cache")
