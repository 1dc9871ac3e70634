"""q_kv_norm: the two norms of one split projection (DeepSeek-V4's q_lora | kv) in one op,
[→ the q quant]. Fires exactly where expected, never where it must not, keeps every byte."""

from __future__ import annotations

import pytest
import torch

import fusion_ops
from fusion_passes import FusionPass
from fusion_passes.testing import (
    assert_bitwise_equal,
    assert_fully_replaced,
    assert_ops_present,
    near_miss_reasons,
    run_compiled,
)
from patterns import q_kv_norm
from patterns import quant_variants as qv

ops = torch.ops.fusion_ops
FN = torch.float8_e4m3fn


Q_LORA, KV = 256, 128


def projection(tokens: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 64, generator=g).to(torch.bfloat16)
    w = (torch.randn(64, Q_LORA + KV, generator=g) / 8).to(torch.bfloat16)
    wq = (1 + 0.1 * torch.randn(Q_LORA, generator=g)).to(torch.bfloat16)
    wkv = (1 + 0.1 * torch.randn(KV, generator=g)).to(torch.bfloat16)
    return x, w, wq, wkv


def q_label(v: qv.QuantVariant | None) -> str:
    if v is None:
        return "q_kv_norm/rms/bf16"
    group = 128 if v.has_group else None
    return f"q_kv_norm/{qv.scheme_label(v.scheme, group, v.use_ue8m0, v.fp8_dtype)}/bf16"


VARIANTS = [None, *qv.variants(("mxfp4", "mxfp8")), qv.QuantVariant("fp8_group", False, FN)]
VARIANTS.append(qv.QuantVariant("fp8_per_token", True, FN))


@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: "rms" if v is None else v.name)
@pytest.mark.parametrize("kv_first", [False, True])
def test_q_kv_norm_split_projection(full_pass, v, kv_first: bool) -> None:
    """DSV4's attention head: wq_a|wkv projection split, q-lora norm [→ quant], kv norm (in
    either program order, eps of their own); one fused op, bit-equal to eager and to the
    compile without the pass."""

    def fn(x, w, wq, wkv):
        qr, kv = (x @ w).split([Q_LORA, KV], dim=-1)
        if kv_first:
            kv_n = ops.rms_norm(kv, wkv, 1e-5)
        q = ops.rms_norm(qr, wq, 1e-6)
        q_out = (q * 2,) if v is None else v.quant()(q, *v.params(128))
        if not kv_first:
            kv_n = ops.rms_norm(kv, wkv, 1e-5)
        return q_out, kv_n + 1

    args = projection()
    out = run_compiled(fn, *args, fusion_pass=full_pass)
    assert full_pass.match_table == {q_label(v): 1}
    fused = "q_kv_rms_norm" if v is None else fusion_ops.SCHEMES[v.scheme].q_kv_rms_op
    assert_fully_replaced(full_pass, ["rms_norm"])
    assert_ops_present(full_pass, [fused])
    assert_bitwise_equal(out, run_compiled(fn, *args, fusion_pass=None))
    assert_bitwise_equal(out, fn(*args))


def test_q_kv_norm_dynamic_tokens(full_pass) -> None:
    """Dynamic token count: one match, exact for every size the graph then runs."""

    def fn(x, w, wq, wkv):
        qr, kv = (x @ w).split([Q_LORA, KV], dim=-1)
        q, s = ops.fp8_group_quant(ops.rms_norm(qr, wq, 1e-6), 128, False, FN)
        return q, s, ops.rms_norm(kv, wkv, 1e-6)

    sizes = [projection(t, seed=t) for t in (3, 9, 17)]
    out = run_compiled(fn, *sizes[0], fusion_pass=full_pass, dynamic=True, calls=sizes[1:])
    assert full_pass.match_table == {q_label(qv.QuantVariant("fp8_group", False, FN)): 1}
    assert len(full_pass.graphs) == 1
    assert_bitwise_equal(out, fn(*sizes[0]))
    compiled = torch.compile(fn, dynamic=True, options={"post_grad_custom_post_pass": full_pass})
    for args in sizes[1:]:
        assert_bitwise_equal(compiled(*args), fn(*args))


