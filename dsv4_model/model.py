"""Reference DeepSeek-V4, built from ``torch.ops.fusion_ops`` standalone ops and plain torch.

Structure (as vLLM 0.33.0's vllm/models/deepseek_v4/amd/model.py builds it), per decoder layer::

    mhc:  x, post, comb = hc_pre(R)              add:  x, res = fused_add_rms_norm(h, res)
          x = rms_norm(x)                               (layer 0: rms_norm(h), res = h)
          R = hc_post(attn(x), R, post, comb)           x, res = fused_add_rms_norm(attn(x), res)
          (same around the MoE with ffn_norm)           h = moe(x)

    attn(x): qr, kv = split(fp8_linear(x))         # fused wq_a/wkv: rms_norm → fp8 1x128 quant
             q = weightless_rms_norm(fp8_linear(rms_norm(qr)))  [T, H, 512]  # per head, no weight
             kv = rms_norm(kv)  [T, 512]
             q, kv = rope(q), rope(kv)                   # GPT-J on the last 64 of 512 dims
             mla_cache_write(kv, swa_cache)              # 584-byte dsv4_fp8 slots
             CSA/HCA: compressor pools each group of `ratio` tokens (softmax over the group of
                      score + ape), rms_norm, rope at the group's first position → compressed cache
             keys: prefill → this step's kv (+ compressed entries of complete groups);
                   decode  → dequant_cache(cache, block_table).to(fp8) (only the table's blocks)
             softmax(q·k / √512) with a per-head sink logit in the denominator; V = K (MQA latent)
             o → inverse rope → grouped wo_a (G groups) → fp8_linear wo_b

    moe(x):  sqrt(softplus(x @ gateᵀ)) scores, top-k on score + bias, weights renormalised ×
             routed_scaling; one activation quant (config scheme) shared by the routed and shared
             experts; SwiGLU with clamp (gate ≤ 10, up in [−10, 10])

GEMMs (``cfg.gemm``): ``"emulated"``, the definition, runs every quantized GEMM as activation
quant op → dequantize → bf16 matmul with bf16 weights, and the experts densely (all experts,
masked); ``"native"`` runs what a server runs: FP8 weights into ``torch._scaled_mm`` (linears:
block-wise 1×128 × 128×128 for fp8_group, row-wise for fp8_per_token), routed experts (top-k
rows per expert) through ``torch._scaled_grouped_mm`` (fp8_per_token: the only scheme with a
grouped FP8 kernel on Hopper) or ``torch._grouped_mm`` on the dequantized activation (the other
schemes, and every GEMM on a device without the kernel, e.g. the CPU), the experts' down
projections fed by the same scheme's quant op. Both modes run the same quant ops on the same
values in front of the GEMMs: the fused sequences are the same.

Simplifications that do not touch the four fused sequences:
* Indexer omitted: CSA layers attend to every visible compressed entry (what DeepSeek-V4 does
  while the number of entries is ≤ index_topk); HCA attends to all of them, as in the real model.
* Compressor without CSA's overlapping second window (coff = 1 for both kinds).
* Plain RoPE per layer kind (theta 10000 SWA, 160000 CSA/HCA); YaRN scaling omitted.
* No hash-routed MoE layers, no MTP layer.
* Prefill is one sequence starting at position 0; decode is one token per sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

import fusion_ops  # noqa: F401
from fusion_ops import linear

from .cache import PagedCaches, Step
from .config import DSV4Config
from .layers import (
    HyperConnection,
    QuantLinear,
    TensorParallel,
    dequantize,
    init_,
    quant_config,
    quantize,
    rope_table,
    weightless_rms,
)

ops = torch.ops.fusion_ops
LAYOUT = "dsv4_fp8"
FP32_PARAMS = (
    "sink",
    "score_bias",
    "comp_ape",
    "comp_norm_weight",
    "fn",
    "base",
    "scale",
    "hc_head_fn",
    "hc_head_base",
)


def _param_dtype(name: str, cfg: DSV4Config) -> torch.dtype:
    """bf16, except what DeepSeek-V4 keeps in fp32."""
    return torch.float32 if name.split(".")[-1] in FP32_PARAMS else cfg.dtype


def softmax_with_sink(scores: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim with exp(sink − m) added to the denominator. sink [H]."""
    sink = sink.view(*([1] * (scores.dim() - 2)), -1, 1)
    m = torch.maximum(scores.amax(-1, keepdim=True), sink)
    e = torch.exp(scores - m)
    return e / (e.sum(-1, keepdim=True) + torch.exp(sink - m))


