"""The C++ CUDA kernels replay the Triton launch of the op's Python kernel (fusion_ops.native):
same bytes as the Python kernel for every replayed call, eps taken from each call, bad input
and forced backends still in Python, CUDA-graph capture (pytest -m gpu)."""

from __future__ import annotations

import time

import pytest
import torch

import fusion_ops
from fusion_ops import backends, native
from fusion_ops.launch_policy import INV_RMS_BY_FMA_MIN_EPS
from fusion_ops.library import native_kernels
from fusion_passes.testing import assert_bitwise_equal

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not native_kernels(), reason="the C++ kernels are not built"),
    pytest.mark.skipif(not native.replays_cuda(), reason="NVIDIA builds of torch only"),
]
ops = torch.ops.fusion_ops
FN = torch.float8_e4m3fn

# (op, arguments after the tensors and eps): every scheme, with and without the flags
CASES = [
    ("rms_norm", ()),
    ("fused_add_rms_norm", ()),
    ("rms_norm_mxfp4_quant", (False, False)),
    ("rms_norm_mxfp4_quant", (True, False)),
    ("add_rms_norm_mxfp4_quant", (False, False, False)),
    ("rms_norm_mxfp8_quant", (False, True)),
    ("add_rms_norm_mxfp8_quant", (True, False, True)),
    ("rms_norm_fp8_group_quant", (128, True, FN, False, False)),
    ("add_rms_norm_fp8_group_quant", (128, False, FN, True, False, False)),
    ("rms_norm_fp8_per_token_quant", (False, FN, False, False)),
    ("add_rms_norm_fp8_per_token_quant", (True, FN, False, False, False)),
    ("mxfp4_quant", ()),
    ("fp8_group_quant", (128, True, FN)),
]


# a row width no other GPU test uses: the first call of each signature here must be the first
# in the process (test_deeper_kernels quantizes 1-token rows of 1024 before this file runs)
WIDTH = 1152


def call_args(op: str, rest: tuple, tokens: int, eps: float, seed: int) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, WIDTH, device="cuda", generator=g).to(torch.bfloat16)
    r = torch.randn(tokens, WIDTH, device="cuda", generator=g).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(WIDTH, device="cuda", generator=g)).to(torch.bfloat16)
    if op.endswith("_quant") and not op.startswith(("rms", "add")):
        return (x, *rest)
    if op.startswith("add") or op == "fused_add_rms_norm":
        return (x, r, w, eps, *rest)
    return (x, w, eps, *rest)


def python_kernel(op: str):  # type: ignore[no-untyped-def]
    return getattr(ops, f"_python_{op}")


@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize(("op", "rest"), CASES)
def test_replayed_calls_equal_the_python_kernel(op: str, rest: tuple, tokens: int) -> None:
    before = native.plan_count(op)
    first = call_args(op, rest, tokens, 1e-6, seed=0)
    assert_bitwise_equal(getattr(ops, op)(*first), python_kernel(op)(*first))
    assert native.plan_count(op) == before + 1  # the first call of the signature made a plan
    for seed, eps in ((1, 1e-5), (2, 0.25)):  # same signature: other values, other eps
        args = call_args(op, rest, tokens, eps, seed)
        ran_before = native.last_run(op)[0]
        got = getattr(ops, op)(*args)
        assert native.last_run(op)[0] > ran_before  # replayed by the C++ kernel
        assert fusion_ops.last_backend(op) == "triton"
        assert_bitwise_equal(got, python_kernel(op)(*args))
    assert native.plan_count(op) == before + 1


