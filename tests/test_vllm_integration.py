"""The vLLM adapter with real vLLM (0.33.0; 0.32.0 before): vLLM's config takes the pass, vLLM's
post-grad pass manager accepts it and runs it on the reference model's graphs.

Runs only where vLLM is installed (CI: its own venv, see README "vLLM integration"); elsewhere
conftest.py leaves this file out, so ``pytest -m vllm`` there collects nothing and fails.

What a CPU-only machine cannot run: the manager's last step, vLLM's ``FixFunctionalizationPass``,
looks up ``torch.ops._C.rotary_embedding``, a kernel of vLLM's compiled extension that the CPU
machine does not load. :class:`VllmManagerHook` runs the manager for real and tolerates exactly
that failure (recording it); everything before it — vLLM's configured passes, ours included,
post-cleanup, IR lowering, clone elimination — runs. On a machine with vLLM's kernels the whole
manager runs and nothing is tolerated.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # lets VllmConfig() infer a device on CPU

import pytest
import torch
from vllm.compilation.passes.inductor_pass import InductorPass
from vllm.compilation.passes.pass_manager import PostGradPassManager
from vllm.config import CompilationConfig, VllmConfig
from vllm.config.utils import Range

import dsv4_model as dm
from fusion_passes import FusionPass
from fusion_passes.testing import assert_bitwise_equal, fresh_inductor
from fusion_passes.vllm import VLLM_PASS_KEY, VllmFusionPass
from tests.model_expectations import expected_leftover_ops, expected_matches
from tests.vllm_support import VllmManagerHook

pytestmark = pytest.mark.vllm

PROMPT, DECODE_STEPS, BATCH = 130, 2, 2  # 130 ≥ 128: the HCA layer gets a compressed entry
CFG = dm.tiny(residual="add")  # add residual: all four families fire


def vllm_config(fusion_pass: InductorPass | None) -> VllmConfig:
    """A VllmConfig the way a user writes it, with our pass in the Inductor config."""
    inductor = {VLLM_PASS_KEY: fusion_pass} if fusion_pass is not None else {}
    return VllmConfig(compilation_config=CompilationConfig(inductor_compile_config=inductor))


def configured_manager(config: VllmConfig) -> PostGradPassManager:
    """What vLLM's backend does with the config (VllmBackend.configure_post_pass): configure the
    manager, then ``add`` the user's ``post_grad_custom_post_pass`` (which asserts it is an
    InductorPass)."""
    manager = PostGradPassManager()
    manager.configure(config)
    user_pass = config.compilation_config.inductor_compile_config.get(VLLM_PASS_KEY)
    if user_pass is not None:
        manager.add(user_pass)
    return manager


def compile_and_run(config: VllmConfig, manager: PostGradPassManager) -> tuple[dm.RunResult, int]:
    """The tiny reference model compiled with vLLM's Inductor options and vLLM's pass manager as
    the post-grad hook; prefill then decode."""
    model, caches = dm.build(CFG, batch=BATCH, max_len=PROMPT + DECODE_STEPS + 8)
    prompts, decode_ids = dm.token_ids(CFG, BATCH, PROMPT, DECODE_STEPS)
    options = dict(config.compilation_config.inductor_compile_config)
    hook = VllmManagerHook(manager, Range(start=1, end=PROMPT))
    options[VLLM_PASS_KEY] = hook
    with fresh_inductor():
        fn = torch.compile(model, options=options, fullgraph=True)
        result = dm.run(caches, fn, fn, prompts, decode_ids)
    return result, hook.fix_functionalization_missing_kernels


def test_adapter_is_a_vllm_inductor_pass_keyed_by_its_configuration() -> None:
    ours = VllmFusionPass(schemes=["mxfp4"])
    assert isinstance(ours, InductorPass) and isinstance(ours, FusionPass)
    assert ours.uuid() == FusionPass.uuid(ours)
    assert ours.uuid() != VllmFusionPass(schemes=["mxfp8"]).uuid()  # vLLM's default would tie
    # vLLM's compilation hash (its compile-cache key) follows our configuration
    same = vllm_config(VllmFusionPass(schemes=["mxfp4"])).compute_hash()
    other = vllm_config(VllmFusionPass(schemes=["mxfp8"])).compute_hash()
    assert vllm_config(ours).compute_hash() == same != other


def test_vllm_manager_accepts_our_pass_and_keeps_the_users_object() -> None:
    ours = VllmFusionPass()
    config = vllm_config(ours)
    # vLLM's config forces auto-functionalization v1, which the rope_cache patterns cover
    inductor = config.compilation_config.inductor_compile_config
    assert inductor["enable_auto_functionalized_v2"] is False
    manager = configured_manager(config)
    assert manager.passes[-1] is ours  # after vLLM's own passes, the same object (accounting)
    with pytest.raises(AssertionError):
        manager.add(FusionPass(fusions=["dequant_fp8"]))  # a plain FusionPass is refused


@pytest.mark.slow
def test_vllm_runs_the_pass_on_the_reference_model() -> None:
    ours = VllmFusionPass(keep_graphs=True)
    config = vllm_config(ours)
    fused, fused_misses = compile_and_run(config, configured_manager(config))
    baseline_config = vllm_config(None)
    unfused, _ = compile_and_run(baseline_config, configured_manager(baseline_config))

    assert len(ours.graphs) == 2  # prefill and decode, one graph each
    prefill, decode = ours.graphs
    assert prefill.matches == dict(expected_matches(CFG, decode=False, functionalization="v1"))
    assert decode.matches == dict(expected_matches(CFG, decode=True, functionalization="v1"))
    for record in ours.graphs:
        for op, n in expected_leftover_ops(CFG).items():
            assert record.ops_after.get(op, 0) == n, (record.index, op, record.ops_after)
    # FixFunctionalizationPass, and only it, could not run once per graph where vLLM's kernels
    # are missing (CPU-only machine); elsewhere the whole manager ran
    kernels_loaded = hasattr(torch.ops._C, "rotary_embedding")
    assert fused_misses == (0 if kernels_loaded else len(ours.graphs))

    # with vLLM's passes around it, the fused model changes no bit of logits or caches
    assert_bitwise_equal(fused.prefill_logits, unfused.prefill_logits, "prefill logits")
    assert_bitwise_equal(fused.decode_logits, unfused.decode_logits, "decode logits")
    assert_bitwise_equal(fused.caches, unfused.caches, "caches")
