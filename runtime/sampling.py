"""Sampling: greedy, temperature, top-k, top-p, min-p, seeded.

Order (as vLLM): temperature, then top-k, top-p, min-p on the tempered distribution. `probs()` is
the processed target distribution that speculative acceptance needs (DESIGN.md §2): a draft d is
accepted with probability p(d), otherwise the replacement is sampled from p with d removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import NextnError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        def bad(name, value, expected):
            raise NextnError(f"invalid sampling value {name}={value!r}: expected {expected}")

        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            bad("temperature", t, "a number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", self.top_k, "an integer >= 0 (0 = off)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "a number in (0, 1]")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p < 1:
            bad("min_p", self.min_p, "a number in [0, 1)")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad("seed", self.seed, "an integer or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """Seeded generator on `device`: sampling runs where the logits are, and a CUDA tensor needs a
        CUDA generator."""
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else torch.seed() & 0x7FFFFFFF)
        return g

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed distribution over the vocabulary (float32 [..., V]); one-hot argmax if greedy."""
        logits = logits.float()
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        x = logits / self.temperature
        if self.top_k and self.top_k < x.shape[-1]:
            kth = torch.topk(x, self.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        p = torch.softmax(x, dim=-1)
        if self.top_p < 1.0:
            sp, idx = torch.sort(p, dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = (sp.cumsum(-1) - sp) >= self.top_p
            p = p.scatter(-1, idx, sp.masked_fill(drop, 0.0))
        if self.min_p > 0:
            p = p.masked_fill(p < self.min_p * p.max(-1, keepdim=True).values, 0.0)
        return p / p.sum(-1, keepdim=True)

    def sample(self, logits: torch.Tensor, gen: torch.Generator | None) -> int:
        if self.greedy:
            return int(logits.argmax(-1))
        return int(torch.multinomial(self.probs(logits), 1, generator=gen))