class Attention(nn.Module):
    def __init__(self, cfg: DSV4Config, layer: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.cfg, self.ratio, self.tp = cfg, cfg.compress_ratios[layer], tp
        d, h, hd = cfg.hidden_size, cfg.n_heads, cfg.head_dim
        lin = cfg.linear_quant
        self.wqkv_a = QuantLinear(d, cfg.q_lora_rank + hd, lin, cfg.fp8_dtype)
        self.q_norm_weight = nn.Parameter(torch.empty(cfg.q_lora_rank), requires_grad=False)
        self.kv_norm_weight = nn.Parameter(torch.empty(hd), requires_grad=False)
        self.wq_b = QuantLinear(cfg.q_lora_rank, h * hd, lin, cfg.fp8_dtype)
        self.sink = nn.Parameter(torch.empty(h), requires_grad=False)
        g = cfg.o_groups
        self.wo_a = nn.Parameter(torch.empty(g, cfg.o_lora_rank, h // g * hd), requires_grad=False)
        self.wo_b = QuantLinear(g * cfg.o_lora_rank, d, lin, cfg.fp8_dtype)
        theta = cfg.rope_theta if self.ratio == 1 else cfg.compress_rope_theta
        table = rope_table(cfg.max_position, cfg.rope_dim, theta)
        half = cfg.rope_dim // 2
        self.register_buffer("cos_sin", table, persistent=False)
        inverse = torch.cat((table[:, :half], -table[:, half:]), dim=1)  # sin negated
        self.register_buffer("cos_sin_inv", inverse, persistent=False)
        if self.ratio > 1:
            self.comp_w = nn.Parameter(torch.empty(2 * hd, d), requires_grad=False)
            self.comp_ape = nn.Parameter(torch.empty(self.ratio, hd), requires_grad=False)
            self.comp_norm_weight = nn.Parameter(torch.empty(hd), requires_grad=False)

    def to_native(self) -> None:
        """FP8 weights for the device's torch._scaled_mm (see QuantLinear.to_native)."""
        self.wqkv_a.to_native()
        self.wq_b.to_native()
        self.wo_b.to_native(self.tp)  # row-parallel: this rank's slice

    # --- pieces ---------------------------------------------------------------------------------
    def _rope(
        self, positions: torch.Tensor, x: torch.Tensor, inverse: bool = False
    ) -> torch.Tensor:
        table = self.cos_sin_inv if inverse else self.cos_sin
        return ops.rope(positions, x, table, self.cfg.rope_dim, False)

    def _compress(
        self,
        kv_part: torch.Tensor,
        score: torch.Tensor,
        first_pos: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """Pool groups [N, ratio, 512] → normed, roped entries [N, 512]; write them to the cache."""
        pooled = (torch.softmax(score, dim=1) * kv_part).sum(1)  # fp32
        entry = ops.rms_norm(pooled, self.comp_norm_weight, self.cfg.rms_eps).to(self.cfg.dtype)
        entry = self._rope(first_pos, entry)
        ops.mla_cache_write(entry, self.comp_cache, slots, LAYOUT)
        return entry

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """q [..., H, 512], keys [..., S, 512] (float or fp8), visible [..., S] -> [..., H, 512]."""
        k = keys.float()
        scores = torch.einsum("...hd,...sd->...hs", q.float(), k) * self.cfg.head_dim**-0.5
        scores = scores.masked_fill(~visible.unsqueeze(-2), float("-inf"))
        probs = softmax_with_sink(scores, self.sink)
        return torch.einsum("...hs,...sd->...hd", probs, k).to(self.cfg.dtype)

    # --- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, step: Step, decode: bool) -> torch.Tensor:
        cfg = self.cfg
        t, h, hd = x.shape[0], cfg.n_heads, cfg.head_dim
        pos = step.positions
        qr, kv = self.wqkv_a(x).split([cfg.q_lora_rank, hd], dim=-1)
        q = self.wq_b(ops.rms_norm(qr, self.q_norm_weight, cfg.rms_eps)).view(t, h, hd)
        q = ops.weightless_rms_norm(q, cfg.rms_eps)  # per head, no weight
        kv = ops.rms_norm(kv, self.kv_norm_weight, cfg.rms_eps)
        q = self._rope(pos, q)
        kv = self._rope(pos, kv)
        ops.mla_cache_write(kv, self.swa_cache, step.slot_mapping, LAYOUT)
        o = (
            self._decode_attention(x, q, step)
            if decode
            else self._prefill_attention(x, q, kv, step)
        )
        o = self._rope(pos, o, inverse=True)
        g = cfg.o_groups
        o = torch.einsum("tgk,gok->tgo", o.view(t, g, -1), self.wo_a).flatten(1)
        return self.wo_b(o, self.tp)  # with tp: this rank's partial sum

    def _prefill_attention(
        self, x: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, step: Step
    ) -> torch.Tensor:
        pos = step.positions
        visible = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - self.cfg.window)
        keys = kv
        if self.ratio > 1:
            r, t, hd = self.ratio, x.shape[0], self.cfg.head_dim
            kv_score = x.float() @ self.comp_w.float().t()  # [T, 1024] fp32
            kv_score[:, hd:] += self.comp_ape[pos % r]
            n = t // r
            groups = kv_score[: n * r].view(n, r, 2 * hd)
            first = torch.arange(n, device=x.device) * r
            entries = self._compress(groups[..., :hd], groups[..., hd:], first, step.comp_slots[r])
            leftover = kv_score[n * r :]  # the incomplete last group continues in decode
            rows = torch.arange(t - n * r, device=x.device)
            self.comp_state[step.seq_ids.expand(rows.shape[0]), rows] = leftover
            keys = torch.cat((kv, entries), dim=0)
            visible = torch.cat((visible, (first[None, :] + r - 1) <= pos[:, None]), dim=1)
        return self._attend(q, keys, visible)

    def _decode_attention(self, x: torch.Tensor, q: torch.Tensor, step: Step) -> torch.Tensor:
        cfg, pos, b = self.cfg, step.positions, x.shape[0]
        keys = ops.dequant_cache(self.swa_cache, step.block_tables.flatten(), LAYOUT)
        keys = keys.to(cfg.fp8_dtype).view(b, -1, cfg.head_dim)
        key_pos = torch.arange(keys.shape[1], device=x.device)
        visible = (key_pos[None, :] <= pos[:, None]) & (
            key_pos[None, :] > pos[:, None] - cfg.window
        )
        if self.ratio > 1:
            r, hd = self.ratio, cfg.head_dim
            kv_score = x.float() @ self.comp_w.float().t()
            kv_score[:, hd:] += self.comp_ape[pos % r]
            self.comp_state[step.seq_ids, pos % r] = kv_score
            group = self.comp_state[step.seq_ids]  # [B, ratio, 1024], complete at a boundary
            slots = torch.where((pos + 1) % r == 0, step.comp_slots[r], -1)  # others: skipped
            self._compress(group[..., :hd], group[..., hd:], (pos // r) * r, slots)
            comp = ops.dequant_cache(self.comp_cache, step.comp_block_tables[r].flatten(), LAYOUT)
            comp = comp.to(cfg.fp8_dtype).view(b, -1, hd)
            entry = torch.arange(comp.shape[1], device=x.device)
            keys = torch.cat((keys, comp), dim=1)
            visible = torch.cat((visible, (entry[None, :] + 1) * r - 1 <= pos[:, None]), dim=1)
        return self._attend(q, keys, visible)


class MoE(nn.Module):
    def __init__(self, cfg: DSV4Config, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.cfg, self.tp = cfg, tp
        e, d, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_inter_size
        self.gate = nn.Parameter(torch.empty(e, d), requires_grad=False)
        self.score_bias = nn.Parameter(torch.empty(e), requires_grad=False)
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, d), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, d, i), requires_grad=False)
        self.shared_w13 = nn.Parameter(torch.empty(2 * i, d), requires_grad=False)
        self.shared_w2 = nn.Parameter(torch.empty(d, i), requires_grad=False)
        self.kind: str | None = None  # routed experts' torch._scaled_grouped_mm (None: bf16)
        self.shared_kind: str | None = None  # shared expert's torch._scaled_mm (None: bf16)

    def to_native(self) -> None:
        """FP8 weights for the GEMMs the device has for ``cfg.act_quant`` (with tensor parallel:
        this rank's slice of the down projections' input features)."""
        config = quant_config(self.cfg.act_quant, self.cfg.fp8_dtype)
        self.kind = linear.grouped_kind(config, self.w13.device)
        self.shared_kind = linear.scaled_mm_kind(config, self.shared_w13)
        if self.tp is not None:  # row-parallel down projections: keep this rank's slice of I
            cols = self.tp.shard(self.cfg.moe_inter_size)
            self.w2.data = self.w2.data[..., cols].contiguous()
            self.shared_w2.data = self.shared_w2.data[:, cols].contiguous()
        kinds = {"w13": self.kind, "w2": self.kind}
        kinds.update(shared_w13=self.shared_kind, shared_w2=self.shared_kind)
        for name, kind in kinds.items():
            if kind is not None:  # FP8 codes and scales replace the bf16 weight
                codes, scale = linear.quantize_weight(getattr(self, name), kind)
                delattr(self, name)
                self.register_buffer(f"{name}_fp8", codes)
                self.register_buffer(f"{name}_scale", scale)

    def _swiglu(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        lim = self.cfg.swiglu_limit
        return F.silu(gate.clamp(max=lim)) * up.clamp(-lim, lim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        scores = torch.sqrt(F.softplus(x.float() @ self.gate.float().t()))  # router reads bf16 x
        top = torch.topk(scores + self.score_bias, cfg.n_activated_experts, dim=-1).indices
        weights = scores.gather(1, top)
        weights = weights / weights.sum(-1, keepdim=True) * cfg.routed_scaling_factor
        q, s = quantize(x, cfg.act_quant, cfg.fp8_dtype)  # shared by routed and shared experts
        if cfg.gemm == "native":
            return self._routed(q, s, top, weights, x.dtype)
        combine = torch.zeros_like(scores).scatter(1, top, weights)  # [T, E]
        xq = dequantize(q, s, cfg.act_quant, x.dtype)
        act = self._swiglu(torch.einsum("td,efd->tef", xq, self.w13))  # [T, E, I] bf16
        shared_act = self._swiglu(xq @ self.shared_w13.t())  # [T, I]
        w2, shared_w2 = self.w2, self.shared_w2
        if self.tp is not None:  # down projections row-parallel: this rank's slice of I
            cols = self.tp.shard(cfg.moe_inter_size)
            act, shared_act = act[..., cols], shared_act[..., cols]
            w2, shared_w2 = w2[..., cols], shared_w2[:, cols]
        # expert outputs in bf16 (what grouped-GEMM kernels return), combined in fp32; no fp32
        # copy of w2 (E·D·I·4 bytes, 512 MiB per layer at flash dims with 16 experts)
        out = torch.einsum("tei,edi->ted", act, w2)  # [T, E, D]
        routed = torch.einsum("te,ted->td", combine, out.float())
        shared = shared_act @ shared_w2.t()
        return (routed + shared.float()).to(x.dtype)

    # --- routed experts (gemm="native") ----------------------------------------------------------
    def _routed(
        self,
        q: torch.Tensor,
        s: torch.Tensor,
        top: torch.Tensor,
        weights: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Routed experts: the T·k (token, expert) rows sorted by expert go through one grouped
        GEMM up, SwiGLU, their quant op and one grouped GEMM down; each token's k outputs are
        combined in fp32, in slot order (deterministic: no atomics)."""
        cfg, (t, k) = self.cfg, top.shape
        flat = top.flatten()  # [T·k] expert of each (token, slot)
        order = torch.argsort(flat, stable=True)  # grouped row -> (token, slot)
        counts = torch.zeros(cfg.n_routed_experts, dtype=torch.int32, device=flat.device)
        counts = counts.scatter_add(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)  # end row of each expert's group
        rows = order // k  # the token of each grouped row
        act = self._swiglu(self._gemm(q[rows], s[rows], "w13", dtype, offs))  # [T·k, I]
        shared_act = self._swiglu(self._gemm(q, s, "shared_w13", dtype))  # [T, I]
        if self.tp is not None:  # down projections row-parallel: this rank's slice of I
            cols = self.tp.shard(cfg.moe_inter_size)
            act, shared_act = act[:, cols], shared_act[:, cols]
        down = self._gemm(*quantize(act, cfg.act_quant, cfg.fp8_dtype), "w2", dtype, offs)
        shared_q = quantize(shared_act, cfg.act_quant, cfg.fp8_dtype)
        shared = self._gemm(*shared_q, "shared_w2", dtype)
        grouped = torch.arange(t * k, device=flat.device)
        slot_row = torch.empty_like(order).scatter_(0, order, grouped)  # (token, slot) -> row
        routed = (down[slot_row].view(t, k, -1).float() * weights.unsqueeze(-1)).sum(1)
        return (routed + shared.float()).to(dtype)

    def _gemm(
        self,
        q: torch.Tensor,
        s: torch.Tensor,
        name: str,
        dtype: torch.dtype,
        offs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Quantized rows [M, K] through weight ``name``: the shared expert's [N, K], or with
        ``offs`` (int32 ends of each expert's rows) the routed experts' [E, N, K] -> [M, N]."""
        kind = self.shared_kind if offs is None else self.kind
        if kind is not None:  # FP8 weights: the device's scaled GEMM
            w, ws = getattr(self, f"{name}_fp8"), getattr(self, f"{name}_scale")
            if offs is None:
                return linear.scaled_mm(q, s, w, ws, kind, dtype)
            return linear.scaled_grouped_mm(q, s, w, ws, offs, dtype)
        xd, w = dequantize(q, s, self.cfg.act_quant, dtype), getattr(self, name)
        if offs is None:
            return xd @ w.t()
        return torch._grouped_mm(xd, w.transpose(-2, -1), offs=offs)


class Block(nn.Module):
    def __init__(self, cfg: DSV4Config, layer: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.cfg, self.layer, self.tp = cfg, layer, tp
        self.attn_norm_weight = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        self.ffn_norm_weight = nn.Parameter(torch.empty(cfg.hidden_size), requires_grad=False)
        self.attn = Attention(cfg, layer, tp)
        self.moe = MoE(cfg, tp)
        if cfg.residual == "mhc":
            args = (cfg.hidden_size, cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps)
            self.hc_attn, self.hc_ffn = HyperConnection(*args), HyperConnection(*args)

    def forward(
        self, h: torch.Tensor, residual: torch.Tensor | None, step: Step, decode: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        eps = self.cfg.rms_eps
        if self.cfg.residual == "mhc":  # h: the 4 residual streams [T, 4, D]
            x, post, comb = self.hc_attn.pre(h)
            a = self._reduce(self.attn(ops.rms_norm(x, self.attn_norm_weight, eps), step, decode))
            h = self.hc_attn.post(a, h, post, comb)
            x, post, comb = self.hc_ffn.pre(h)
            m = self._reduce(self.moe(ops.rms_norm(x, self.ffn_norm_weight, eps)))
            return self.hc_ffn.post(m, h, post, comb), None
        if residual is None:  # first layer of the residual stream
            x, residual = ops.rms_norm(h, self.attn_norm_weight, eps), h
        else:
            x, residual = ops.fused_add_rms_norm(h, residual, self.attn_norm_weight, eps)
        a = self._reduce(self.attn(x, step, decode))
        x, residual = ops.fused_add_rms_norm(a, residual, self.ffn_norm_weight, eps)
        return self._reduce(self.moe(x)), residual

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Tensor parallel: the sum of the ranks' partial outputs (else the output itself)."""
        return partial if self.tp is None else self.tp.all_reduce(partial)


class DSV4Model(nn.Module):
    """``tp``: tensor parallel over ranks (row-parallel wo_b and expert down projections, an
    all-reduce after attention and after the MoE; see :class:`TensorParallel`)."""

    def __init__(
        self,
        cfg: DSV4Config,
        seed: int = 0,
        tp: TensorParallel | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """``device``: build and seed the weights there (a generator of that device); None: the
        current default device, seeded by a CPU generator."""
        super().__init__()
        self.cfg = cfg
        place = torch.device(device) if device is not None else contextlib.nullcontext()
        generator = torch.Generator(device or "cpu").manual_seed(seed)

        def seeded(params: Iterable[tuple[str, nn.Parameter]]) -> None:
            init_(params, generator, lambda name: _param_dtype(name, cfg))

        # seeded in named_parameters() order (the model's own, then layer by layer): with
        # gemm="native" a layer's weights turn FP8 before the next layer is drawn (peak: one
        # layer's bf16 weights)
        with place:
            self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), False)
            self.final_norm_weight = nn.Parameter(torch.empty(cfg.hidden_size), False)
            self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), False)
            if cfg.residual == "mhc":
                m = cfg.hc_mult
                self.hc_head_fn = nn.Parameter(torch.empty(m, m * cfg.hidden_size), False)
                self.hc_head_base = nn.Parameter(torch.empty(m), False)
            seeded(self.named_parameters())
            self.layers = nn.ModuleList()
            for i in range(cfg.n_layers):
                block = Block(cfg, i, tp)
                seeded(block.named_parameters())
                if cfg.gemm == "native":  # FP8 weights for the device's GEMMs
                    block.attn.to_native()
                    block.moe.to_native()
                self.layers.append(block)

    def attach(self, caches: PagedCaches) -> None:
        """Point every attention layer at its caches (buffers: compiled code mutates them)."""
        for layer, attn in enumerate(b.attn for b in self.layers):
            attn.register_buffer("swa_cache", caches.swa[layer], persistent=False)
            if attn.ratio > 1:
                attn.register_buffer("comp_cache", caches.comp[layer], persistent=False)
                attn.register_buffer("comp_state", caches.state[layer], persistent=False)

    def forward(self, step: Step, decode: bool) -> torch.Tensor:
        """Logits [T, vocab] fp32 (prefill: every token; decode: one per sequence)."""
        cfg = self.cfg
        h = self.embed[step.input_ids]
        if cfg.residual == "mhc":
            h = h.unsqueeze(1).expand(-1, cfg.hc_mult, -1).contiguous()
        residual = None
        for block in self.layers:
            h, residual = block(h, residual, step, decode)
        if cfg.residual == "mhc":
            flat = weightless_rms(h.flatten(1).float(), cfg.rms_eps)
            gates = torch.sigmoid(flat @ self.hc_head_fn.t() + self.hc_head_base) + cfg.hc_eps
            x = (gates.unsqueeze(-1) * h.float()).sum(1).to(cfg.dtype)
            x = ops.rms_norm(x, self.final_norm_weight, cfg.rms_eps)
        else:
            x, _ = ops.fused_add_rms_norm(h, residual, self.final_norm_weight, cfg.rms_eps)
        return (x @ self.lm_head.t()).float()  # bf16 GEMM: no fp32 copy of the [vocab, D] head
