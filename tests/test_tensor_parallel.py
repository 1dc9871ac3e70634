"""Tensor parallel on CPU: gloo groups of 2, 4 and 8 processes compile TP layers with and without
FusionPass.

Every scenario runs on every rank (collectives need all) inside one ``torch.multiprocessing``
spawn; a failed assertion on any rank fails the test with its traceback. Checked per scenario:
the ``ar_add_rms_quant`` matches (derived from how the layer is built), the standalone ops gone,
compiled-with-pass == compiled-without == eager bit for bit, and the residual and quant outputs
identical on both ranks.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
from torch.library import opcheck

import fusion_ops
from fusion_passes import FusionPass
from fusion_passes.testing import assert_bitwise_equal, op_counts, run_compiled
from patterns.ar_add_rms_quant import NAME
from tests.tp_stack import EPS, FN, HIDDEN, STACK, expected_matches, inputs, tp_stack

ops = torch.ops.fusion_ops
WORLD = 2  # the default spawn; the scenarios read the group's size


def _same_on_every_rank(tensors: Any) -> None:
    for t in torch.utils._pytree.tree_leaves(tensors):
        t = t.contiguous().view(torch.uint8)
        gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, t)
        assert all(torch.equal(gathered[0], other) for other in gathered[1:])


# --- scenarios (each runs on every rank) ---------------------------------------------------------
def scenario_stack(rank: int, group_name: str) -> None:
    x, residual, weights, norm_w, router = inputs(rank, 5)
    p = FusionPass()
    fn = lambda *a: tp_stack(*a, group_name)  # noqa: E731
    out = run_compiled(
        fn,
        x,
        residual,
        weights,
        norm_w,
        router,
        fusion_pass=p,
        dynamic=True,
        calls=[inputs(rank, 3)],
    )
    assert p.match_table == expected_matches()
    after = op_counts(p)
    assert after.get("fused_add_rms_norm", 0) == 0
    assert not any(name.startswith("add_rms_norm_") for name in after)
    assert sum(v for k, v in after.items() if k.startswith("all_reduce_")) == len(STACK)
    assert p.graphs[-1].near_misses == []
    plain = run_compiled(fn, x, residual, weights, norm_w, router, fusion_pass=None, dynamic=True)
    assert_bitwise_equal(out, plain, "compiled with pass vs without")
    assert_bitwise_equal(out, fn(x, residual, weights, norm_w, router), "compiled vs eager")
    _same_on_every_rank(out[:-1])  # quant outputs and the residual (not the router logits)
    for tokens in (3, 1):  # the dynamic graph, other token counts
        again = inputs(rank, tokens)
        compiled = torch.compile(fn, dynamic=True, options={"post_grad_custom_post_pass": p})
        assert_bitwise_equal(compiled(*again), fn(*again), f"{tokens} tokens")


def _norm_after(
    reduce: Callable[[torch.Tensor], torch.Tensor], also_return: bool = False
) -> Callable[..., Any]:
    def fn(x, residual, norm_w):  # type: ignore[no-untyped-def]
        reduced = reduce(x)
        normed, residual_out = ops.fused_add_rms_norm(reduced, residual, norm_w, EPS)
        return (*ops.mxfp4_quant(normed), residual_out, *([reduced] if also_return else []))

    return fn


def _in_place(x: torch.Tensor) -> torch.Tensor:
    """``dist.all_reduce`` of a graph input, in place: traced as all_reduce + wait + a copy_
    of the reduced value back into the input (a second user)."""
    dist.all_reduce(x)
    return x


def scenario_must_not_fire(rank: int, group_name: str) -> None:
    x, residual, _, norm_w, _ = inputs(rank, 4)
    reduce_sum = lambda x: funcol.all_reduce(x, "sum", group_name)  # noqa: E731
    cases: list[tuple[str, Callable[..., Any], str]] = [
        (
            "max",
            _norm_after(lambda x: funcol.all_reduce(x, "max", group_name)),
            "reduce op 'max': only 'sum' is fused",
        ),
        (
            "reduced value also returned",
            _norm_after(reduce_sum, also_return=True),
            "the reduced value has 2 users",
        ),
        ("in-place dist.all_reduce", _norm_after(_in_place), "the reduced value has"),
    ]
    for what, fn, reason in cases:
        torch._dynamo.reset()
        p = FusionPass()
        out = run_compiled(fn, x.clone(), residual, norm_w, fusion_pass=p)  # (x may be mutated)
        assert not any(k.startswith(NAME) for k in p.match_table), what
        assert p.match_table.get("add_rms_quant/mxfp4/bf16") == 1, what  # the pair still fuses
        misses = [m.reason for m in p.graphs[-1].near_misses if m.family == NAME]
        assert len(misses) == 1 and misses[0].startswith(reason), (what, misses)
        plain = run_compiled(fn, x.clone(), residual, norm_w, fusion_pass=None)
        assert_bitwise_equal(out, plain, what)
        assert_bitwise_equal(out, fn(x.clone(), residual, norm_w), what)


def scenario_scheme_off_and_subgroup(rank: int, group_name: str) -> None:
    """mxfp4 not enabled: the all-reduce still folds into the add-norm (no-quant form); a second
    group's name is carried into the fused op."""
    sub = dist.new_group(list(range(dist.get_world_size())))
    x, residual, _, norm_w, _ = inputs(rank, 4)
    fn = _norm_after(lambda x: funcol.all_reduce(x, "sum", sub))
    p = FusionPass(schemes=["mxfp8"], keep_graphs=True)
    out = run_compiled(fn, x, residual, norm_w, fusion_pass=p)
    assert p.match_table == {f"{NAME}/ar_add_rms/bf16": 1}
    assert f"'{sub.group_name}'" in p.graphs[-1].code_after and sub.group_name != group_name
    assert_bitwise_equal(out, fn(x, residual, norm_w))


