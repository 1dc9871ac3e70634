"""numerics="tolerant": plain-PyTorch RMSNorms (every spelling of patterns.plain_norms) fuse with
the quant op after them and with a plain ``x + r`` before them, within the written contract
(docs/numerics.md): the normed value at most BOUND_ULPS further from an fp64 evaluation than
the compile without the pass, quant codes those of the normed value (so they differ only where
it does: counted), the residual sum bit-equal. numerics="exact" leaves them, bit-equal, and says
why. Never fused where the meaning would change."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from fusion_passes import FusionPass
from fusion_passes.testing import (
    assert_bitwise_equal,
    assert_within_tolerance,
    excess_ulps,
    run_compiled,
)

ops = torch.ops.fusion_ops
EPS = 1e-6
K = 512


def hf_pow(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm / DeepseekV3RMSNorm forward, verbatim."""
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + EPS)
    return w * x.to(input_dtype)


def hf_square_by_mul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt((xf * xf).mean(dim=x.dim() - 1, keepdim=True) + EPS)).to(x.dtype) * w


def f_rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), w, EPS)


_MODULES: dict[torch.dtype, torch.nn.RMSNorm] = {}


def nn_rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """torch.nn.RMSNorm (built outside the compiled region, its weight ``w``'s values)."""
    return _MODULES[x.dtype](x)


def _module_of(w: torch.Tensor) -> None:
    module = torch.nn.RMSNorm(K, eps=EPS, dtype=w.dtype, device=w.device)
    module.weight.data.copy_(w)
    _MODULES[w.dtype] = module.requires_grad_(False)


def weight_in_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (w.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS))).to(x.dtype)


SPELLINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hf_pow": hf_pow,
    "hf_square_by_mul": hf_square_by_mul,
    "f_rms_norm": f_rms_norm,
    "nn_rms_norm": nn_rms_norm,
    "weight_in_fp32": weight_in_fp32,
}
QUANTS = {  # scheme label -> quant op call
    "mxfp4": lambda y: ops.mxfp4_quant(y),
    "mxfp8": lambda y: ops.mxfp8_quant(y),
    "fp8_per_token_e4m3fn": lambda y: ops.fp8_per_token_quant(y, False, torch.float8_e4m3fn),
    "fp8_group128_ue8m0_e4m3fn": lambda y: ops.fp8_group_quant(y, 128, True, torch.float8_e4m3fn),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# every spelling × add × dtype; the scheme, dynamic tokens and returning the normed value rotate
CASES = [
    (spelling, add, dtype, scheme, dynamic, normed)
    for i, (spelling, add, dtype) in enumerate(itertools.product(SPELLINGS, (False, True), DTYPES))
    for scheme, dynamic, normed in [(list(QUANTS)[i % 4], i % 3 == 0, i % 2 == 0)]
]


def inputs(
    dtype: torch.dtype, tokens: int = 24, seed: int = 0, device: str = "cpu"
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(tokens, K, generator=g)).to(dtype)
    r = torch.randn(tokens, K, generator=g).to(dtype)
    w = (1 + 0.2 * torch.randn(K, generator=g)).to(dtype)
    return x.to(device), r.to(device), w.to(device)


def fp64_norm(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h64 = h.double()
    return h64 * torch.rsqrt(h64.square().mean(-1, keepdim=True) + EPS) * w.double()


def case_fn(spelling: str, add: bool, scheme: str, normed: bool) -> Callable[..., tuple]:
    norm, quant = SPELLINGS[spelling], QUANTS[scheme]

    def fn(x, r, w):  # type: ignore[no-untyped-def]
        h = x + r if add else x
        y = norm(h, w)
        q, s = quant(y)
        return (q, s, h, y) if normed else (q, s, h)

    return fn


def expected_label(add: bool, scheme: str, normed: bool, dtype: str) -> str:
    family = "add_rms_quant" if add else "rms_quant"
    return f"{family}/{scheme}{'+normed' if normed else ''}+tolerant/{dtype}"


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("spelling", "add", "dtype", "scheme", "dynamic", "normed"), CASES)
def test_plain_norm_fuses_within_the_contract(
    spelling: str, add: bool, dtype: str, scheme: str, dynamic: bool, normed: bool, device: str
) -> None:
    """``dynamic``: a second call with another token count recompiles with dynamic tokens
    (torch.compile's automatic dynamic shapes; ``dynamic=True`` would also turn the eps global
    into a graph input, which no fused op can take as its float eps)."""
    fn = case_fn(spelling, add, scheme, normed)
    x, r, w = inputs(DTYPES[dtype], device=device)
    _module_of(w)
    more = [inputs(DTYPES[dtype], tokens=9, seed=1, device=device)] if dynamic else []
    unfused = run_compiled(fn, x, r, w, fusion_pass=None)
    exact = FusionPass(numerics="exact", keep_graphs=True)
    assert_bitwise_equal(run_compiled(fn, x, r, w, fusion_pass=exact), unfused)
    assert exact.match_table == {}
    reasons = [m.reason for g in exact.graphs for m in g.near_misses]
    assert any('numerics="tolerant"' in reason for reason in reasons), reasons

    tolerant = FusionPass(numerics="tolerant", keep_graphs=True)
    fused = run_compiled(fn, x, r, w, fusion_pass=tolerant, calls=more)
    label = expected_label(add, scheme, normed, dtype)
    assert tolerant.match_table == {label: 1 + len(more)}  # a graph per compile
    assert_bitwise_equal(fused[2], unfused[2], "residual sum")
    # the codes are those of the normed value (our rms_norm of the residual sum: the fused op's
    # definition), so they differ from the unfused codes only where the normed value does
    y_ours = ops.rms_norm(fused[2], w, EPS)
    assert_bitwise_equal(fused[:2], QUANTS[scheme](y_ours), "codes of the fused normed value")
    if normed:
        assert_bitwise_equal(unfused[:2], QUANTS[scheme](unfused[3]), "codes of the unfused")
        assert_bitwise_equal(fused[3], y_ours, "normed value")
        assert_within_tolerance(fused[3], unfused[3], fp64_norm(unfused[2], w))


def test_weightless_plain_norm_feeding_a_quant_says_why() -> None:
    def fn(x):  # type: ignore[no-untyped-def]
        xf = x.float()
        y = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS)).to(x.dtype)
        return ops.mxfp8_quant(y)

    x = inputs(torch.bfloat16)[0]
    p = FusionPass(numerics="tolerant", keep_graphs=True)
    assert_bitwise_equal(run_compiled(fn, x, fusion_pass=p), run_compiled(fn, x, fusion_pass=None))
    assert p.match_table == {}
    reasons = [m.reason for g in p.graphs for m in g.near_misses]
    assert any("weightless RMSNorm in plain PyTorch" in reason for reason in reasons), reasons


