"""The DeepSeek-V4 layer's deeper fusions: q_kv_norm (the two norms of one split projection in
one op), norm_rope_cache (the compressor's norm → cast → rope → cache write in one op) and
qnorm_rope_cache (per-head q norm, both ropes and the cache write in one op).
Each fires exactly where expected, never where it must not, and keeps every byte."""

from __future__ import annotations

import pytest
import torch

import fusion_ops
from fusion_passes import FusionPass
from fusion_passes.testing import (
    assert_bitwise_equal,
    assert_fully_replaced,
    assert_ops_present,
    run_compiled,
)
from patterns import q_kv_norm
from patterns import quant_variants as qv
from tests.cache_inputs import target_cache

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


def near_miss_reasons(p: FusionPass, family: str) -> list[str]:
    return [m.reason for g in p.graphs for m in g.near_misses if m.family == family]


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


# --- norm_rope_cache ---------------------------------------------------------------------------
def compressor_case(layout: str, x_dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pooled = (torch.randn(4, 512, generator=g) * 3).to(x_dtype)
    weight = (1 + 0.1 * torch.randn(512, generator=g)).to(x_dtype)
    cos_sin = torch.randn(32, 64, generator=g)
    cache = target_cache(layout, g)
    positions = torch.tensor([0, 4, 8, 28])
    slots = torch.tensor([2, -1, 11, 5])  # -1: a group not complete yet (skipped)
    return pooled, weight, cos_sin, cache, positions, slots


def compressor_fn(layout: str, is_neox: bool, cast: bool):
    def fn(pooled, weight, cos_sin, cache, positions, slots):
        entry = ops.rms_norm(pooled, weight, 1e-6)
        if cast:
            entry = entry.to(torch.bfloat16)
        entry = ops.rope(positions, entry, cos_sin, 64, is_neox)
        ops.mla_cache_write(entry, cache, slots, layout)
        return entry * 1.0

    return fn


@pytest.mark.parametrize("hop", ["v1", "v2"])
@pytest.mark.parametrize("layout", ["dsv4_fp8", "bf16"])
@pytest.mark.parametrize("is_neox,cast", [(False, True), (True, False)])
def test_norm_rope_cache(full_pass, hop: str, layout: str, is_neox: bool, cast: bool) -> None:
    """The compressor chain (fp32 pooled rows → norm → bf16 → rope → cache), or a bf16 chain
    with no cast: one fused op; rows and every cache byte equal eager's."""
    fn = compressor_fn(layout, is_neox, cast)
    case = compressor_case(layout, torch.float32 if cast else torch.bfloat16)
    eager_cache = case[3].clone()
    expected = fn(*case[:3], eager_cache, *case[4:])
    with torch._inductor.config.patch(enable_auto_functionalized_v2=(hop == "v2")):
        out = run_compiled(fn, *case, fusion_pass=full_pass)
    style = "neox" if is_neox else "gptj"
    dtype = "fp32" if cast else "bf16"
    variant = f"{style}_{layout}{'_to_bf16' if cast else ''}_{hop}"
    assert full_pass.match_table == {f"norm_rope_cache/{variant}/{dtype}": 1}
    assert_fully_replaced(full_pass, ["rms_norm", "rope", "mla_cache_write"])
    assert_ops_present(full_pass, ["rms_norm_rope_mla_cache_write"])
    assert_bitwise_equal(out, expected, "rotated rows")
    assert_bitwise_equal(case[3], eager_cache, "whole cache")


def test_norm_rope_cache_must_not_fire(full_pass) -> None:
    """The normed value read elsewhere: the chain stays (a near miss says why). A kv rope with
    a q rope beside it goes to rope_cache, its norm to nothing (no sibling): never to this
    family."""

    def fn(pooled, weight, cos_sin, cache, positions, slots, q):
        normed = ops.rms_norm(pooled, weight, 1e-6)
        entry = ops.rope(positions, normed.to(torch.bfloat16), cos_sin, 64, False)
        ops.mla_cache_write(entry, cache, slots, "dsv4_fp8")
        kv = ops.rms_norm(pooled.to(torch.bfloat16), weight.to(torch.bfloat16), 1e-6)
        q_rot = ops.rope(positions, q, cos_sin, 64, False)
        kv_rot = ops.rope(positions, kv, cos_sin, 64, False)
        ops.mla_cache_write(kv_rot, cache, slots - 1, "dsv4_fp8")
        return normed * 2, q_rot

    case = compressor_case("dsv4_fp8", torch.float32)
    q = torch.randn(4, 2, 512).to(torch.bfloat16)
    eager_cache = case[3].clone()
    expected = fn(*case[:3], eager_cache, *case[4:], q)
    out = run_compiled(fn, *case, q, fusion_pass=full_pass)
    assert full_pass.match_table == {"rope_cache/gptj_dsv4_fp8_v2/bf16": 1}
    reasons = near_miss_reasons(full_pass, "norm_rope_cache")
    assert reasons == [
        "the normed value has other users (convert_element_type.default, mul.Tensor); the fused "
        "op returns "
        "only the rotated rows"
    ]
    assert_bitwise_equal(out, expected)
    assert_bitwise_equal(case[3], eager_cache, "whole cache")


# --- qnorm_rope_cache ----------------------------------------------------------------------------
def attention_case(layout: str, q_dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """q and kv as views of one projection ([T, 2·512 | 512], kv at a storage offset)."""
    g = torch.Generator().manual_seed(seed)
    proj = (torch.randn(5, 3 * 512, generator=g) * 3).to(q_dtype)
    cos_sin = torch.randn(32, 64, generator=g)
    if layout == "dsv4_fp8":
        cache = fusion_ops.alloc_mla_cache(3, 4)
        cache.random_(0, 256, generator=g)  # bytes the write must leave alone
    else:
        cache = torch.randn(3, 4, 512, generator=g).to(q_dtype)
    positions = torch.tensor([3, 4, 5, 6, 31])
    slots = torch.tensor([7, -1, 0, 11, 3])
    return proj, cos_sin, cache, positions, slots


def qnorm_fn(layout: str, is_neox: bool, q_norm=None):
    """DSV4's attention: per-head weightless q norm, q rope, kv rope, kv cache write.
    ``q_norm``: the norm's spelling (default: the ``weightless_rms_norm`` op)."""

    def fn(proj, cos_sin, cache, positions, slots):
        q = proj[:, :1024].view(-1, 2, 512)
        kv = proj[:, 1024:]
        q = ops.weightless_rms_norm(q, 1e-6) if q_norm is None else q_norm(q, 1e-6)
        q_rot = ops.rope(positions, q, cos_sin, 64, is_neox)
        kv_rot = ops.rope(positions, kv, cos_sin, 64, is_neox)
        ops.mla_cache_write(kv_rot, cache, slots, layout)
        return q_rot * 1.0, kv_rot

    return fn


@pytest.mark.parametrize("hop", ["v1", "v2"])
@pytest.mark.parametrize("layout", ["dsv4_fp8", "bf16"])
@pytest.mark.parametrize("is_neox", [False, True])
@pytest.mark.parametrize("only_this_family", [False, True])
def test_qnorm_rope_cache(
    full_pass, hop: str, layout: str, is_neox: bool, only_this_family: bool
) -> None:
    """Norm, both ropes and the write in one op, whether rope_cache fused the ropes first (the
    full pass) or is not enabled; q, kv and every cache byte equal eager's."""
    p = FusionPass(fusions=["qnorm_rope_cache"]) if only_this_family else full_pass
    fn = qnorm_fn(layout, is_neox)
    case = attention_case(layout)
    eager_cache = case[2].clone()
    expected = fn(case[0], case[1], eager_cache, *case[3:])
    with torch._inductor.config.patch(enable_auto_functionalized_v2=(hop == "v2")):
        out = run_compiled(fn, *case, fusion_pass=p)
    style = "neox" if is_neox else "gptj"
    assert p.match_table == {f"qnorm_rope_cache/{style}_{layout}_{hop}/bf16": 1}
    assert_fully_replaced(p, ["weightless_rms_norm", "rope", "mla_cache_write"])
    assert_ops_present(p, ["qnorm_rope_mla_cache_write"])
    assert_bitwise_equal(out, expected, "q_rot, kv_rot")
    assert_bitwise_equal(case[2], eager_cache, "whole cache")


def test_qnorm_rope_cache_must_not_fire(full_pass) -> None:
    """The normed q read elsewhere, a q rope at other positions than the kv rope's: the norm
    stays standalone (rope_cache takes what it can); each near miss says why."""

    def fn(proj, cos_sin, cache, positions, slots):
        q = proj[:, :1024].view(-1, 2, 512)
        kv = proj[:, 1024:]
        qn = ops.weightless_rms_norm(q, 1e-6)
        q_rot = ops.rope(positions, qn, cos_sin, 64, False)
        kv_rot = ops.rope(positions, kv, cos_sin, 64, False)
        ops.mla_cache_write(kv_rot, cache, slots, "dsv4_fp8")
        q2 = ops.weightless_rms_norm(q * 2, 1e-6)
        q2_rot = ops.rope(positions.flip(0), q2, cos_sin, 64, False)
        return q_rot, qn + 1, q2_rot

    case = attention_case("dsv4_fp8")
    eager_cache = case[2].clone()
    expected = fn(case[0], case[1], eager_cache, *case[3:])
    out = run_compiled(fn, *case, fusion_pass=full_pass)
    assert full_pass.match_table == {"rope_cache/gptj_dsv4_fp8_v2/bf16": 1}
    assert sorted(near_miss_reasons(full_pass, "qnorm_rope_cache")) == [
        "its rope has no kv rope + cache write beside it (same positions, table, style)",
        "the normed q has other users (add.Tensor, rope_mla_cache_write); the fused op returns "
        "only the roped q",
    ]
    assert_bitwise_equal(out, expected)
    assert_bitwise_equal(case[2], eager_cache, "whole cache")


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place between two bf16/fp16 tensors of one sign
    pattern (their bit patterns as integers)."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    assert torch.equal(a.signbit(), b.signbit())
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
def test_plain_torch_q_norm_is_fused_only_when_asked(q_dtype: torch.dtype) -> None:
    """The per-head q norm as the reference model's plain-PyTorch helper writes it
    (``dsv4_model.layers.weightless_rms``): the default pass leaves it (Inductor's summation
    order is not reproducible) and says how to get it fused; ``numerics="tolerant"`` fuses
    it, the kv side and the cache stay bit-equal, q within one unit in the last place of the
    compile without the pass."""
    from dsv4_model.layers import weightless_rms

    fn = qnorm_fn("bf16", False, q_norm=weightless_rms)
    results = {}
    for name, p in (
        ("default", FusionPass(keep_graphs=True)),
        ("plain", FusionPass(numerics="tolerant")),
        ("none", None),
    ):
        case = attention_case("bf16", q_dtype, seed=3)
        results[name] = (run_compiled(fn, *case, fusion_pass=p), case[2], p)
    dtype = "bf16" if q_dtype == torch.bfloat16 else "fp16"
    (q_ref, kv_ref), cache_ref, _ = results["none"]
    (q_def, kv_def), cache_def, default = results["default"]
    assert default.match_table == {f"rope_cache/gptj_bf16_v2/{dtype}": 1}
    assert near_miss_reasons(default, "qnorm_rope_cache") == [
        "its q is an RMS norm written in plain PyTorch (Inductor reduces it in its own order, "
        "which a fused kernel cannot reproduce bit for bit): write it as "
        'fusion_ops.weightless_rms_norm, or build FusionPass(numerics="tolerant") to fuse it '
        "anyway (last-bit differences within a tested bound)"
    ]
    assert_bitwise_equal((q_def, kv_def, cache_def), (q_ref, kv_ref, cache_ref))
    (q_plain, kv_plain), cache_plain, plain = results["plain"]
    assert plain.match_table == {f"qnorm_rope_cache/gptj_bf16_v2+tolerant/{dtype}": 1}
    assert_fully_replaced(plain, ["rope", "mla_cache_write"])
    assert_bitwise_equal((kv_plain, cache_plain), (kv_ref, cache_ref))
    assert bf16_ulps(q_plain, q_ref) <= 1


def test_plain_torch_q_norm_cast_elsewhere_does_not_fire() -> None:
    """A plain norm that casts to another dtype than q's (the matcher ignores dtype literals):
    the fused op would return q's dtype, so the pattern's check refuses it."""

    def fn(proj, cos_sin, cache, positions, slots):
        q = proj[:, :1024].view(-1, 2, 512)
        qf = q.float()
        qn = (qf * torch.rsqrt(qf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
        q_rot = ops.rope(positions, qn, cos_sin, 64, False)
        kv_rot = ops.rope(positions, proj[:, 1024:].to(torch.bfloat16), cos_sin, 64, False)
        ops.mla_cache_write(kv_rot, cache, slots, "dsv4_fp8")
        return q_rot

    p = FusionPass(numerics="tolerant")
    case = attention_case("dsv4_fp8", torch.float16)
    expected = run_compiled(fn, *case[:2], case[2].clone(), *case[3:], fusion_pass=None)
    out = run_compiled(fn, *case, fusion_pass=p)
    assert p.match_table == {"rope_cache/gptj_dsv4_fp8_v2/bf16": 1}
    assert_bitwise_equal(out, expected)