def test_q_kv_norm_must_not_fire(full_pass) -> None:
    """Both quantized, different token counts, norms of unrelated tensors, two norms of the very
    same tensor: nothing fuses horizontally; the siblings left get a near miss each."""

    def fn(x, w, wq, wkv):
        p = x @ w
        qr, kv = p.split([Q_LORA, KV], dim=-1)
        a = ops.mxfp4_quant(ops.rms_norm(qr, wq, 1e-6))  # both parts quantized
        b = ops.mxfp8_quant(ops.rms_norm(kv, wkv, 1e-6))
        c = ops.rms_norm(p[:3, :Q_LORA], wq, 1e-6)  # a part of other rows
        e = ops.rms_norm(x, wq[:64], 1e-6)  # x and x @ w: not parts of one tensor
        f = ops.rms_norm(x, wkv[:64], 1e-6)  # two norms of x itself
        return a, b, c + 1, e + f

    args = projection()
    out = run_compiled(fn, *args, fusion_pass=full_pass)
    assert not any(label.startswith("q_kv_norm/") for label in full_pass.match_table)
    reasons = near_miss_reasons(full_pass, "q_kv_norm")
    assert "both norms are quantized: no fused op quantizes both" in reasons
    assert "leading dims differ: (5,) vs (3,)" in reasons
    assert_bitwise_equal(out, fn(*args))


def test_q_kv_norm_scheme_off_pairs_the_plain_norms() -> None:
    """With the q quant's scheme off, rms_quant leaves the q norm alone and the pair fuses as
    two plain norms (the quant reads the fused op's first output)."""
    p = FusionPass(schemes=["mxfp4"])

    def fn(x, w, wq, wkv):
        qr, kv = (x @ w).split([Q_LORA, KV], dim=-1)
        q, s = ops.fp8_group_quant(ops.rms_norm(qr, wq, 1e-6), 128, False, FN)
        return q, s, ops.rms_norm(kv, wkv, 1e-6)

    args = projection()
    out = run_compiled(fn, *args, fusion_pass=p)
    assert p.match_table == {"q_kv_norm/rms/bf16": 1}
    assert_bitwise_equal(out, fn(*args))


def test_q_kv_norm_never_moves_a_norm_across_a_mutation() -> None:
    """A graph that is not functionalized (the pass used on a hand-made graph): an in-place op
    on the projection between the two norms makes the pair a near miss, not a fusion."""
    x, w, wq, wkv = projection()
    graph = torch.fx.Graph()
    proj, gq, gkv = (graph.placeholder(n) for n in ("proj", "wq", "wkv"))
    qr = graph.call_function(torch.ops.aten.slice.Tensor, (proj, 1, 0, Q_LORA))
    q = graph.call_function(ops.rms_norm.default, (qr, gq, 1e-6))
    bump = graph.call_function(torch.ops.aten.add_.Scalar, (proj, 1.0))
    kv = graph.call_function(torch.ops.aten.slice.Tensor, (proj, 1, Q_LORA, Q_LORA + KV))
    k = graph.call_function(ops.rms_norm.default, (kv, gkv, 1e-6))
    graph.output((q, k, bump))
    fake = torch._subclasses.FakeTensorMode()
    vals = {"proj": x @ w, "wq": wq, "wkv": wkv}
    for node in graph.nodes:  # fake values, as the pass sees them in a real compile
        if node.op == "placeholder":
            node.meta["val"] = fake.from_tensor(vals[node.name])
        elif node.op == "call_function":
            args = torch.fx.node.map_arg(node.args, lambda n: n.meta["val"])
            with fake:
                node.meta["val"] = node.target(*args)
    assert q_kv_norm.rewrite(graph, ("mxfp4",)) == 0
    [(norm, reason)] = q_kv_norm._pairs(graph, ("mxfp4",))[1]
    assert norm is q and reason == f"{bump.name} mutates a tensor between the two norms"
    graph.output_node().args = ((q, k),)
    graph.erase_node(bump)
    assert q_kv_norm.rewrite(graph, ("mxfp4",)) == 1