def test_plain_add_then_plain_norm_without_quant_becomes_fused_add_rms_norm() -> None:
    """add_rms in the tolerant mode: the decoder layer's ``residual + h`` then its norm."""

    def fn(x, r, w):  # type: ignore[no-untyped-def]
        h = r + x
        return hf_pow(h, w), h

    x, r, w = inputs(torch.bfloat16)
    unfused = run_compiled(fn, x, r, w, fusion_pass=None)
    p = FusionPass(numerics="tolerant", keep_graphs=True)
    fused = run_compiled(fn, x, r, w, fusion_pass=p)
    assert p.match_table == {"add_rms/plain_add+tolerant/bf16": 1}
    assert p.graphs[0].ops_after == {"fused_add_rms_norm": 1}
    assert_bitwise_equal(fused[1], unfused[1], "residual sum")
    assert_within_tolerance(fused[0], unfused[0], fp64_norm(unfused[1], w))


def test_unfused_plain_norm_is_restored_bit_for_bit() -> None:
    """A plain norm no pattern takes (nothing to fuse it with) is put back as it was."""
    x, _, w = inputs(torch.float16)
    p = FusionPass(numerics="tolerant", keep_graphs=True)
    out = run_compiled(lambda x, w: hf_pow(x, w) * 2, x, w, fusion_pass=p)
    assert p.match_table == {} and p.graphs[0].ops_after == {}
    assert_bitwise_equal(out, run_compiled(lambda x, w: hf_pow(x, w) * 2, x, w, fusion_pass=None))


def _mean_over_rows(x, w):  # type: ignore[no-untyped-def]
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(0, keepdim=True) + EPS)).to(x.dtype)


def _fp32_normed_also_returned(x, w):  # type: ignore[no-untyped-def]
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return (w * n.to(x.dtype), n)


def _sum_of_squares_also_returned(x, w):  # type: ignore[no-untyped-def]
    xf = x.float()
    ms = xf.pow(2).mean(-1, keepdim=True)
    return (w * (xf * torch.rsqrt(ms + EPS)).to(x.dtype), ms)


def _row_scale_not_weight(x, w):  # type: ignore[no-untyped-def]
    xf = x.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    return n * x[:, :1]  # a per-row factor, not one weight per column


