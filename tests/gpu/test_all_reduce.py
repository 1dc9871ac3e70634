"""Tensor parallel on 2 GPUs (NCCL + symmetric memory): the all_reduce_* ops' Triton kernel equals
its definition bit for bit on every rank, the outputs are identical across ranks, CUDA-graph
replay and back-to-back calls of changing sizes stay exact, and the pass on a TP stack fuses
and changes nothing (pytest -m gpu on a machine with >= 2 GPUs; multicast stays off)."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]
WORLD = 2
EPS = 1e-6
FN = torch.float8_e4m3fn
SCHEMES = {
    None: (),
    "mxfp4": (),
    "mxfp8": (),
    "fp8_per_token": (False, FN),
    "fp8_group": (128, True, FN),
}


def _ops() -> Any:
    import fusion_ops  # noqa: F401

    return torch.ops.fusion_ops


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _assert_same_on_ranks(outputs: tuple[torch.Tensor, ...], what: str) -> None:
    for t in outputs:
        gathered = [torch.empty_like(_bits(t)) for _ in range(WORLD)]
        dist.all_gather(gathered, _bits(t))
        assert torch.equal(gathered[0], gathered[1]), f"{what}: ranks differ"


def _call(scheme: str | None, x, r, w, group: str, flags: tuple = ()):  # type: ignore[no-untyped-def]
    ops = _ops()
    if scheme is None:
        return ops.all_reduce_fused_add_rms_norm(x, r, w, EPS, group)
    op = getattr(ops, f"all_reduce_add_rms_norm_{scheme}_quant")
    return op(x, r, w, EPS, group, *SCHEMES[scheme], *flags)


def _definition(scheme: str | None, x, r, w, flags: tuple = ()):  # type: ignore[no-untyped-def]
    """Rank-order fp32 sum of every rank's x, rounded once, then the unfused add-norm(-quant)
    op (the Triton kernel the unfused graph runs; it may differ from the reference backend by
    the norm's reduction order, tests/gpu/test_triton_kernels.py)."""
    from fusion_ops.reference.collective import rank_order_sum

    ops = _ops()
    parts = [torch.empty_like(x) for _ in range(WORLD)]
    dist.all_gather(parts, x.contiguous())
    total = rank_order_sum(parts)
    if scheme is None:
        out = ops.fused_add_rms_norm(total, r, w, EPS)
    else:
        out = getattr(ops, f"add_rms_norm_{scheme}_quant")(
            total, r, w, EPS, *SCHEMES[scheme], *flags
        )
    return out


def _check(scheme, x, r, w, group, what, flags=()):  # type: ignore[no-untyped-def]
    got = _call(scheme, x, r, w, group, flags)
    want = _definition(scheme, x, r, w, flags)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, (what, i, a.shape, b.shape)
        assert torch.equal(_bits(a), _bits(b)), f"{what}: output {i} differs from the definition"
    _assert_same_on_ranks(tuple(got[:3]), what)


def _inputs(rank: int, tokens: int, hidden: int, dtype=torch.bfloat16, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator(device="cuda").manual_seed(1000 * seed + rank)
    shared = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(tokens, hidden, device="cuda", generator=g) * 2).to(dtype)
    r = torch.randn(tokens, hidden, device="cuda", generator=shared).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=shared)).to(dtype)
    return x, r, w


def scenario_definition(rank: int, group: str) -> None:
    from fusion_ops.triton_backend import all_reduce

    hidden_sizes = (7168, 256, 1000)  # 1000: rows not 16-byte aligned
    for hidden in hidden_sizes:
        big = all_reduce.one_shot_max_bytes() // (2 * hidden) + 1  # above: the NCCL path
        for tokens in (1, 7, 16, 33, 200, big):  # rows split over 8, 8, 8, 2, 1 programs
            for scheme in SCHEMES:
                if scheme is not None and hidden % 128:
                    continue
                x, r, w = _inputs(rank, tokens, hidden, seed=tokens)
                _check(scheme, x, r, w, group, f"{scheme} {tokens}x{hidden}")
    x, r, w = _inputs(rank, 5, 7168, torch.float16)
    _check("mxfp4", x, r, w, group, "fp16")
    x, r, w = _inputs(rank, 3, 7168)
    x[0, :64] = -0.0  # a sum of two -0.0 stays -0.0 (a kernel starting from +0.0 would not)
    _check("fp8_group", x, r, w, group, "signed zeros")
    # the kernel's "empty" pattern (all bits set, a NaN) as an input value, on one rank and on
    # both: it must neither hang nor change a byte
    x.view(torch.int16)[1, 7 : 7 + 8 * (rank + 1)] = -1
    _check("mxfp4", x, r, w, group, "inputs holding the empty pattern")
    _check("mxfp4", x, r, w, group, "flags: +normed, vLLM IR numerics", (True, True, True))
    x3, r3, w3 = (t.view(1, 3, -1) if t.dim() == 2 else t for t in (x, r, w))
    _check("mxfp8", x3, r3, w3, group, "3-d x")


