"""vLLM's native FP8 group quant, as ``QuantFP8._quantize_group_native`` (vLLM 0.33) spells it,
on CPU without vLLM: after our norm it fuses into ``rms_norm_fp8_group_quant`` bit-exactly
(vLLM's output shapes and scale layouts kept); alone it is put back as it was; the spellings
whose bits our op would not reproduce are left. tests/test_vllm_quant_fp8.py runs vLLM's own
classes in vLLM's venv."""

from __future__ import annotations

import pytest
import torch

from fusion_passes import FusionPass
from fusion_passes.testing import assert_bitwise_equal, run_compiled

ops = torch.ops.fusion_ops


def native_group_quant(
    x: torch.Tensor,
    group_size: int,
    column_major: bool = False,
    use_ue8m0: bool = False,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    fp8_max: float = 448.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM 0.33's ``QuantFP8._quantize_group_native`` (dynamic groups, K divisible)."""
    orig_shape = x.shape
    num_groups = x.shape[-1] // group_size
    x_grouped = x.view(-1, num_groups, group_size)
    absmax = x_grouped.abs().max(dim=-1, keepdim=True)[0].float()
    scales_raw = (absmax / fp8_max).clamp(min=1.0 / (fp8_max * 512.0))
    scales = torch.exp2(torch.ceil(torch.log2(scales_raw))) if use_ue8m0 else scales_raw
    x_quant = (x_grouped / scales).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    x_quant = x_quant.view(-1, num_groups * group_size).view(orig_shape)
    scales = scales.squeeze(-1).reshape(orig_shape[:-1] + (num_groups,))
    if column_major:
        scales = scales.transpose(-2, -1).contiguous().transpose(-1, -2)
    return x_quant, scales


def native_per_token_quant(x: torch.Tensor, fp8_max: float = 448.0) -> tuple[torch.Tensor, ...]:
    """vLLM 0.33's ``QuantFP8.forward_native``, dynamic per-token scales."""
    x_max = x.abs().amax(dim=-1).unsqueeze(-1).to(torch.float32)
    scale = (x_max / fp8_max).clamp(min=1.0 / (fp8_max * 512.0))
    out = x.to(torch.float32) * scale.to(torch.float32).reciprocal()
    return out.clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn), scale


def inputs(tokens: int = 12, k: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(tokens, k, generator=g)).to(torch.bfloat16)
    return x, (1 + 0.1 * torch.randn(k, generator=g)).to(torch.bfloat16)


@pytest.mark.parametrize("group", [128, 64])
@pytest.mark.parametrize("column_major", [False, True])
def test_after_our_norm_it_fuses_bit_exactly(group: int, column_major: bool) -> None:
    def fn(x, w):  # type: ignore[no-untyped-def]
        return native_group_quant(ops.rms_norm(x, w, 1e-6), group, column_major)

    x, w = inputs()
    p = FusionPass(keep_graphs=True)
    out = run_compiled(fn, x, w, fusion_pass=p)
    expected = run_compiled(fn, x, w, fusion_pass=None)
    assert_bitwise_equal(out, expected)
    assert out[1].stride() == expected[1].stride()  # vLLM's scale layout
    assert p.match_table == {f"rms_quant/fp8_group{group}_e4m3fn/bf16": 1}
    assert p.graphs[0].ops_after == {"rms_norm_fp8_group_quant": 1}


@pytest.mark.parametrize(
    "quant",
    [
        lambda y: native_group_quant(y, 128),  # no norm before it: nothing to fuse, put back
        lambda y: native_group_quant(y, 128, use_ue8m0=True),  # float log2: other bits
        lambda y: native_group_quant(  # vLLM's FNUZ max (224), not the dtype's (240)
            y, 128, fp8_dtype=torch.float8_e4m3fnuz, fp8_max=224.0
        ),
    ],
)
def test_left_as_it_was_where_it_would_not_be_exact(quant) -> None:  # type: ignore[no-untyped-def]
    def fn(x, w):  # type: ignore[no-untyped-def]
        return quant(x * w)

    x, w = inputs()
    p = FusionPass(keep_graphs=True)
    out = run_compiled(fn, x, w, fusion_pass=p)
    assert p.match_table == {} and p.graphs[0].ops_after == {}
    assert_bitwise_equal(out, run_compiled(fn, x, w, fusion_pass=None))


@pytest.mark.parametrize(
    ("quant", "ours", "label"),
    [
        (
            native_per_token_quant,
            lambda y: ops.fp8_per_token_quant(y, False, torch.float8_e4m3fn),
            "rms_quant/fp8_per_token_e4m3fn+tolerant/bf16",
        ),
        (
            lambda y: native_group_quant(y, 128, use_ue8m0=True),
            lambda y: ops.fp8_group_quant(y, 128, True, torch.float8_e4m3fn),
            "rms_quant/fp8_group128_ue8m0_e4m3fn+tolerant/bf16",
        ),
    ],
)
def test_inexact_forms_fuse_only_in_the_tolerant_mode(quant, ours, label) -> None:  # type: ignore[no-untyped-def]
    """The per-token form (x · reciprocal(s), not x / s) and UE8M0 scales from a float log2:
    exact mode leaves them (bit-equal, near miss-free), tolerant mode fuses them into our op,
    whose codes are our quant of the normed value (they differ from vLLM's only at rounding
    boundaries of the quotient)."""

    def fn(x, w):  # type: ignore[no-untyped-def]
        return quant(ops.rms_norm(x, w, 1e-6))

    x, w = inputs()
    expected = run_compiled(fn, x, w, fusion_pass=None)
    exact = FusionPass(keep_graphs=True)
    assert_bitwise_equal(run_compiled(fn, x, w, fusion_pass=exact), expected)
    assert exact.match_table == {}
    tolerant = FusionPass(numerics="tolerant", keep_graphs=True)
    fused = run_compiled(fn, x, w, fusion_pass=tolerant)
    assert tolerant.match_table == {label: 1}
    q_ours, s_ours = ours(ops.rms_norm(x, w, 1e-6))
    assert_bitwise_equal(fused[0], q_ours.view(fused[0].shape))
    assert_bitwise_equal(fused[1], s_ours.view(fused[1].shape))
    differ = int((fused[0].view(torch.uint8) != expected[0].view(torch.uint8)).sum())
    assert differ <= fused[0].numel() // 100, differ  # rounding boundaries only