def scenario_opcheck(rank: int, group_name: str) -> None:
    x, residual, _, norm_w, _ = inputs(rank, 4)
    opcheck(ops.all_reduce_fused_add_rms_norm.default, (x, residual, norm_w, EPS, group_name))
    for s in fusion_ops.SCHEMES.values():
        params = {"fp8_per_token": (False, FN), "fp8_group": (128, True, FN)}.get(s.name, ())
        op = getattr(ops, s.ar_add_rms_op).default
        opcheck(op, (x, residual, norm_w, EPS, group_name, *params, True, False, False))
        # the definition: the functional all-reduce, then the add-norm-quant op
        reduced = funcol.all_reduce(x, "sum", group_name).wait()
        add_op = getattr(ops, s.add_rms_op)
        assert_bitwise_equal(
            op(x, residual, norm_w, EPS, group_name, *params),
            add_op(reduced, residual, norm_w, EPS, *params),
        )
    with pytest.raises(ValueError, match="argument 'group_name': got 'no_such_group'"):
        ops.all_reduce_fused_add_rms_norm(x, residual, norm_w, EPS, "no_such_group")


class RowParallelBlock(torch.nn.Module):
    """A block written without the patterns in mind: [B, T, H] fp16 activations, eps 1e-5, the
    all-reduce of the 3-d partial read through a reshape, the residual as the norm's first
    operand or added in plain torch before our rms_norm; ``leak`` also returns the reshaped sum."""

    def __init__(self, rank: int, group_name: str, form: str) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(rank)
        self.proj = torch.nn.Parameter((torch.randn(HIDDEN, HIDDEN, generator=g) / 16).half())
        self.norm = torch.nn.Parameter(torch.ones(HIDDEN).half() + 0.01)
        self.group_name, self.form = group_name, form

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, ...]:
        partial = h @ self.proj.t()  # [B, T, H]
        flat = funcol.all_reduce(partial, "sum", self.group_name).reshape(-1, HIDDEN)
        if self.form == "plain_add":
            summed = residual + flat
            normed, res_out = ops.rms_norm(summed, self.norm, 1e-5), summed
        else:
            normed, res_out = ops.fused_add_rms_norm(residual, flat, self.norm, 1e-5)
        q, s = ops.fp8_per_token_quant(normed, True, FN)
        return (q, s, res_out, *([flat] if self.form == "leak" else []))


