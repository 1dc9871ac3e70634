"""The pass on a module written for itself, not for the patterns: parameters, a 3-D activation,
fp16, eps 1e-5, an unrelated op between the norm and its quant, a reshape between another pair,
and one reshape that splits rows (which no row-wise fusion may see through).

Compiled with and without FusionPass(): same bits. All three pairs fuse; the norm whose quant
reads a row-splitting view stays, and its near miss says why.
"""

from __future__ import annotations

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
