"""Paged KV caches of the reference model, and the per-step inputs that index them.

Per layer: a sliding-window (SWA) cache of every token and, for CSA/HCA layers, a compressed
cache of one entry per ``ratio`` tokens, both in the 584-byte ``dsv4_fp8`` layout with blocks of
``block_size`` slots; plus the compressor's fp32 state (the last incomplete group of each
sequence). Block tables map (sequence, block index) to physical blocks; they are a seeded
permutation, so every access goes through the indirection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import fusion_ops

from .config import DSV4Config


@dataclass
class Step:
    """Inputs of one forward: prefill of one sequence, or decode of one token per sequence."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] SWA-cache slot of each token
    seq_ids: torch.Tensor  # [B] (prefill: [1])
    comp_slots: dict[int, torch.Tensor]  # ratio -> slots of compressed entries (see below)
    block_tables: torch.Tensor | None = None  # decode: [B, blocks_per_seq] SWA blocks
    comp_block_tables: dict[int, torch.Tensor] | None = None  # decode: ratio -> [B, cblocks]
    # comp_slots: prefill: [T // ratio], the slot of each complete group's entry;
    #             decode: [B], the slot of the entry of the group the token belongs to.


class PagedCaches:
    def __init__(
        self,
        cfg: DSV4Config,
        max_seqs: int,
        max_len: int,
        device: str | torch.device,
        seed: int = 0,
    ) -> None:
        self.cfg, self.max_seqs, self.max_len = cfg, max_seqs, max_len
        g = torch.Generator().manual_seed(seed)
        bs = cfg.block_size
        self.blocks_per_seq = math.ceil(max_len / bs)
        self.block_tables = self._tables(max_seqs, self.blocks_per_seq, g).to(device)
        self.comp_block_tables: dict[int, torch.Tensor] = {}
        for ratio in sorted(set(cfg.compress_ratios) - {1}):
            per_seq = math.ceil(math.ceil(max_len / ratio) / bs)
            self.comp_block_tables[ratio] = self._tables(max_seqs, per_seq, g).to(device)
        self.swa = [
            fusion_ops.alloc_mla_cache(self.block_tables.numel() + 1, bs, device=device)
            for _ in range(cfg.n_layers)
        ]
        self.comp: list[torch.Tensor | None] = []
        self.state: list[torch.Tensor | None] = []
        for ratio in cfg.compress_ratios:
            if ratio == 1:
                self.comp.append(None)
                self.state.append(None)
                continue
            n = self.comp_block_tables[ratio].numel() + 1
            self.comp.append(fusion_ops.alloc_mla_cache(n, bs, device=device))
            self.state.append(torch.zeros(max_seqs, ratio, 2 * cfg.head_dim, device=device))

    @staticmethod
    def _tables(seqs: int, per_seq: int, g: torch.Generator) -> torch.Tensor:
        """Block ids 1..seqs·per_seq (0 stays unused), shuffled, one row per sequence."""
        return (torch.randperm(seqs * per_seq, generator=g) + 1).view(seqs, per_seq)

    def _slot(
        self, table: torch.Tensor, seq_ids: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        bs = self.cfg.block_size
        return table[seq_ids, index // bs] * bs + index % bs

    def prefill_step(self, seq: int, input_ids: torch.Tensor) -> Step:
        device = self.block_tables.device
        t = input_ids.shape[0]
        positions = torch.arange(t, device=device)
        seq_ids = torch.full((t,), seq, device=device)
        comp = {
            r: self._slot(tab, seq_ids[: t // r], torch.arange(t // r, device=device))
            for r, tab in self.comp_block_tables.items()
        }
        return Step(
            input_ids.to(device),
            positions,
            self._slot(self.block_tables, seq_ids, positions),
            torch.tensor([seq], device=device),
            comp,
        )

    def decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> Step:
        device = self.block_tables.device
        b = input_ids.shape[0]
        seq_ids = torch.arange(b, device=device)
        positions = positions.to(device)
        comp = {
            r: self._slot(tab, seq_ids, positions // r) for r, tab in self.comp_block_tables.items()
        }
        return Step(
            input_ids.to(device),
            positions,
            self._slot(self.block_tables, seq_ids, positions),
            seq_ids,
            comp,
            self.block_tables[:b],
            {r: t[:b] for r, t in self.comp_block_tables.items()},
        )

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of every cache tensor (for comparing whole caches between runs)."""
        return [t.clone() for t in (*self.swa, *self.comp, *self.state) if t is not None]
