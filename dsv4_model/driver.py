"""Build the model with its caches and run prefill then N decode steps (eager or compiled)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cache import PagedCaches, Step
from .config import DSV4Config
from .layers import TensorParallel
from .model import DSV4Model

Forward = Callable[[Step, bool], torch.Tensor]


@dataclass
class RunResult:
    prefill_logits: list[torch.Tensor] = field(default_factory=list)  # one per sequence
    decode_logits: list[torch.Tensor] = field(default_factory=list)  # one per step [B, vocab]
    caches: list[torch.Tensor] = field(default_factory=list)  # every cache tensor at the end


def build(
    cfg: DSV4Config,
    batch: int,
    max_len: int,
    device: str | torch.device = "cpu",
    seed: int = 0,
    tp: TensorParallel | None = None,
) -> tuple[DSV4Model, PagedCaches]:
    model = DSV4Model(cfg, seed=seed, tp=tp, device=device)
    caches = PagedCaches(cfg, batch, max_len, device, seed=seed)
    model.attach(caches)
    return model, caches


def token_ids(
    cfg: DSV4Config, batch: int, prompt_len: int, decode_steps: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded prompts [B, L] and the decode inputs [steps, B] (fixed, not sampled, so that runs
    with slightly different logits stay comparable)."""
    g = torch.Generator().manual_seed(seed + 1)
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g)
    decode = torch.randint(0, cfg.vocab_size, (decode_steps, batch), generator=g)
    return prompts, decode


def run(
    caches: PagedCaches,
    prefill: Forward,
    decode: Forward,
    prompts: torch.Tensor,
    decode_ids: torch.Tensor,
) -> RunResult:
    """Prefill each sequence, then decode ``decode_ids.shape[0]`` steps for the whole batch."""
    out = RunResult()
    batch, prompt_len = prompts.shape
    for seq in range(batch):
        out.prefill_logits.append(prefill(caches.prefill_step(seq, prompts[seq]), False))
    for i, ids in enumerate(decode_ids):
        positions = torch.full((batch,), prompt_len + i, dtype=torch.int64)
        out.decode_logits.append(decode(caches.decode_step(ids, positions), True))
    out.caches = caches.snapshot()
    return out