def scenario_user_module(rank: int, group_name: str) -> None:
    g = torch.Generator().manual_seed(20 + rank)
    h = torch.randn(2, 3, HIDDEN, generator=g).half()
    residual = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(5)).half()
    label = f"{NAME}/fp8_per_token_ue8m0_e4m3fn/fp16"
    for form in ("residual_first", "plain_add", "leak"):
        torch._dynamo.reset()
        block = RowParallelBlock(rank, group_name, form).requires_grad_(False)
        p = FusionPass()
        out = run_compiled(block, h, residual, fusion_pass=p)
        misses = [m.reason for m in p.graphs[-1].near_misses if m.family == NAME]
        if form == "leak":  # the reshaped sum is an output: the all-reduce stays
            assert label not in p.match_table, form
            assert len(misses) == 1 and misses[0].startswith("the reduced value has 2 users"), (
                misses
            )
        else:
            assert p.match_table.get(label) == 1 and misses == [], (form, p.match_table)
        assert_bitwise_equal(out, run_compiled(block, h, residual, fusion_pass=None), form)
        assert_bitwise_equal(out, block(h, residual), form)


SCENARIOS = {
    "stack": scenario_stack,
    "must_not_fire": scenario_must_not_fire,
    "scheme_off_and_subgroup": scenario_scheme_off_and_subgroup,
    "opcheck": scenario_opcheck,
    "user_module": scenario_user_module,
}
ALL_SCENARIOS = dict(SCENARIOS)  # filled in below with the model scenario


def _worker(rank: int, port: int, names: list[str], world: int = WORLD) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a timeout: a rank left waiting in a collective fails the test instead of hanging it
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        for name in names:
            ALL_SCENARIOS[name](rank, dist.group.WORLD.group_name)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensor_parallel_two_ranks() -> None:
    """All scenarios in one spawn (process start and imports dominate otherwise)."""
    mp.spawn(_worker, args=(_free_port(), list(SCENARIOS)), nprocs=WORLD)


