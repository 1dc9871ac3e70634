"""vLLM's own layers: ``RMSNorm`` (traced as ``vllm_ir.rms_norm``) then ``QuantFP8`` (dynamic 1×g
groups, fp32 scales; traced in its native form under vLLM's default ``custom_ops=["none"]``)
inside a ``VllmConfig``, compiled with vLLM's Inductor options and vLLM's
``PostGradPassManager`` (our pass added to it, as vLLM's backend does). The pass turns the native
quant into our op, fuses it with the norm into one op producing vLLM's tensors (codes and scales
in vLLM's layout), bit-equal to vLLM's layers run eagerly.

Runs where vLLM is installed (CI: its own venv; conftest.py leaves it out elsewhere)."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # lets VllmConfig() infer a device on CPU

import pytest
import torch
from vllm.compilation.passes.pass_manager import PostGradPassManager
from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
from vllm.config.utils import Range
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape

from fusion_passes.testing import assert_bitwise_equal, fresh_inductor
from fusion_passes.vllm import VLLM_PASS_KEY, VllmFusionPass
from tests.vllm_support import VllmManagerHook

pytestmark = pytest.mark.vllm
HIDDEN, EPS = 1024, 1e-6


def compile_layers(
    fusion_pass: VllmFusionPass | None,
    group: int | None,
    column_major: bool,
    tokens: list[int],
    use_ue8m0: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``group`` None: per-token scales."""
    inductor = {VLLM_PASS_KEY: fusion_pass} if fusion_pass is not None else {}
    config = VllmConfig(
        compilation_config=CompilationConfig(custom_ops=["none"], inductor_compile_config=inductor)
    )
    with set_current_vllm_config(config):
        torch.manual_seed(0)
        norm = RMSNorm(HIDDEN, eps=EPS).to(torch.bfloat16)
        norm.weight.data = 1 + 0.1 * torch.randn(HIDDEN).to(torch.bfloat16)
        shape = GroupShape.PER_TOKEN if group is None else GroupShape(1, group)
        quant = QuantFP8(
            static=False,
            group_shape=shape,
            column_major_scales=column_major,
            use_ue8m0=use_ue8m0,
        )
        manager = PostGradPassManager()
        manager.configure(config)
        if fusion_pass is not None:
            manager.add(fusion_pass)
        options = dict(config.compilation_config.inductor_compile_config)
        options[VLLM_PASS_KEY] = VllmManagerHook(manager, Range(start=1, end=64))
        with fresh_inductor():
            fn = torch.compile(lambda x: quant(norm(x)), options=options, fullgraph=True)
            outs = []
            for t in tokens:
                x = (3 * torch.randn(t, HIDDEN)).to(torch.bfloat16)
                outs.append((fn(x), quant(norm(x))))  # compiled, eager
    return outs


@pytest.mark.parametrize("group", [128, 64])
@pytest.mark.parametrize("column_major", [False, True])
def test_vllm_norm_then_quant_fp8_fuses_into_vllm_ir_semantics(
    group: int, column_major: bool
) -> None:
    """The fused op computes vLLM IR's norm (its reference semantics) and QuantFP8's codes bit
    for bit: equal to vLLM's layers run eagerly. The compile without our pass is not the
    yardstick here: vLLM's manager lowers ``vllm_ir.rms_norm`` to plain torch after the
    custom pass, and Inductor reduces that in its own order."""
    tokens = [16, 5]  # the second call recompiles with a dynamic token count
    ours = VllmFusionPass(keep_graphs=True)
    results = compile_layers(ours, group, column_major, tokens)
    for (fused, eager), t in zip(results, tokens, strict=True):
        assert_bitwise_equal(fused, eager)
        q, s = fused
        assert q.dtype == torch.float8_e4m3fn and q.shape == (t, HIDDEN)
        assert s.shape == (t, HIDDEN // group) and s.stride() == eager[1].stride()
    label = f"rms_quant/fp8_group{group}_e4m3fn+vllm_ir/bf16"
    assert ours.match_table == {label: len(ours.graphs)} and len(ours.graphs) >= 1
    assert all(g.ops_after == {"rms_norm_fp8_group_quant": 1} for g in ours.graphs)


@pytest.mark.parametrize(
    ("group", "use_ue8m0", "label"),
    [
        (None, False, "rms_quant/fp8_per_token_e4m3fn+vllm_ir+tolerant/bf16"),
        (128, True, "rms_quant/fp8_group128_ue8m0_e4m3fn+vllm_ir+tolerant/bf16"),
    ],
)
def test_per_token_and_ue8m0_fuse_in_the_tolerant_mode(
    group: int | None, use_ue8m0: bool, label: str
) -> None:
    """Per-token QuantFP8 multiplies by the scale's reciprocal and UE8M0 scales come from a float
    ``log2``: the exact mode leaves them, the tolerant mode fuses them; the scales equal vLLM's,
    codes differ only at the quotient's rounding boundaries (counted)."""
    exact = VllmFusionPass(keep_graphs=True)
    compile_layers(exact, group, False, [16], use_ue8m0)
    assert exact.match_table == {}
    tolerant = VllmFusionPass(numerics="tolerant", keep_graphs=True)
    ((fused, eager),) = compile_layers(tolerant, group, False, [16], use_ue8m0)
    assert tolerant.match_table == {label: 1}
    assert_bitwise_equal(fused[1], eager[1], "scales")
    differ = int((fused[0].view(torch.uint8) != eager[0].view(torch.uint8)).sum())
    assert differ <= fused[0].numel() // 100, differ
