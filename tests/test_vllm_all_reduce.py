"""``torch.ops.vllm.all_reduce`` as a source of ``ar_add_rms_quant``, under a 2-process gloo group
with vLLM's own parallel state (``init_distributed_environment``, ``initialize_model_parallel``)
and vLLM's ``tensor_model_parallel_all_reduce``.

vLLM traces its all-reduce to the custom op where the platform uses custom-op collectives (CUDA);
its CPU platform does not, so the test turns that on for the TP group (``use_custom_op_call``),
which makes the CPU graph hold ``vllm.all_reduce`` as a CUDA graph does. Checked on both ranks:
the fold fires (labels derived from the function), compiled with the pass == without == eager
bit for bit, an all-reduce nothing fuses with stays vLLM's.

Runs where vLLM is installed (CI: its own venv; conftest.py leaves it out elsewhere)."""

from __future__ import annotations

import os
import socket

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # lets VllmConfig() infer a device on CPU

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.vllm
WORLD, HIDDEN, EPS = 2, 256, 1e-6


def _scenarios(rank: int) -> None:
    from vllm.distributed.communication_op import tensor_model_parallel_all_reduce

    from fusion_passes.testing import assert_bitwise_equal, run_compiled
    from fusion_passes.vllm import VllmFusionPass

    ops = torch.ops.fusion_ops

    def norm_quant(x, r, w):  # type: ignore[no-untyped-def]
        y, residual = ops.fused_add_rms_norm(tensor_model_parallel_all_reduce(x), r, w, EPS)
        return (*ops.mxfp8_quant(y), residual)

    def norm_only(x, r, w):  # type: ignore[no-untyped-def]
        return ops.fused_add_rms_norm(tensor_model_parallel_all_reduce(x), r, w, EPS)

    def nothing_to_fuse(x, r, w):  # type: ignore[no-untyped-def]
        return tensor_model_parallel_all_reduce(x) * 2 + r

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(8, HIDDEN, generator=g).to(torch.bfloat16)
    shared = torch.Generator().manual_seed(99)
    r = torch.randn(8, HIDDEN, generator=shared).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(HIDDEN, generator=shared)).to(torch.bfloat16)
    expected_labels = {
        norm_quant: {"ar_add_rms_quant/mxfp8/bf16": 1},
        norm_only: {"ar_add_rms_quant/ar_add_rms/bf16": 1},
        nothing_to_fuse: {},
    }
    for fn, labels in expected_labels.items():
        p = VllmFusionPass(keep_graphs=True)
        fused = run_compiled(fn, x.clone(), r, w, fusion_pass=p)
        unfused = run_compiled(fn, x.clone(), r, w, fusion_pass=None)
        eager = fn(x.clone(), r, w)
        assert p.match_table == labels, (fn.__name__, p.match_table, p.graphs[0].near_misses)
        assert "vllm.all_reduce" in p.graphs[0].code_before
        left = "vllm.all_reduce" in p.graphs[0].code_after
        assert left == (not labels), fn.__name__  # folded, or vLLM's own all-reduce kept
        assert_bitwise_equal(fused, unfused, fn.__name__)
        assert_bitwise_equal(fused, eager, fn.__name__)


def _worker(rank: int, port: int) -> None:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    with set_current_vllm_config(VllmConfig()):
        parallel_state.init_distributed_environment(
            world_size=WORLD,
            rank=rank,
            distributed_init_method=f"tcp://127.0.0.1:{port}",
            local_rank=rank,
            backend="gloo",
        )
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=WORLD)
        tp = parallel_state.get_tp_group()
        tp.use_custom_op_call = True  # trace vllm.all_reduce, as on CUDA
        # vLLM's CPU communicator all-reduces in place and returns its input, which a custom op
        # may not (torch's aliasing check; an error when CI is set); the CUDA communicators
        # return a new tensor: give the CPU one a copy to reduce, as those do
        in_place = tp.device_communicator.all_reduce
        tp.device_communicator.all_reduce = lambda t: in_place(t.clone())
        _scenarios(rank)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_all_reduce_folds_into_the_fused_op_two_ranks() -> None:
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD)
