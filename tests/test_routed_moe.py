"""The reference model's routed experts (``gemm="native"``): grouping the (token, expert) rows
by expert, the grouped GEMMs and the combine give what each token's experts compute one by one."""

from __future__ import annotations

import pytest
import torch

import dsv4_model as dm
from dsv4_model.layers import dequantize, quantize
from dsv4_model.model import MoE


def one_by_one(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token through each of its top-k experts separately (the routing's definition)."""
    cfg = moe.cfg
    scores = torch.sqrt(torch.nn.functional.softplus(x.float() @ moe.gate.float().t()))
    top = torch.topk(scores + moe.score_bias, cfg.n_activated_experts, dim=-1).indices
    weights = scores.gather(1, top)
    weights = weights / weights.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    xd = dequantize(*quantize(x, cfg.act_quant, cfg.fp8_dtype), cfg.act_quant, x.dtype)

    def expert(v: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        act = moe._swiglu(v @ w13.t())
        q, s = quantize(act, cfg.act_quant, cfg.fp8_dtype)
        return dequantize(q, s, cfg.act_quant, x.dtype) @ w2.t()

    out = []
    for t in range(x.shape[0]):
        routed = sum(
            weights[t, j] * expert(xd[t : t + 1], moe.w13[e], moe.w2[e]).float()
            for j, e in enumerate(top[t].tolist())
        )
        shared = expert(xd[t : t + 1], moe.shared_w13, moe.shared_w2).float()
        out.append((routed + shared).to(x.dtype))
    return torch.cat(out)


@pytest.mark.parametrize("act_quant", ["fp8_per_token", "mxfp8", "fp8_group"])
@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_routed_experts_match_each_token_through_its_experts(act_quant: str, tokens: int) -> None:
    cfg = dm.tiny(gemm="native", act_quant=act_quant, n_routed_experts=8, n_activated_experts=3)
    model = dm.DSV4Model(cfg, seed=1, device="cpu")
    moe = model.layers[0].moe
    assert moe.kind is None and moe.shared_kind is None  # the CPU has no FP8 GEMM
    x = torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    x = x.to(cfg.dtype)
    with torch.no_grad():
        got, want = moe(x), one_by_one(moe, x)
    assert got.shape == want.shape == (tokens, cfg.hidden_size) and got.dtype == cfg.dtype
    # the same products in bf16; the combine sums the k slots in another association
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_every_expert_left_idle_is_skipped() -> None:
    """More experts than (token, slot) rows: most groups are empty, the result stays finite and
    equal to the one-by-one sum."""
    cfg = dm.tiny(gemm="native", act_quant="fp8_per_token", n_routed_experts=64)
    moe = dm.DSV4Model(cfg, seed=3, device="cpu").layers[1].moe
    x = torch.randn(1, cfg.hidden_size).to(cfg.dtype)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), one_by_one(moe, x), rtol=2e-2, atol=2e-2)


def test_config_names_the_gemm_modes() -> None:
    with pytest.raises(ValueError, match="gemm='cutlass'; expected one of"):
        dm.tiny(gemm="cutlass")
