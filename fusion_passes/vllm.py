"""The vLLM adapter: :class:`FusionPass` as the ``InductorPass`` vLLM accepts.

    from vllm import LLM
    from fusion_passes.vllm import VllmFusionPass

    fusion = VllmFusionPass(schemes=["mxfp4", "fp8_group"])
    llm = LLM(
        model=...,
        compilation_config={"inductor_compile_config": {"post_grad_custom_post_pass": fusion}},
    )
    fusion.match_table                      # what fused, per family/variant/dtype

vLLM's backend asserts that ``inductor_compile_config["post_grad_custom_post_pass"]`` is its own
``InductorPass`` and adds it to its ``PostGradPassManager``, which runs it after vLLM's own
passes and before ``FixFunctionalizationPass`` (vLLM compiles with auto-functionalization v1;
the ``rope_cache`` patterns cover both forms).

``VllmFusionPass`` *is* a ``FusionPass`` (same arguments, accounting, dumps) and *is* a vLLM
``InductorPass``. Its ``uuid()`` is ``FusionPass.uuid()``: the configuration, the torch version
and the pass's source files. vLLM's default ``uuid()`` hashes only the class source, so two passes
with different ``schemes`` would share compiled code from vLLM's cache; and a plain callable put
in ``CompilationConfig.inductor_passes`` gets that same class-source hash.

Importing this module needs vLLM (``pip install 'fusion-passes[vllm]'``).
"""

from __future__ import annotations

try:
    from vllm.compilation.passes.inductor_pass import InductorPass
except ModuleNotFoundError as missing:
    if missing.name is None or not missing.name.startswith("vllm"):
        raise  # vLLM is there but one of its own imports failed: show that error
    raise ModuleNotFoundError(
        "fusion_passes.vllm needs vLLM's vllm.compilation.passes.inductor_pass (tested with "
        "vllm==0.33.0): pip install 'fusion-passes[vllm]'",
        name="vllm",
    ) from missing

from .fusion_pass import FusionPass

#: the Inductor config key vLLM reads the user's post-grad pass from
VLLM_PASS_KEY = "post_grad_custom_post_pass"


class VllmFusionPass(FusionPass, InductorPass):
    """:class:`FusionPass` that vLLM's ``PostGradPassManager`` accepts (an ``InductorPass``).

    Takes ``FusionPass``'s arguments. ``uuid()`` comes from ``FusionPass`` (configuration + source
    files + torch version), not from vLLM's class-source hash; ``is_applicable_for_range`` is
    vLLM's default (every compile range).
    """

    uuid = FusionPass.uuid

    def __repr__(self) -> str:
        return "Vllm" + super().__repr__()


__all__ = ["VLLM_PASS_KEY", "VllmFusionPass"]