def scenario_every_split(rank: int, group: str) -> None:
    """The same bytes whether each row is one program's or split over 2, 4 or 8 programs."""
    from fusion_ops import launch_policy as policy

    assert policy.all_reduce_parts_per_row(3, 8192, 128, 128) == policy.ALL_REDUCE_MAX_SPLIT == 8
    default = policy.ALL_REDUCE_MAX_SPLIT
    for scheme in SCHEMES:
        x, r, w = _inputs(rank, 3, 7168, seed=11)
        outs = []
        try:
            for split in (1, 2, 4, 8):
                policy.ALL_REDUCE_MAX_SPLIT = split
                outs.append(_call(scheme, x, r, w, group))
        finally:
            policy.ALL_REDUCE_MAX_SPLIT = default
        for split, out in zip((2, 4, 8), outs[1:], strict=True):
            for i, (a, b) in enumerate(zip(out, outs[0], strict=True)):
                assert torch.equal(_bits(a), _bits(b)), f"{scheme}: split {split}, output {i}"


def scenario_back_to_back(rank: int, group: str) -> None:
    """Changing sizes, widths and dtypes call after call (the slots are reused each time: every
    call must find them emptied of whatever the call before wrote)."""
    for i, tokens in enumerate((1, 300, 5, 128, 129, 1, 64, 2, 250, 3) * 3):
        x, r, w = _inputs(rank, tokens, 7168, seed=i)
        _check("mxfp4", x, r, w, group, f"call {i} ({tokens} tokens)")
    shapes = [(7, 7168, torch.bfloat16), (3, 1000, torch.float32), (200, 256, torch.float16)]
    for i, (tokens, hidden, dtype) in enumerate(shapes * 4 + shapes[::-1] * 3):
        x, r, w = _inputs(rank, tokens, hidden, dtype, seed=100 + i)
        _check(None, x, r, w, group, f"call {i} ({tokens}x{hidden} {dtype})")


def scenario_cuda_graph(rank: int, group: str) -> None:
    x, r, w = _inputs(rank, 4, 7168)
    _call("fp8_group", x, r, w, group)  # warm-up: workspace and kernels before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _call("fp8_group", x, r, w, group)
    for seed in (1, 2, 3):
        new_x, new_r, _ = _inputs(rank, 4, 7168, seed=seed)
        x.copy_(new_x)
        r.copy_(new_r)
        graph.replay()
        want = _definition("fp8_group", x, r, w)
        for a, b in zip(out, want, strict=True):
            assert torch.equal(_bits(a), _bits(b)), f"graph replay {seed}"


def scenario_pass(rank: int, group: str) -> None:
    from fusion_passes import FusionPass
    from fusion_passes.testing import assert_bitwise_equal, run_compiled
    from tests.tp_stack import STACK, expected_matches, inputs, tp_stack

    args = [
        a.cuda() if isinstance(a, torch.Tensor) else [t.cuda() for t in a] for a in inputs(rank, 5)
    ]
    fn = lambda *a: tp_stack(*a, group)  # noqa: E731
    p = FusionPass()
    out = run_compiled(fn, *args, fusion_pass=p)
    assert p.match_table == expected_matches()
    assert len(STACK) == sum(p.match_table.values())
    plain = run_compiled(fn, *args, fusion_pass=None)
    assert_bitwise_equal(out, plain, "compiled with pass vs without (2 ranks, CUDA)")
    _assert_same_on_ranks(tuple(out[:-1]), "pass outputs")


SCENARIOS = {
    "definition": scenario_definition,
    "every_split": scenario_every_split,
    "back_to_back": scenario_back_to_back,
    "cuda_graph": scenario_cuda_graph,
    "pass": scenario_pass,
}


def _worker(rank: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
        NCCL_NVLS_ENABLE="0",
    )
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", rank=rank, world_size=WORLD, device_id=torch.device("cuda", rank)
    )
    try:
        for scenario in SCENARIOS.values():
            scenario(rank, dist.group.WORLD.group_name)
            torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()


def test_two_gpus() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port,), nprocs=WORLD)
