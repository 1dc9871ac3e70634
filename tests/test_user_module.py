"""The pass on a module written for itself, not for the patterns: parameters, a 3-D activation,
fp16, eps 1e-5, an unrelated op between the norm and its quant, a reshape between another pair,
and one reshape that splits rows (which no row-wise fusion may see through).

Compiled with and without FusionPass(): same bits. All three pairs fuse; the norm whose quant
reads a row-splitting view stays, and its near miss says why. Then an MLA head written the same
way for the deeper families (q_kv_norm, norm_rope_cache; fp16 cache, sliced parts), and an
attention input for qnorm_rope_cache (a view between the q norm and its rope, the ops in
another order, fp16, eps 1e-5, NeoX).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fusion_passes import FusionPass
from fusion_passes.testing import assert_bitwise_equal, run_compiled

ops = torch.ops.fusion_ops
FN = torch.float8_e4m3fn


class UserBlock(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.attn_norm = nn.Parameter(1 + 0.1 * torch.randn(hidden, dtype=torch.float16))
        self.ffn_norm = nn.Parameter(1 + 0.1 * torch.randn(hidden, dtype=torch.float16))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # x, residual: [batch, tokens, hidden] fp16
        a_q, a_s = ops.fp8_group_quant(ops.rms_norm(x, self.attn_norm, self.eps), 128, False, FN)
        y, res = ops.fused_add_rms_norm(x, residual, self.ffn_norm, self.eps)
        gate = torch.tanh(residual).sum(-1)  # unrelated work between the norm and its quant
        b_q, b_s = ops.mxfp4_quant(y)
        n = ops.rms_norm(res, self.attn_norm, self.eps)
        c_q, c_s = ops.mxfp8_quant(n.reshape(-1, n.shape[-1]))  # a reshape in between
        m = ops.rms_norm(x, self.ffn_norm, self.eps)
        d_q, d_s = ops.fp8_per_token_quant(m.reshape(*m.shape[:-1], 2, -1), False, FN)  # splits
        return a_q, a_s, b_q, b_s, c_q, c_s, d_q, d_s, res, gate


def test_user_module_fuses_what_it_can_and_explains_the_rest() -> None:
    torch.manual_seed(0)
    block = UserBlock(256, eps=1e-5).eval()
    x = torch.randn(2, 5, 256, dtype=torch.float16)
    r = torch.randn(2, 5, 256, dtype=torch.float16)
    with torch.no_grad():
        plain = run_compiled(block, x, r, fusion_pass=None)
        fusion = FusionPass(keep_graphs=True)
        fused = run_compiled(block, x, r, fusion_pass=fusion)
    assert_bitwise_equal(fused, plain)
    assert fusion.match_table == {
        "rms_quant/fp8_group128_e4m3fn/fp16": 1,
        "add_rms_quant/mxfp4/fp16": 1,
        "rms_quant/mxfp8/fp16": 1,  # through the token-flattening reshape
    }
    (record,) = fusion.graphs
    assert record.ops_after.get("fused_add_rms_norm", 0) == 0
    assert record.ops_after["rms_norm"] == 1  # the one behind the row-splitting reshape
    reasons = [m.reason for m in record.near_misses if m.op == "rms_norm"]
    assert len(reasons) == 1 and "changes the rows" in reasons[0], reasons


class UserMLAHead(nn.Module):
    """An MLA attention head as a user would write it: one fp16 linear for q-lora | kv on a
    [batch, tokens, hidden] input, the parts taken by slicing, eps 1e-5, the kv norm written
    before the q norm, the q quant (MXFP8) behind a token-flattening reshape; a compressor that
    norms fp32 rows, casts them to fp16, ropes (NeoX) and writes a bf16-layout fp16 cache."""

    def __init__(self, hidden: int = 64, q_lora: int = 256, kv: int = 512, eps: float = 1e-5):
        super().__init__()
        self.q_lora, self.eps = q_lora, eps
        self.wa = nn.Linear(hidden, q_lora + kv, bias=False, dtype=torch.float16)
        self.q_norm = nn.Parameter(1 + 0.1 * torch.randn(q_lora, dtype=torch.float16))
        self.kv_norm = nn.Parameter(1 + 0.1 * torch.randn(kv, dtype=torch.float16))
        self.comp_norm = nn.Parameter(1 + 0.1 * torch.randn(kv))
        self.register_buffer("cos_sin", torch.randn(64, 64))
        self.register_buffer("cache", torch.zeros(4, 4, kv, dtype=torch.float16))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, view: bool):
        proj = self.wa(x)  # [B, T, q_lora + kv]
        kv = ops.rms_norm(proj[..., self.q_lora :], self.kv_norm, self.eps)
        q = ops.rms_norm(proj[..., : self.q_lora], self.q_norm, self.eps)
        q_codes, q_scales = ops.mxfp8_quant(q.reshape(-1, self.q_lora))
        pooled = kv.float().flatten(0, 1)  # [B·T, kv] fp32
        entry = ops.rms_norm(pooled, self.comp_norm, self.eps).to(torch.float16)
        if view:  # views between the cast and the rope and the write: not seen through
            entry = entry.unsqueeze(1)
        entry = ops.rope(positions, entry, self.cos_sin, 64, True)
        ops.mla_cache_write(entry.reshape(-1, entry.shape[-1]), self.cache, slots, "bf16")
        return q_codes, q_scales, kv, entry


def test_user_mla_head_fuses_both_deeper_families() -> None:
    """q_kv_norm and norm_rope_cache fire on the module above; with a view between the cast and
    the rope the compressor chain stays, and its near miss names the view. Same bits (outputs and
    cache) with and without the pass, and as eager."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, dtype=torch.float16)
    positions, slots = torch.tensor([0, 5, 9, 17, 30, 63]), torch.tensor([3, -1, 0, 15, 8, 9])
    for view in (False, True):
        head = UserMLAHead().eval()
        plain, eager = copy.deepcopy(head), copy.deepcopy(head)
        with torch.no_grad():
            want = run_compiled(plain, x, positions, slots, view, fusion_pass=None)
            fusion = FusionPass(keep_graphs=True)
            got = run_compiled(head, x, positions, slots, view, fusion_pass=fusion)
            assert_bitwise_equal(got, want)
            assert_bitwise_equal(head.cache, plain.cache, "cache")
            assert_bitwise_equal(got, eager(x, positions, slots, view))
            assert_bitwise_equal(head.cache, eager.cache, "cache vs eager")
        expected = {"q_kv_norm/mxfp8/fp16": 1}
        if not view:
            expected["norm_rope_cache/neox_bf16_to_fp16_v2/fp32"] = 1
        assert fusion.match_table == expected
        reasons = [m.reason for g in fusion.graphs for m in g.near_misses]
        if view:
            assert any(r.startswith("a view sits in the chain (") for r in reasons), reasons