def test_an_eps_below_the_fma_floor_runs_the_python_kernel() -> None:
    """Plans admit eps from INV_RMS_BY_FMA_MIN_EPS on: below it the norm kernels take the
    division steps (another compiled kernel), so such a call of a replayed signature runs the
    Python kernel, and a signature first seen with such an eps gets no plan."""
    args = call_args("rms_norm", (), 9, 1e-6, seed=5)  # 9 and 10 tokens: no other test's
    before = native.plan_count("rms_norm")
    ops.rms_norm(*args)
    assert native.plan_count("rms_norm") == before + 1
    for eps in (INV_RMS_BY_FMA_MIN_EPS / 2, 0.0):
        small = (args[0], args[1], eps)
        ran_before = native.last_run("rms_norm")[0]
        got = ops.rms_norm(*small)
        assert native.last_run("rms_norm")[0] == ran_before  # not replayed
        assert_bitwise_equal(got, python_kernel("rms_norm")(*small))
    ops.rms_norm(*call_args("rms_norm", (), 10, 0.0, seed=6))
    assert native.plan_count("rms_norm") == before + 1
    assert "below" in native.REFUSALS.get("rms_norm", ""), native.REFUSALS.get("rms_norm")


def test_bad_input_and_forced_backends_reach_python() -> None:
    args = call_args("rms_norm_mxfp4_quant", (False, False), 4, 1e-6, seed=3)
    ops.rms_norm_mxfp4_quant(*args)  # the signature has a plan
    with pytest.raises(ValueError, match="argument 'eps': got -1.0; expected >= 0"):
        ops.rms_norm_mxfp4_quant(args[0], args[1], -1.0, False, False)
    with pytest.raises(ValueError, match="argument 'weight'"):
        ops.rms_norm_mxfp4_quant(args[0], args[1][:512], 1e-6, False, False)
    with fusion_ops.use_backend("reference"):
        got = ops.rms_norm_mxfp4_quant(*args)
        assert fusion_ops.last_backend("rms_norm_mxfp4_quant") == "reference"
    assert_bitwise_equal(got[:2], python_kernel("rms_norm_mxfp4_quant")(*args)[:2])


def test_reference_backend_signatures_are_never_replayed() -> None:
    """FNUZ FP8 runs the reference backend on NVIDIA: its Python run computes with aten ops."""
    args = call_args("fp8_group_quant", (128, False, torch.float8_e4m3fnuz), 8, 0.0, seed=4)
    before = native.plan_count("fp8_group_quant")
    for _ in range(2):
        ran_before = native.last_run("fp8_group_quant")[0]
        assert_bitwise_equal(ops.fp8_group_quant(*args), python_kernel("fp8_group_quant")(*args))
        assert native.last_run("fp8_group_quant")[0] == ran_before  # not replayed
    assert native.plan_count("fp8_group_quant") == before


def test_launches_go_to_the_current_stream() -> None:
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert torch.ops.fusion_ops_native.launch_stream(0) == side.cuda_stream
    current = torch.cuda.current_stream().cuda_stream
    assert torch.ops.fusion_ops_native.launch_stream(0) == current


def test_last_backend_follows_the_last_kernel() -> None:
    args = call_args("rms_norm", (), 2, 1e-6, seed=5)
    ops.rms_norm(*args)
    ops.rms_norm(*args)
    assert fusion_ops.last_backend("rms_norm") == "triton"
    backends._LAST_USED["rms_norm"] = ("reference", time.monotonic_ns())
    assert fusion_ops.last_backend("rms_norm") == "reference"


def test_replay_under_cuda_graph_capture() -> None:
    args = call_args("add_rms_norm_mxfp8_quant", (False, False, False), 16, 1e-6, seed=6)
    ops.add_rms_norm_mxfp8_quant(*args)  # plan made outside the capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.add_rms_norm_mxfp8_quant(*args)  # warm-up on the side stream
        with torch.cuda.graph(graph):
            out = ops.add_rms_norm_mxfp8_quant(*args)
    torch.cuda.current_stream().wait_stream(stream)
    fresh = call_args("add_rms_norm_mxfp8_quant", (False, False, False), 16, 1e-6, seed=7)
    for a, b in zip(args[:3], fresh[:3], strict=True):  # x, residual, weight
        a.copy_(b)
    graph.replay()
    torch.cuda.synchronize()
    assert_bitwise_equal(out, python_kernel("add_rms_norm_mxfp8_quant")(*fresh))


