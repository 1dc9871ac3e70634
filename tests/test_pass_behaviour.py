"""Pass behaviour: must-not-fire cases (with their near-miss reasons), dynamic shapes, warm cache,
uuid, registration under fake tensors, dumps and TORCH_TRACE."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fusion_ops
from fusion_passes import ENV_DUMP_DIR, FusionPass
from fusion_passes.fusion_pass import ServedFromCache
from fusion_passes.testing import (
    PassDidNotRun,
    assert_bitwise_equal,
    assert_fully_replaced,
    run_compiled,
)
from patterns import FAMILIES
from patterns import quant_variants as qv
from tests.cache_inputs import rope_case

ops = torch.ops.fusion_ops
FN = torch.float8_e4m3fn


def near_miss_reasons(p: FusionPass) -> list[str]:
    return [m.reason for g in p.graphs for m in g.near_misses]


def x_w(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(7)
    return torch.randn(4, 256, generator=g).to(dtype), torch.randn(256, generator=g).to(dtype)


# --- must not fire ---------------------------------------------------------------------------
def test_normed_output_with_another_user_fires_returning_it(full_pass) -> None:
    """Fan-out of the normed value (router gate + expert quant): the fused op returns it too."""
    x, w = x_w()

    def fn(x, w):
        y = ops.rms_norm(x, w, 1e-6)
        return ops.mxfp4_quant(y), y * 2  # the unquantized value is needed too

    out = run_compiled(fn, x, w, fusion_pass=full_pass)
    assert full_pass.match_table == {"rms_quant/mxfp4+normed/bf16": 1}
    assert_fully_replaced(full_pass, ["rms_norm", "mxfp4_quant"])
    assert_bitwise_equal(out, fn(x, w))


def test_add_norm_normed_output_with_another_user_fires_returning_it(full_pass) -> None:
    x, w = x_w()

    def fn(x, r, w):
        y, res = ops.fused_add_rms_norm(x, r, w, 1e-6)
        return ops.mxfp8_quant(y), res, y.sum()

    out = run_compiled(fn, x, x.clone(), w, fusion_pass=full_pass)
    assert full_pass.match_table == {"add_rms_quant/mxfp8+normed/bf16": 1}
    assert_bitwise_equal(out, fn(x, x.clone(), w))


def test_add_norm_last_layer_residual_unused(full_pass) -> None:
    x, w = x_w()

    def fn(x, r, w):
        y, _ = ops.fused_add_rms_norm(x, r, w, 1e-6)
        return ops.fp8_per_token_quant(y, False, FN)

    out = run_compiled(fn, x, x.clone(), w, fusion_pass=full_pass)
    assert full_pass.match_table == {"add_rms_quant/fp8_per_token_e4m3fn/bf16": 1}
    assert_bitwise_equal(out, fn(x, x.clone(), w))


def test_cast_between_norm_and_quant_does_not_fire(full_pass) -> None:
    x, w = x_w()

    def fn(x, w):
        return ops.fp8_per_token_quant(ops.rms_norm(x, w, 1e-6).half(), False, FN)

    out = run_compiled(fn, x, w, fusion_pass=full_pass)
    assert full_pass.matched_count == 0
    assert_bitwise_equal(out, fn(x, w))
    assert near_miss_reasons(full_pass) == [
        "dtype fp16 vs bf16: a cast sits between the norm and the quant op"
    ]


def test_scheme_not_enabled_does_not_fire() -> None:
    p = FusionPass(fusions=["rms_quant"], schemes=["mxfp4"])
    x, w = x_w()

    def fn(x, w):
        return ops.mxfp4_quant(ops.rms_norm(x, w, 1e-6)), ops.mxfp8_quant(ops.rms_norm(x, w, 1e-5))

    out = run_compiled(fn, x, w, fusion_pass=p)
    assert p.match_table == {"rms_quant/mxfp4/bf16": 1}
    assert_bitwise_equal(out, fn(x, w))
    assert near_miss_reasons(p) == [
        "quant scheme 'mxfp8' is not enabled in this pass (enabled: ['mxfp4'])"
    ]


@pytest.mark.parametrize(
    "kv_positions,kv_neox,layout,reason",
    [
        ("flipped", False, "dsv4_fp8", "no q rope shares the kv rope's positions"),
        ("same", False, "bf16", "differ: is_neox True vs False"),
    ],
)
def test_rope_q_and_kv_that_differ_do_not_fire(
    full_pass, kv_positions, kv_neox, layout, reason
) -> None:
    """q and kv ropes must share positions, table, rope_dim and style to fuse."""
    proj, positions, cos_sin, cache, slots = rope_case(layout)
    q_neox = kv_positions == "same"  # the second case differs in style only

    def fn(proj, positions, cos_sin, cache, slots):
        kv_pos = positions.flip(0) if kv_positions == "flipped" else positions
        q_rot = ops.rope(positions, proj[:, :1024].view(-1, 2, 512), cos_sin, 64, q_neox)
        kv_rot = ops.rope(kv_pos, proj[:, 1024:], cos_sin, 64, kv_neox)
        ops.mla_cache_write(kv_rot, cache, slots, layout)
        return q_rot * 1.0

    eager_cache = cache.clone()
    expected = fn(proj, positions, cos_sin, eager_cache, slots)
    out = run_compiled(fn, proj, positions, cos_sin, cache, slots, fusion_pass=full_pass)
    assert full_pass.matched_count == 0
    assert_bitwise_equal(out, expected)
    assert_bitwise_equal(cache, eager_cache, "whole cache")
    assert reason in near_miss_reasons(full_pass)[0]


def test_kv_only_cache_write_does_not_fire(full_pass) -> None:
    proj, positions, cos_sin, cache, slots = rope_case("dsv4_fp8")

    def fn(proj, positions, cos_sin, cache, slots):
        ops.mla_cache_write(
            ops.rope(positions, proj[:, 1024:], cos_sin, 64, False), cache, slots, "dsv4_fp8"
        )
        return proj * 1.0

    eager_cache = cache.clone()
    fn(proj, positions, cos_sin, eager_cache, slots)
    run_compiled(fn, proj, positions, cos_sin, cache, slots, fusion_pass=full_pass)
    assert full_pass.matched_count == 0
    assert_bitwise_equal(cache, eager_cache, "whole cache")
    assert "kv-only" in near_miss_reasons(full_pass)[0]


def test_dequant_with_another_user_or_non_fp8_cast_does_not_fire(full_pass) -> None:
    cache = fusion_ops.alloc_mla_cache(2, 4)
    cache.random_(0, 200)
    ids = torch.tensor([1, 0])

    def fn(cache, ids):
        kv = ops.dequant_cache(cache, ids, "dsv4_fp8")
        other = ops.dequant_cache(cache, ids[:1], "dsv4_fp8")
        return kv.to(FN), kv.float().sum(), other.half()

    out = run_compiled(fn, cache, ids, fusion_pass=full_pass)
    assert full_pass.matched_count == 0
    assert_bitwise_equal(out, run_compiled(fn, cache, ids, fusion_pass=None))
    reasons = sorted(near_miss_reasons(full_pass))
    assert reasons[0].startswith("dequantized output has 2 users")
    assert reasons[1] == "it is cast to fp16, not to an FP8 dtype (e4m3fn / e4m3fnuz)"


def test_disabled_family_does_not_fire() -> None:
    p = FusionPass(fusions=["dequant_fp8"])
    x, w = x_w()
    run_compiled(lambda x, w: ops.mxfp4_quant(ops.rms_norm(x, w, 1e-6)), x, w, fusion_pass=p)
    assert p.matched_count == 0 and p.graphs[0].near_misses == []


# --- shapes, eps ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["mark_dynamic", "dynamic=True"])
def test_dynamic_token_count(full_pass, mode: str) -> None:
    x, w = x_w()
    r = torch.randn_like(x)
    eps = 1e-5  # a Python float: dynamic=True may lift it to a graph input

    def fn(x, r, w):
        y, res = ops.fused_add_rms_norm(x, r, w, eps)
        q = ops.fp8_group_quant(y, 128, True, FN)
        return q, ops.mxfp4_quant(ops.rms_norm(res, w, eps))

    if mode == "mark_dynamic":
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(r, 0)
    x2, r2 = torch.randn(9, 256).to(x.dtype), torch.randn(9, 256).to(x.dtype)
    out = run_compiled(
        fn,
        x,
        r,
        w,
        fusion_pass=full_pass,
        dynamic=(mode == "dynamic=True") or None,
        calls=[(x2, r2, w)],
    )
    assert len(full_pass.graphs) == 1  # one dynamic graph serves both token counts
    assert full_pass.match_table == {
        "add_rms_quant/fp8_group128_ue8m0_e4m3fn/bf16": 1,
        "rms_quant/mxfp4/bf16": 1,
    }
    assert_bitwise_equal(out, fn(x, r, w))
    assert "Sym(s" in full_pass.graphs[0].code_after  # the graph really has a symbolic size


def test_dynamic_graph_gives_exact_results_for_other_sizes(full_pass) -> None:
    x, w = x_w()
    fn = lambda x, w: ops.mxfp8_quant(ops.rms_norm(x, w, 1e-6))  # noqa: E731
    with torch._inductor.config.patch(force_disable_caches=True):
        compiled = torch.compile(
            fn, options={"post_grad_custom_post_pass": full_pass}, dynamic=True
        )
        for t in (3, 17, 40):  # size 1 would recompile (0/1 specialization)
            xt = torch.randn(t, 256).to(torch.bfloat16)
            assert_bitwise_equal(compiled(xt, w), fn(xt, w))
    assert full_pass.matched_count == 1 and len(full_pass.graphs) == 1


# --- caches and uuid --------------------------------------------------------------------------
def test_warm_cache_is_reported_not_silently_zero(tmp_path: Path, monkeypatch) -> None:
    """Second compile in a process with a warm FX-graph cache: the pass does not run; the helper
    raises instead of letting a test read matched_count == 0."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    p = FusionPass(fusions=["rms_quant"])
    x, w = x_w()

    def fn(x, w):
        return ops.mxfp4_quant(ops.rms_norm(x, w, 1e-6))

    with torch._inductor.config.patch(fx_graph_cache=True, force_disable_caches=False):
        run_compiled(fn, x, w, fusion_pass=p, fresh=False)
        assert p.matched_count == 1
        torch._dynamo.reset()
        with (
            pytest.raises(PassDidNotRun, match="warm Inductor/AOTAutograd cache"),
            pytest.warns(ServedFromCache, match="1 graph"),
        ):
            run_compiled(fn, x, w, fusion_pass=p, fresh=False)
    assert p.matched_count == 1
    assert p.cache_hits == 1 and p.summary()["graphs_from_cache"] == 1
    run_compiled(fn, x, w, fusion_pass=p)  # fresh (the default) runs the pass again
    assert p.matched_count == 2


