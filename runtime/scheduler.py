"""Choosing the draft length each step from measured costs, and the benchmark oracle.

MTP pays only when a verification step costs little more than a plain step. A step that feeds
k drafts costs, on this machine and this placement,

    cost(k) = gpu(k) + c_e * experts(k + 1)

where gpu(k) = g0 + g1 * k is the GPU-side time (fixed per-step work, per verify row and per draft,
fitted by least squares over recent steps), c_e is the measured CPU time per distinct routed expert
read (per layer), and experts(r) is the expected number of distinct (layer, expert) pairs a batch
of r rows touches (measured per r; before a measurement, extrapolated from r = 1 as if routing
were random). A step yields 1 + sum_{i<=k} prod_{j<=i} a_j tokens, with a_j the measured
acceptance at draft position j given the earlier drafts were accepted. The policy picks the k in
0..draft_max that maximises tokens per second, and every `explore_every` steps probes the next
length up (or down), since acceptance and costs drift with the text and the machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class StepSample:
    k: int  # drafts fed to verification (0: a plain step)
    gpu_s: float  # wall time of the step minus its CPU expert time
    cpu_s: float  # CPU expert time
    experts: int  # distinct (layer, expert) pairs read on the CPU side


@dataclass
class CostModel:
    decay: float = 0.9  # forgetting factor of the running sums
    _sx: float = 0.0
    _sy: float = 0.0
    _sxx: float = 0.0
    _sxy: float = 0.0
    _w: float = 0.0
    _cpu_s: float = 0.0
    _cpu_e: float = 0.0
    experts_by_rows: dict = field(default_factory=dict)  # rows -> EMA of distinct experts

    def observe(self, s: StepSample) -> None:
        d = self.decay
        self._w = d * self._w + 1
        self._sx = d * self._sx + s.k
        self._sy = d * self._sy + s.gpu_s
        self._sxx = d * self._sxx + s.k * s.k
        self._sxy = d * self._sxy + s.k * s.gpu_s
        if s.experts:
            self._cpu_s = d * self._cpu_s + s.cpu_s
            self._cpu_e = d * self._cpu_e + s.experts
            r = s.k + 1
            old = self.experts_by_rows.get(r)
            self.experts_by_rows[r] = s.experts if old is None else 0.8 * old + 0.2 * s.experts

    def gpu(self, k: int) -> float:
        if self._w == 0:
            return 0.0
        mx, my = self._sx / self._w, self._sy / self._w
        var = self._sxx / self._w - mx * mx
        g1 = (self._sxy / self._w - mx * my) / var if var > 1e-9 else 0.05 * my
        g1 = max(g1, 0.0)
        return max(my + g1 * (k - mx), 0.0)

    def per_expert(self) -> float:
        return self._cpu_s / self._cpu_e if self._cpu_e else 0.0

    def experts(self, rows: int, total: int) -> float:
        if rows in self.experts_by_rows:
            return self.experts_by_rows[rows]
        known = sorted(self.experts_by_rows)
        if not known or total <= 0:
            return 0.0
        r0 = known[0]
        p = min(self.experts_by_rows[r0] / total, 0.999999)
        per_row = 1 - (1 - p) ** (1 / r0)  # chance one row touches a given (layer, expert)
        return total * (1 - (1 - per_row) ** rows)

    def cost(self, k: int, total_experts: int) -> float:
        return self.gpu(k) + self.per_expert() * self.experts(k + 1, total_experts)


class DraftPolicy:
    """Fixed draft length, or adaptive (DESIGN.md §5): `choose()` before a step, `observe()` after."""

    def __init__(self, draft_max: int, adaptive: bool, total_experts: int,
                 explore_every: int = 24, prior_accept: float = 0.5, prior_weight: float = 2.0):
        self.draft_max = draft_max
        self.adaptive = adaptive
        self.total = total_experts
        self.model = CostModel()
        self.reached = [0] * (draft_max + 1)  # position j was verified (all earlier accepted)
        self.accepted = [0] * (draft_max + 1)
        self.prior = (prior_accept, prior_weight)
        self.explore_every = explore_every
        self.steps = 0
        self.chosen: dict[int, int] = {}
        # warm-up: one step with a single draft, then a plain one; longer drafts are then predicted
        # (linear GPU cost, expert union extrapolated) and tried only if they look worth it
        self._warm = [0, 1] if adaptive else []

    def accept_rate(self, j: int) -> float:
        m, w = self.prior
        return (self.accepted[j] + m * w) / (self.reached[j] + w)

    def expected_tokens(self, k: int) -> float:
        tot, run = 1.0, 1.0
        for j in range(1, k + 1):
            run *= self.accept_rate(j)
            tot += run
        return tot

    def rate(self, k: int) -> float:
        c = self.model.cost(k, self.total)
        return self.expected_tokens(k) / c if c > 0 else 0.0

    def choose(self, limit: int) -> int:
        """Draft length for the next step, at most `limit` (context and token budget)."""
        hi = min(self.draft_max, limit)
        if not self.adaptive or hi <= 0:
            return max(hi, 0)
        self.steps += 1
        if self._warm:
            return min(self._warm.pop(), hi)
        k = max(range(hi + 1), key=self.rate)
        if self.steps % self.explore_every == 0:
            # probe a neighbour, so estimates stay fresh as the text and the machine change;
            # a neighbour costs little more than the best, unlike a random length
            k = k + 1 if k < hi else max(k - 1, 0)
        self.chosen[k] = self.chosen.get(k, 0) + 1
        return k

    def observe(self, k: int, n_drafted: int, n_accepted: int, sample: StepSample) -> None:
        """After a step that drafted `n_drafted` (<= k: p_min may stop early) and accepted the
        first `n_accepted` of them."""
        for j in range(1, n_drafted + 1):
            if j <= n_accepted + 1:
                self.reached[j] += 1
                self.accepted[j] += int(j <= n_accepted)
        self.model.observe(sample)


class Oracle:
    """Benchmark oracle: each draft is replaced by the target's true next token with probability
    alpha, otherwise by a token that is certainly wrong. The true tokens come from a plain greedy
    run of the same prompt (greedy MTP output equals it), so acceptance ~ alpha at any position
    while the real drafting and verification costs are paid."""

    def __init__(self, target_tokens: list[int], alpha: float, n_vocab: int, seed: int = 0):
        self.target = target_tokens  # the full sequence: prompt + plain greedy output
        self.alpha = alpha
        self.n_vocab = n_vocab
        self.rng = random.Random(seed)

    def replace(self, position: int, drafted: int) -> int:
        """The draft for sequence position `position`."""
        if position >= len(self.target):
            return drafted
        true = self.target[position]
        return true if self.rng.random() < self.alpha else (true + 1) % self.n_vocab