def test_zero_tokens() -> None:
    args = call_args("rms_norm_mxfp4_quant", (False, False), 0, 1e-6, seed=8)
    for _ in range(2):
        q, s, y = ops.rms_norm_mxfp4_quant(*args)
        assert q.shape == (0, WIDTH // 2) and s.shape == (0, WIDTH // 32)  # E2M1 pairs, per 32


def test_a_signature_first_seen_in_compiled_code_is_replayed() -> None:
    """Inductor's generated code calls the op first (where aten::reshape reaches the recorder
    un-decomposed); the signature still gets its plan, and later eager calls replay it."""
    from fusion_passes.testing import fresh_inductor

    x = torch.randn(3, 7168, device="cuda").to(torch.bfloat16)
    w = torch.ones(7168, device="cuda", dtype=torch.bfloat16)
    before = native.plan_count("rms_norm_mxfp8_quant")
    with fresh_inductor():
        compiled = torch.compile(
            lambda x, w: ops.rms_norm_mxfp8_quant(x, w, 1e-6)[:2], fullgraph=True, dynamic=False
        )
        compiled(x, w)
    assert native.plan_count("rms_norm_mxfp8_quant") == before + 1, native.REFUSALS
    ran_before = native.last_run("rms_norm_mxfp8_quant")[0]
    ops.rms_norm_mxfp8_quant(x, w, 1e-6)
    assert native.last_run("rms_norm_mxfp8_quant")[0] > ran_before


def test_a_rope_first_seen_in_compiled_code_is_replayed() -> None:
    """In compiled code a no-op ``.float()`` of the rope table reaches the recorder as
    ``aten::to``; the rope kernels pass an fp32 table as it is, so the rope ops get plans there
    too (the model's decode step found them all on the Python path)."""
    from fusion_passes.testing import fresh_inductor

    pos = torch.arange(5, device="cuda") * 3
    q = torch.randn(5, 3, 512, device="cuda").to(torch.bfloat16)
    cs = torch.randn(64, 64, device="cuda")
    before = native.plan_count("qnorm_rope_mla_cache_write")
    cache = fusion_ops.alloc_mla_cache(4, 4, device="cuda")
    slots = torch.tensor([3, -1, 0, 9, 15], device="cuda")

    def fn(pos, q, cs, cache, slots):
        return ops.qnorm_rope_mla_cache_write(
            pos, q, 1e-6, q[:, 0] * 2, cs, cache, slots, 64, False, "dsv4_fp8"
        )

    with fresh_inductor():
        torch.compile(fn, fullgraph=True, dynamic=False)(pos, q, cs, cache, slots)
    assert native.plan_count("qnorm_rope_mla_cache_write") == before + 1, native.REFUSALS


def test_a_constant_equal_to_eps_is_told_apart() -> None:
    """eps == the kernel's fp8_max constant (448) in the first call: which parameter is eps is
    found by a dry run with another eps, so a later call with another eps replays right."""
    before = native.plan_count("rms_norm_mxfp4_quant")
    for seed, eps in ((9, 448.0), (10, 1e-6)):
        args = call_args("rms_norm_mxfp4_quant", (False, False), 5, eps, seed=seed)
        assert_bitwise_equal(
            ops.rms_norm_mxfp4_quant(*args), python_kernel("rms_norm_mxfp4_quant")(*args)
        )
    assert native.plan_count("rms_norm_mxfp4_quant") == before + 1, native.REFUSALS


# --- every other op with a Triton kernel: caches written in place, two eps, strings ----------
TOKENS = 11  # a row count no other test uses: each op's first call here is a new signature
# (q eps, kv eps) per call: equal in the first call (which parameter is which is found by dry
# runs, not by value), then every order of two different values
# the smallest eps a plan admits included (test_an_eps_below_the_fma_floor_runs_the_python_kernel)
EPS_CALLS = [(1e-6, 1e-6), (1e-5, 0.25), (0.25, 1e-5), (INV_RMS_BY_FMA_MIN_EPS, 3.0)]


def op_args(op: str, seed: int, eps: tuple[float, float]) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    pos = torch.randint(0, 4096, (TOKENS,), device=dev, generator=g)
    cs = torch.randn(4096, 64, device=dev, generator=g)
    cache = fusion_ops.alloc_mla_cache(40, 64, device=dev)
    cache.view(torch.uint8).copy_(
        torch.randint(0, 256, cache.view(torch.uint8).shape, device=dev, generator=g)
    )
    slots = torch.randperm(40 * 64, device=dev, generator=g)[:TOKENS]
    slots[::4] = -1
    kv = torch.randn(TOKENS, 512, device=dev, generator=g).to(torch.bfloat16)
    q = torch.randn(TOKENS, 8, 512, device=dev, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 40, (TOKENS,), device=dev, generator=g)  # a count no other test uses
    proj = torch.randn(TOKENS, 1536 + 512, device=dev, generator=g).to(torch.bfloat16)
    qa, kva = proj.split([1536, 512], dim=-1)
    wq = (1 + 0.1 * torch.randn(1536, device=dev, generator=g)).to(torch.bfloat16)
    wkv = (1 + 0.1 * torch.randn(512, device=dev, generator=g)).to(torch.bfloat16)
    x32 = torch.randn(TOKENS, 512, device=dev, generator=g) * 3
    w32 = 1 + 0.1 * torch.randn(512, device=dev, generator=g)
    q_kv = (qa, wq, eps[0], kva, wkv, eps[1])
    return {
        "rope": (pos, q, cs, 64, False),
        "mla_cache_write": (kv, cache, slots, "dsv4_fp8"),
        "dequant_cache": (cache, ids, "dsv4_fp8"),
        "dequant_cache_fp8": (cache, ids, "dsv4_fp8", FN),
        "rope_mla_cache_write": (pos, q, kv, cs, cache, slots, 64, True, "dsv4_fp8"),
        "rms_norm_rope_mla_cache_write": (
            pos, x32, w32, eps[0], cs, cache, slots, 64, False, "dsv4_fp8", torch.bfloat16
        ),
        "q_kv_rms_norm": q_kv,
        "q_kv_rms_norm_fp8_group_quant": (*q_kv, 128, True, FN, False, False),
        "q_kv_rms_norm_mxfp4_quant": (*q_kv, True, False),
    }[op]  # fmt: skip


def _clone_caches(args: tuple) -> tuple:
    return tuple(
        a.clone() if isinstance(a, torch.Tensor) and a.dtype == torch.uint8 else a for a in args
    )


@pytest.mark.parametrize(
    "op",
    [
        "rope",
        "mla_cache_write",
        "dequant_cache",
        "dequant_cache_fp8",
        "rope_mla_cache_write",
        "rms_norm_rope_mla_cache_write",
        "q_kv_rms_norm",
        "q_kv_rms_norm_fp8_group_quant",
        "q_kv_rms_norm_mxfp4_quant",
    ],
)
def test_every_op_replays_like_its_python_kernel(op: str) -> None:
    """Cache writes (the cache an input written in place), string and dtype arguments, two eps:
    every replayed call equals the Python kernel's, outputs and cache bytes."""
    before = native.plan_count(op)
    for seed, eps in enumerate(EPS_CALLS):
        args = op_args(op, seed, eps)
        theirs = _clone_caches(args)
        ran_before = native.last_run(op)[0]
        got = getattr(ops, op)(*args)
        if seed > 0:
            assert native.last_run(op)[0] > ran_before, native.REFUSALS.get(op)  # replayed
        want = python_kernel(op)(*theirs)
        if want is None:
            assert got is None
        else:
            assert_bitwise_equal(got, want)
        for a, b in zip(args, theirs, strict=True):
            if isinstance(a, torch.Tensor) and a.dtype == torch.uint8:
                assert torch.equal(a, b), f"{op}: cache bytes differ (call {seed})"
    assert native.plan_count(op) == before + 1, native.REFUSALS.get(op)