def test_uuid_stable_and_sensitive_to_config_and_source(monkeypatch, tmp_path: Path) -> None:
    import fusion_passes.fusion_pass as fp

    a, b = FusionPass(fusions=["rms_quant"]), FusionPass(fusions=["rms_quant"])
    assert a.uuid() == b.uuid() and isinstance(a.uuid(), str)
    assert FusionPass(fusions=["rms_quant"], schemes=["mxfp4"]).uuid() != a.uuid()
    assert FusionPass(fusions=["rms_quant", "dequant_fp8"]).uuid() != a.uuid()
    # a change in any source file of the rewrite changes the uuid
    extra = tmp_path / "pattern_source.py"
    extra.write_text("x = 1\n")
    files = fp._source_files()
    assert any(f.endswith("patterns/rms_quant.py") for f in files)
    assert any(f.endswith("fusion_ops/library/quant.py") for f in files)
    assert any(f.endswith("fusion_ops/launch_policy.py") for f in files)  # inductor_launch's code
    assert any(f.endswith("triton_backend/kernels/norm_quant.py") for f in files)
    monkeypatch.setattr(fp, "_source_files", lambda: (*files, str(extra)))
    first = a.uuid()
    assert first == a.uuid()
    extra.write_text("x = 2\n")
    assert a.uuid() != first


