"""Sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded.

Order: the repetition penalty on the raw logits (llama.cpp's rule: a token among the last
`repeat_last_n` of the sequence has a positive logit divided by `repeat_penalty`, a negative one
multiplied by it), then (as vLLM) temperature, then top-k, top-p, min-p on the tempered
distribution. Greedy decoding takes the argmax of the penalised logits. `probs()` is the processed
target distribution that speculative acceptance needs: a draft d is accepted with
probability p(d), otherwise the replacement is sampled from p with d removed. The penalty depends
on the tokens before the row, so every caller passes that row's history: a verification row after
drafts d1..di sees them as plain decoding would have, and MTP stays lossless under it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import NextnError


def argmax_token(logits: torch.Tensor) -> int:
    """The index of the first maximum of a logits row [V] (a NaN counts as the maximum, as in
    torch.argmax). A float32 CPU row goes through numpy: torch's argmax took 156 us over GLM's
    151,552 logits on the 2-core VM, numpy's 11, and greedy decoding takes one per sequence and
    step (and per draft)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 1:
        return int(logits.detach().numpy().argmax())
    return int(logits.argmax(-1))


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64  # how many of the latest tokens the penalty looks at

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
        r = self.repeat_penalty
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not math.isfinite(r) or r <= 0:
            bad("repeat_penalty", r, "a number > 0 (1 = off)")
        n = self.repeat_last_n
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            bad("repeat_last_n", n, "an integer >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """Seeded generator on `device`: sampling runs where the logits are, and a CUDA tensor needs a
        CUDA generator."""
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else torch.seed() & 0x7FFFFFFF)
        return g

    @property
    def penalised(self) -> bool:
        return self.repeat_penalty != 1.0

    def penalise(self, logits: torch.Tensor, history=()) -> torch.Tensor:
        """`logits` [V] after the repetition penalty for the tokens in `history` (the sequence before
        this row; only its last `repeat_last_n` count)."""
        if not self.penalised or not len(history):
            return logits
        recent = torch.tensor(sorted(set(history[-self.repeat_last_n:])), dtype=torch.long, device=logits.device)
        x = logits.float().clone()
        v = x[recent]
        x[recent] = torch.where(v > 0, v / self.repeat_penalty, v * self.repeat_penalty)
        return x

    def probs(self, logits: torch.Tensor, history=()) -> torch.Tensor:
        """Processed distribution over the vocabulary (float32 [V]); one-hot argmax if greedy.
        `history`: the tokens before this row (the repetition penalty's input)."""
        logits = self.penalise(logits.float(), history)
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

    def sample(self, logits: torch.Tensor, gen: torch.Generator | None, history=()) -> int:
        if self.greedy:
            return argmax_token(self.penalise(logits, history))
        return int(torch.multinomial(self.probs(logits, history), 1, generator=gen))