def _mean_of_another_tensor(x, w):  # type: ignore[no-untyped-def]
    xf = x.float()
    other = (xf + 1).pow(2).mean(-1, keepdim=True)
    return w * (xf * torch.rsqrt(other + EPS)).to(x.dtype)


def _mean_without_keepdim(x, w):  # type: ignore[no-untyped-def]
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1)[:, None] + EPS)).to(x.dtype)


def _two_dim_weight(x, w):  # type: ignore[no-untyped-def]
    xf = x.float()
    return w[None, :] * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


@pytest.mark.parametrize(
    "norm",
    [
        _mean_without_keepdim,
        _two_dim_weight,
        _mean_over_rows,
        _fp32_normed_also_returned,
        _sum_of_squares_also_returned,
        _row_scale_not_weight,
        _mean_of_another_tensor,
    ],
)
def test_never_fused_where_the_meaning_changes(norm) -> None:  # type: ignore[no-untyped-def]
    def fn(x, w):  # type: ignore[no-untyped-def]
        out = norm(x, w)
        y, extra = (out, ()) if isinstance(out, torch.Tensor) else (out[0], out[1:])
        return (*ops.mxfp4_quant(y), *extra)

    x, _, w = inputs(torch.bfloat16)
    p = FusionPass(numerics="tolerant", keep_graphs=True)
    out = run_compiled(fn, x, w, fusion_pass=p)
    assert p.match_table == {}
    assert_bitwise_equal(out, run_compiled(fn, x, w, fusion_pass=None))


def test_eps_as_a_graph_input_is_left_alone() -> None:
    """``dynamic=True`` makes the eps global a graph input: no fused op takes a tensor eps."""
    x, _, w = inputs(torch.bfloat16)
    p = FusionPass(numerics="tolerant", keep_graphs=True)
    fn = lambda x, w: ops.mxfp4_quant(hf_pow(x, w))  # noqa: E731
    out = run_compiled(fn, x, w, fusion_pass=p, dynamic=True)
    assert p.match_table == {}
    assert_bitwise_equal(out, run_compiled(fn, x, w, fusion_pass=None, dynamic=True))


def test_fp32_activations_are_left_alone() -> None:
    """No 16-bit rounding point: an fp32 plain norm is not canonicalized."""
    x, _, w = (t.float() for t in inputs(torch.bfloat16))
    p = FusionPass(numerics="tolerant", keep_graphs=True)
    fn = lambda x, w: ops.mxfp4_quant(hf_pow(x, w))  # noqa: E731
    out = run_compiled(fn, x, w, fusion_pass=p)
    assert p.match_table == {}
    assert_bitwise_equal(out, run_compiled(fn, x, w, fusion_pass=None))


def test_excess_ulps_can_fail() -> None:
    """The yardstick itself: one ulp off everywhere reads as 1, the same values as 0 (values
    inside one binade, so the reference's ulp is the rounded values' ulp)."""
    g = torch.Generator().manual_seed(0)
    ref = 1.1 + 0.5 * torch.rand(64, generator=g, dtype=torch.float64)
    y = ref.to(torch.bfloat16)
    off = (y.view(torch.int16) + 1).view(torch.bfloat16)
    assert excess_ulps(y, y, ref) == 0.0
    assert 0.5 <= excess_ulps(off, y, ref) <= 1.0 + 1e-9
    with pytest.raises(AssertionError, match="ulps further"):
        assert_within_tolerance(off, y, ref, ulps=0.25)


def test_numerics_is_validated() -> None:
    with pytest.raises(ValueError, match="numerics='approximate'; expected one of"):
        FusionPass(numerics="approximate")
    assert FusionPass(fusions=["rms_quant"], numerics="tolerant").config_dict()["numerics"] == (
        "tolerant"
    )


def test_an_exact_fusion_beside_a_restored_plain_norm_is_labelled_exact() -> None:
    """Only matches that took a plain norm read +tolerant: a plain norm of the same tensor that
    nothing fused (put back) does not make the exact fusion next to it tolerant."""

    def fn(x, w):  # type: ignore[no-untyped-def]
        q = ops.mxfp4_quant(ops.rms_norm(x, w, EPS))
        return (*q, hf_pow(x, w) * 2)

    x, _, w = inputs(torch.bfloat16)
    p = FusionPass(numerics="tolerant", keep_graphs=True)
    out = run_compiled(fn, x, w, fusion_pass=p)
    assert p.match_table == {"rms_quant/mxfp4/bf16": 1}
    assert_bitwise_equal(out, run_compiled(fn, x, w, fusion_pass=None))