def test_registration_runs_no_real_kernel(monkeypatch) -> None:
    """Patterns are traced under fake tensors: no reference kernel runs while building the pass."""
    from fusion_ops import backends, native
    from fusion_ops.library import native_kernels

    loaded = native_kernels()
    calls = []
    real_run_op = backends.run_op

    def counting(op_name, device_type, args):
        calls.append(op_name)
        return real_run_op(op_name, device_type, args)

    def native_runs() -> list[int]:  # the C++ CPU kernels run without run_op
        return [native.last_run(n)[0] for n in native.NATIVE_CPU_OPS] if loaded else []

    monkeypatch.setattr("fusion_ops.library.define.run_op", counting)
    before = native_runs()
    p = FusionPass()
    assert calls == []
    assert native_runs() == before
    assert p.pattern_count == sum(len(m.pattern_specs(p.schemes)) for m in FAMILIES.values())
    ops.mxfp4_quant(torch.randn(2, 32))
    assert calls == ["mxfp4_quant"]  # the counters do see real calls
    ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
    assert calls == ["mxfp4_quant"] + ([] if loaded else ["rms_norm"])
    assert native_runs() != before or not loaded


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown fusions \['rms_qant'\]"):
        FusionPass(fusions=["rms_qant"])
    with pytest.raises(ValueError, match=r"unknown schemes \['nvfp4'\]"):
        FusionPass(schemes=["nvfp4"])
    with pytest.raises(TypeError, match="must be a list of names"):
        FusionPass(fusions="rms_quant")


