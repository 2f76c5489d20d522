"""Sampling parameters and the token sampler (greedy, temperature, top-p, per-request seeds)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from finemoe.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()        # stop strings (not included in the output)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ConfigError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class RowSampler:
    params: SamplingParams
    generator: torch.Generator | None = field(default=None)

    @classmethod
    def for_params(cls, params: SamplingParams, device: torch.device) -> RowSampler:
        """A request's sampler: greedy, or with its own generator on `device`, seeded by params.seed (else by the
        clock)."""
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % (2**31)))
        return cls(params, gen)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] float -> token id tensor [] (on device; no sync)."""
        if self.params.greedy:
            return torch.argmax(logits, dim=-1)
        probs = torch.softmax(logits.float() / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < self.params.top_p   # [V] keep the nucleus
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def sample_batch(logits: torch.Tensor, samplers: list[RowSampler]) -> torch.Tensor:
    """logits [B, V] -> next ids [B] on device. All-greedy batches take one argmax."""
    if all(s.params.greedy for s in samplers):
        return torch.argmax(logits, dim=-1)
    return torch.stack([s.sample(logits[i]) for i, s in enumerate(samplers)])