class UserAttention(nn.Module):
    """DSV4-style attention input as a user might write it: a parameterized fp16 q/kv
    projection of a [batch, tokens, hidden] input, the per-head q norm on the flattened head
    rows ([B·T·H, 512], eps 1e-5) and viewed back to heads before its NeoX rope, the kv rope
    and its fp16 bf16-layout cache write *before* the q rope. ``split_heads``: the view splits
    each 512-row into two (no norm may be moved past that)."""

    def __init__(self, hidden: int = 64, heads: int = 2, split_heads: bool = False) -> None:
        super().__init__()
        self.heads, self.split_heads = heads, split_heads
        self.w = nn.Linear(hidden, (heads + 1) * 512, bias=False, dtype=torch.float16)
        self.register_buffer("cos_sin", torch.randn(64, 64))
        self.register_buffer("cache", torch.zeros(4, 4, 512, dtype=torch.float16))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor):
        t = x.shape[0] * x.shape[1]
        proj = self.w(x).reshape(t, -1)
        kv = ops.rope(positions, proj[:, self.heads * 512 :], self.cos_sin, 64, True)
        ops.mla_cache_write(kv, self.cache, slots, "bf16")
        q = ops.weightless_rms_norm(proj[:, : self.heads * 512].reshape(-1, 512), 1e-5)
        q = q.view(t, self.heads * 2, 256) if self.split_heads else q.view(t, self.heads, 512)
        return ops.rope(positions, q, self.cos_sin, 64, True), kv


def test_user_attention_fuses_the_q_norm_chain() -> None:
    """qnorm_rope_cache fires through the head-restoring view (moved above the norm) with the
    ops in the user's order; with a view that splits the norm's rows it stays, rope_cache takes
    the ropes and the write, and the norm's near miss says why. Same bits (outputs and cache)
    with and without the pass, and as eager."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, dtype=torch.float16)
    positions, slots = torch.tensor([0, 5, 9, 17, 30, 63]), torch.tensor([3, -1, 0, 15, 8, 9])
    for split in (False, True):
        head = UserAttention(split_heads=split).eval()
        plain, eager = copy.deepcopy(head), copy.deepcopy(head)
        with torch.no_grad():
            want = run_compiled(plain, x, positions, slots, fusion_pass=None)
            fusion = FusionPass(keep_graphs=True)
            got = run_compiled(head, x, positions, slots, fusion_pass=fusion)
            assert_bitwise_equal(got, want)
            assert_bitwise_equal(head.cache, plain.cache, "cache")
            assert_bitwise_equal(got, eager(x, positions, slots))
            assert_bitwise_equal(head.cache, eager.cache, "cache vs eager")
        if not split:
            assert fusion.match_table == {"qnorm_rope_cache/neox_bf16_v2/fp16": 1}
            continue
        assert fusion.match_table == {"rope_cache/neox_bf16_v2/fp16": 1}
        reasons = [m.reason for g in fusion.graphs for m in g.near_misses]
        assert any(r.startswith("views between the norm and its rope") for r in reasons), reasons