# --- 4 and 8 ranks ------------------------------------------------------------------------------
def scenario_workspace_failure(rank: int, group_name: str) -> None:
    """The one-shot kernel's symmetric workspace fails on one rank only (forced: its allocation
    raises out of memory): every rank ends with the same clear error, and none reaches the
    rendezvous (where the others would wait for the failed rank forever). Failing on every
    rank (no symmetric memory on the platform) falls back on every rank, with a warning."""
    import torch.distributed._symmetric_memory as symm_mem

    from fusion_ops.triton_backend import all_reduce as ar

    world = dist.get_world_size()

    def empty_failing_on(bad: set[int]) -> Callable[..., torch.Tensor]:
        def empty(*size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            if rank in bad:
                raise torch.OutOfMemoryError("CUDA out of memory (forced by the test)")
            return torch.empty(*size, dtype=dtype)  # a CPU stand-in for this rank's buffer

        return empty

    reached: list[str] = []

    def rendezvous(buffer: torch.Tensor, name: str) -> None:
        reached.append(name)
        raise AssertionError("a rank reached the rendezvous")

    cpu = torch.device("cpu")
    with (
        mock.patch.dict(os.environ, {ar.ONE_SHOT_ENV: "4096"}),
        mock.patch.object(symm_mem, "rendezvous", rendezvous),
    ):
        bad = world - 1
        with mock.patch.object(symm_mem, "empty", empty_failing_on({bad})):
            expected = rf"rank\(s\) \[{bad}\] of {world}; rank {bad}: OutOfMemoryError: CUDA out"
            with pytest.raises(ar.WorkspaceError, match=expected):
                ar._make_workspace(group_name, cpu)
        with mock.patch.object(symm_mem, "empty", empty_failing_on({0, 2})):
            with pytest.raises(ar.WorkspaceError, match=rf"rank\(s\) \[0, 2\] of {world}"):
                ar._make_workspace(group_name, cpu)
        with mock.patch.object(symm_mem, "empty", empty_failing_on(set(range(world)))):
            with pytest.warns(UserWarning, match="no symmetric memory for group"):
                assert ar._make_workspace(group_name, cpu) is None
    assert reached == []


ALL_SCENARIOS["workspace_failure"] = scenario_workspace_failure
# at 4 ranks: the whole stack (matches, bytes, the same on every rank) and the workspace's
# set-up failure; the op checks and sub-groups run at 2 ranks (rank count does not enter them)
WIDE_SCENARIOS = ["stack", "workspace_failure"]


@pytest.mark.slow
def test_tensor_parallel_four_ranks() -> None:
    pytest.importorskip("triton")  # the workspace set-up lives in the Triton backend
    mp.spawn(_worker, args=(_free_port(), WIDE_SCENARIOS, 4), nprocs=4)


def test_workspace_failure_at_eight_ranks() -> None:
    """The set-up agreement at the widest group the kernel takes (8: MAX_WORLD); the compiled
    stack at 8 ranks takes the same code path as at 4 under gloo (8 compiling processes on 2
    cores: minutes), so it runs at 4 only."""
    pytest.importorskip("triton")
    mp.spawn(_worker, args=(_free_port(), ["workspace_failure"], 8), nprocs=8)


# --- the reference DeepSeek-V4 with TP=2 ----------------------------------------------------------
def scenario_model(rank: int, group_name: str) -> None:
    """Prefill + decode of the tiny model, row-parallel wo_b and expert down projections: the
    matches follow from the config, logits and every cache byte equal the model compiled
    without the pass, and every rank computes the same logits."""
    import dsv4_model as dm
    from fusion_passes.testing import fresh_inductor
    from tests.model_expectations import expected_tp_matches

    cfg = dm.tiny(residual="add")
    tp = dm.TensorParallel(group_name, rank, dist.get_world_size())

    def run(fusion_pass: FusionPass | None) -> dm.RunResult:
        model, caches = dm.build(cfg, batch=2, max_len=40, tp=tp)
        prompts, decode_ids = dm.token_ids(cfg, 2, 20, 2)
        options = {"post_grad_custom_post_pass": fusion_pass} if fusion_pass else {}
        with fresh_inductor():
            fn = torch.compile(model, options=options, fullgraph=True)
            return dm.run(caches, fn, fn, prompts, decode_ids)

    p = FusionPass()
    fused, plain = run(p), run(None)
    assert [g.matches for g in p.graphs] == [
        dict(expected_tp_matches(cfg, decode=False)),
        dict(expected_tp_matches(cfg, decode=True)),
    ]
    assert all(g.ops_after.get("fused_add_rms_norm", 0) == 0 for g in p.graphs)
    assert not [m for g in p.graphs for m in g.near_misses if m.family == NAME]
    for name in ("prefill_logits", "decode_logits", "caches"):
        assert_bitwise_equal(getattr(fused, name), getattr(plain, name), name)
    _same_on_every_rank(fused.prefill_logits + fused.decode_logits)


ALL_SCENARIOS["model"] = scenario_model


@pytest.mark.slow
def test_tensor_parallel_model() -> None:
    mp.spawn(_worker, args=(_free_port(), ["model"]), nprocs=WORLD)


def test_rows_split_only_where_every_program_stays_resident() -> None:
    """The one-shot kernel's split (programs per row): all programs resident at once (they wait
    on the peers), parts of whole quant groups, the most programs that allows."""
    from fusion_ops.launch_policy import ALL_REDUCE_MAX_SPLIT as MAX_SPLIT
    from fusion_ops.launch_policy import ALL_REDUCE_MIN_PART as MIN_PART
    from fusion_ops.launch_policy import all_reduce_parts_per_row as parts_per_row

    def fits(rows: int, block: int, group: int, split: int) -> bool:
        return rows * split <= 128 and block // split >= max(MIN_PART, group)

    for rows in range(1, 300):
        for block, group in ((8192, 1), (8192, 128), (1024, 128), (256, 1), (8192, 8192)):
            split = parts_per_row(rows, block, group, 128)
            assert split in (1, 2, 4, 8)
            assert split == 1 or fits(rows, block, group, split)
            assert split == MAX_SPLIT or not fits(rows, block, group, 2 * split)
    assert parts_per_row(1, 8192, 1, 132) == MAX_SPLIT
    assert parts_per_row(16, 8192, 128, 132) == 8
    assert parts_per_row(17, 8192, 128, 132) == 4
    assert parts_per_row(200, 8192, 1, 132) == 1