# --- dumps ------------------------------------------------------------------------------------
def test_dumps_summary_and_graphs(tmp_path: Path) -> None:
    p = FusionPass(dump_dir=tmp_path / "run1")
    x, w = x_w()

    def fn(x, w):
        y = ops.rms_norm(x, w, 1e-6)
        return ops.mxfp4_quant(ops.rms_norm(x, w, 1e-6)), ops.mxfp8_quant(y.half()), y + 1

    run_compiled(fn, x, w, fusion_pass=p)
    d = tmp_path / "run1"
    assert sorted(f.name for f in d.iterdir()) == [
        "graph_0.after.py",
        "graph_0.before.py",
        "patterns.py",
        "summary.json",
    ]
    before, after = (d / "graph_0.before.py").read_text(), (d / "graph_0.after.py").read_text()
    assert before.count("fusion_ops.rms_norm.default") == 2 and "rms_norm_mxfp4_quant" not in before
    assert after.count("fusion_ops.rms_norm_mxfp4_quant.default") == 1
    assert after.count("fusion_ops.rms_norm.default") == 1  # the one behind a cast stays
    summary = json.loads((d / "summary.json").read_text())
    assert summary["matched_count"] == 1
    assert summary["match_table"] == {"rms_quant/mxfp4/bf16": 1}
    g = summary["graphs"][0]
    assert g["ops_before"]["rms_norm"] == 2 and g["ops_after"]["rms_norm"] == 1
    assert g["ops_after"]["rms_norm_mxfp4_quant"] == 1
    assert g["near_misses"][0]["op"] == "rms_norm"
    assert g["near_misses"][0]["reason"] == (
        "dtype fp16 vs bf16: a cast sits between the norm and the quant op"
    )
    assert summary["config"]["fusions"] == [
        "add_rms_quant",
        "rms_quant",
        "qnorm_rope_cache",
        "rope_cache",
        "norm_rope_cache",
        "dequant_fp8",
        "add_rms",
        "q_kv_norm",
        "ar_add_rms_quant",
    ]
    patterns_py = (d / "patterns.py").read_text()
    assert "# rms_quant/mxfp4" in patterns_py and "# rope_cache/gptj_dsv4_fp8_v2" in patterns_py
    sections = re.findall(
        r"^# (?:add_rms_quant|rms_quant|qnorm_rope_cache|rope_cache|norm_rope_cache|dequant_fp8"
        r"|add_rms|ar_add_rms_quant)/",
        patterns_py,
        flags=re.MULTILINE,
    )
    assert len(sections) == p.pattern_count == expected_pattern_count(p.schemes)


def expected_pattern_count(schemes: list[str]) -> int:
    """Patterns the default pass registers, counted from what each family covers: a quant
    variant per MX scheme, 2 (ue8m0) x 2 (FP8 dtype) per FP8 scheme; rms_quant per norm source
    x (plain, +normed); add_rms_quant per norm source and plain ``x + r`` x (normed kept or not)
    x (residual kept or not); rope_cache and qnorm_rope_cache (neox or not) x 2 cache layouts x
    (v1, v2) each; add_rms (residual kept or not);
    norm_rope_cache (neox or not) x 2 cache layouts x (v1, v2) x (cast to what the cache stores,
    or none); dequant_fp8 2 cache layouts x 2 FP8 dtypes;
    q_kv_norm none (a graph rewrite); ar_add_rms_quant one graph pattern (the all-reduce,
    folded into whichever add-norm op reads it)."""
    variants = sum(1 if s in ("mxfp4", "mxfp8") else 4 for s in schemes)
    norm_sources = 2 if qv.vllm_ir_available() else 1
    rms = norm_sources * 2 * variants
    add = (norm_sources + 1) * 2 * 2 * variants
    norm_rope_cache = 2 * 2 * 2 * 2
    rope_cache = qnorm_rope_cache = 2 * 2 * 2
    add_rms = 2
    return rms + add + rope_cache + qnorm_rope_cache + norm_rope_cache + 2 * 2 + add_rms + 1


