"""Shared by the vLLM tests (imported only where vLLM is installed)."""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from vllm.compilation.passes.inductor_pass import pass_context
from vllm.compilation.passes.pass_manager import PostGradPassManager
from vllm.config.utils import Range


class VllmManagerHook(CustomGraphPass):
    """Inductor's post-grad hook running vLLM's configured manager under vLLM's pass context."""

    def __init__(self, manager: PostGradPassManager, compile_range: Range) -> None:
        self.manager = manager
        self.compile_range = compile_range
        self.fix_functionalization_missing_kernels = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        with pass_context(self.compile_range):
            try:
                self.manager(graph)
            except AttributeError as error:  # FixFunctionalizationPass on a CPU-only machine
                if "'_C'" not in str(error) or "rotary_embedding" not in str(error):
                    raise
                self.fix_functionalization_missing_kernels += 1

    def uuid(self) -> None:
        return None  # never cached: every compile runs the manager