def test_dump_dir_from_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_DUMP_DIR, str(tmp_path / "env"))
    p = FusionPass(fusions=["rms_quant"])
    x, w = x_w()
    run_compiled(lambda x, w: ops.mxfp4_quant(ops.rms_norm(x, w, 1e-6)), x, w, fusion_pass=p)
    assert (tmp_path / "env" / "graph_0.after.py").exists()
    assert json.loads((tmp_path / "env" / "summary.json").read_text())["matched_count"] == 1


def test_torch_trace_gets_before_and_after_graphs(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import torch, fusion_ops
        from fusion_passes import FusionPass
        from fusion_passes.testing import run_compiled
        ops = torch.ops.fusion_ops
        p = FusionPass(fusions=["rms_quant"])
        x, w = torch.randn(4, 64), torch.randn(64)
        run_compiled(lambda x, w: ops.mxfp4_quant(ops.rms_norm(x, w, 1e-6)), x, w, fusion_pass=p)
        assert p.matched_count == 1
    """)
    env = {**os.environ, "TORCH_TRACE": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    text = "".join(f.read_text() for f in tmp_path.glob("*.log"))
    assert '"name": "fusion_passes_graph_0_before"' in text
    assert '"name": "fusion_passes_graph_0_after"' in text
    assert "rms_norm_mxfp4_quant" in text


def test_fully_replaced_helper_reports_leftovers(full_pass) -> None:
    x, w = x_w()

    def fn(x, w):
        return ops.mxfp4_quant(ops.rms_norm(x, w, 1e-6).float())

    run_compiled(fn, x, w, fusion_pass=full_pass)
    with pytest.raises(AssertionError, match=r"rms_norm: 1 before → 1 left after the pass"):
        assert_fully_replaced(full_pass, ["rms_norm"])
    with pytest.raises(AssertionError, match="rope: not in any graph before the pass"):
        assert_fully_replaced(full_pass, ["rope"])


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="vLLM installed: tests/test_vllm_*"
)
def test_vllm_adapter_without_vllm_says_what_to_install() -> None:
    with pytest.raises(ModuleNotFoundError, match=r"fusion_passes\.vllm needs vLLM.*\[vllm\]"):
        importlib.import_module("fusion_passes.vllm")


def test_a_new_pass_object_clears_stale_graph_dumps(tmp_path: Path) -> None:
    """summary.json and the graph files describe one pass object: a new one with the same
    dump directory removes the graphs an earlier one wrote."""
    x, w = x_w()
    fn = lambda x, w: ops.mxfp4_quant(ops.rms_norm(x, w, 1e-6))  # noqa: E731
    run_compiled(fn, x, w, fusion_pass=FusionPass(fusions=["rms_quant"], dump_dir=tmp_path))
    assert (tmp_path / "graph_0.after.py").exists()
    FusionPass(fusions=["rms_quant"], dump_dir=tmp_path)
    assert not list(tmp_path.glob("graph_*.py"))
    assert json.loads((tmp_path / "summary.json").read_text())["graphs"] == []


def _model_code(x, w):  # type: ignore[no-untyped-def]
    return ops.mxfp4_quant(ops.rms_norm(x, w, 1e-6))


def test_fused_nodes_carry_the_model_code_they_replace() -> None:
    """The dump of the rewritten graph names the model's line for the fused op, not
    ``No stacktrace found``."""
    p = FusionPass(fusions=["rms_quant"], keep_graphs=True)
    run_compiled(_model_code, *x_w(), fusion_pass=p)
    after = p.graphs[0].code_after
    line = next(ln for ln in after.splitlines() if "rms_norm_mxfp4_quant.default(" in ln)
    before_line = after.splitlines()[after.splitlines().index(line) - 1]
    assert "in _model_code" in before_line and "mxfp4_quant" in before_line, before_line
