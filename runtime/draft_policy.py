"""Choosing the draft length each step from measured costs, and the benchmark oracle.

MTP pays only when a verification step costs little more than a plain step. A step that feeds
k drafts costs, on this machine and this placement,

    cost(k) = gpu(k) + c_e * experts(k + 1)

where gpu(k) is the GPU-side time (fixed per-step work, per verify row and per draft: the median of
recent steps at k, or the line through the measured lengths), c_e is the median measured CPU time
per distinct routed expert read (per layer), and experts(r) is the expected number of distinct (layer, expert) pairs a batch
of r rows touches (measured per r; before a measurement, extrapolated from r = 1 as if routing
were random). A step yields 1 + sum_{i<=k} prod_{j<=i} a_j tokens, with a_j the measured
acceptance at draft position j given the earlier drafts were accepted. The policy picks the k in
0..draft_max that maximises tokens per second, and now and then probes a neighbouring length, up
and down in turn, since acceptance and costs drift with the text and the machine; the probes thin
out (16, 32, ... 256 steps apart) while they confirm the choice.

A batch's policy (runtime/batch.py: one step of several sequences, priced per sequence) prices
whole steps instead, CPU experts included: each draft length at its measured ratio to the plain
steps beside it, times what plain steps cost lately (StepCosts.relative False).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field


@dataclass
class StepSample:
    k: int  # drafts fed to verification (0: a plain step)
    gpu_s: float  # wall time of the step minus its CPU expert time
    cpu_s: float  # CPU expert time
    experts: int  # distinct (layer, expert) pairs read on the CPU side
    catchup: int = 0  # MTP rows owed by plain steps before this one that its draft paid


def _median(xs) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else 0.5 * (ys[n // 2 - 1] + ys[n // 2])


@dataclass
class StepCosts:
    """Medians of recent samples: a noisy machine (other processes, the first call's one-time
    costs) adds delays; a median of the last few steps ignores the odd slow one.

    Draft steps are kept relative to a plain step (their ratio to what a plain step cost when they
    ran) and priced at what a plain step costs now: the policy mostly runs one length, so the
    others' samples grow old, and a machine that speeds up or slows down (other jobs, clocks,
    caches warming up) would otherwise make the old samples look too dear or too cheap next to
    fresh ones. What a plain step costs "now" is read from the last few steps of any length, each
    divided by its length's ratio: while the policy drafts, plain steps are rare (probes from
    k=3 go to 2), and a reference made of plain steps alone went stale. A draft step's ratio is
    taken against the steps of other lengths just before it (its own length's steps would only
    echo its old ratio back), so a length run step after step keeps the ratio its probes measured,
    and its price follows its own recent times."""

    window: int = 9
    gpu_by_k: dict = field(default_factory=dict)  # k -> recent GPU-side step times (not relative: whole steps)
    ratio_by_k: dict = field(default_factory=dict)  # k > 0 -> recent times / plain reference
    cpu_per_expert: deque = field(default_factory=lambda: deque(maxlen=17))
    experts_by_rows: dict = field(default_factory=dict)  # rows -> EMA of distinct experts
    # (k, GPU-side seconds) of the last 5 steps, any length: what a plain step costs now
    recent: deque = field(default_factory=lambda: deque(maxlen=5))
    _unreferenced: list = field(default_factory=list)  # (k, seconds) seen before any plain step
    # what a plain step's GPU side costs now (None before any reference, or when it is ~0, where a
    # ratio would mean nothing: draft steps are then priced as measured); set by observe, read for
    # every k the policy prices each step
    _ref: float | None = None
    # False (a batch's policy, whose lengths are sampled as whole batch steps per sequence): a
    # draft length is priced at its ratio to the step next to it, when that one is plain (or, for a
    # length never next to a plain step, to a neighbouring draft step of a length that was), times
    # what plain steps cost lately. Relative pricing drifted there: its ratios, each taken against
    # the other lengths' recent steps, drifted together with few plain steps to anchor them (demo
    # model, 8 sequences: one draft priced at 1.4x a plain step, measured at 2.1x). Each length at
    # its own samples' median compared samples minutes apart on a machine whose speed moved 1.5x in
    # that time (demo, 4 sequences: drafts that ran 10-14% slower than plain were chosen).
    relative: bool = True
    anchored: dict = field(default_factory=dict)  # k > 0 -> ratios to an adjacent plain step
    chained: dict = field(default_factory=dict)  # k > 0 -> ratios through an adjacent draft step
    _prev: tuple | None = None  # (k, seconds) of the last sample (not relative)

    def _pair_ratio(self, k: int) -> deque | None:
        """The ratios that price k (not relative): to plain steps beside it, else chained."""
        return self.anchored.get(k) or self.chained.get(k)

    def _pair(self, cur: tuple) -> None:
        """Ratios from this step (k, seconds) and the one before it (not relative)."""
        prev, self._prev = self._prev, cur
        if prev is None or prev[0] == cur[0] or min(prev[1], cur[1]) <= 1e-9:
            return
        for (k, g), (j, gj) in ((prev, cur), (cur, prev)):
            if k == 0:
                continue
            if j == 0:
                self.anchored.setdefault(k, deque(maxlen=self.window)).append(g / gj)
            elif k not in self.anchored and j in self.anchored:
                self.chained.setdefault(k, deque(maxlen=self.window)).append(g / gj * _median(self.anchored[j]))

    def _ratio(self, k: int) -> float | None:
        """k's median cost relative to a plain step (1 for plain; None: not measured yet)."""
        if k == 0:
            return 1.0
        r = self.ratio_by_k.get(k)
        return _median(r) if r else None

    def _plain_equivalents(self, exclude: int | None = None) -> list[float]:
        """The recent steps' times as plain steps (each over its length's ratio), less `exclude`'s."""
        out = []
        for k, g in self.recent:
            r = self._ratio(k) if k != exclude else None
            if r:
                out.append(g / r)
        return out

    def _update_ref(self) -> None:
        eq = self._plain_equivalents()
        ref = _median(eq) if eq else 0.0
        self._ref = ref if ref > 1e-9 else None

    def observe(self, s: StepSample) -> None:
        if not self.relative:
            # whole steps, CPU experts included: there a draft's expert time is measured beside a
            # plain step's rather than priced per distinct expert, which holds where experts are
            # bound by their bytes but not on small ones bound by their rows (demo, 4 sequences:
            # two drafts priced at 2.2x a plain step, measured at 2.8x)
            whole = s.gpu_s + s.cpu_s
            self.gpu_by_k.setdefault(s.k, deque(maxlen=self.window)).append(whole)
            self._pair((s.k, whole))
            return
        self.gpu_by_k.setdefault(s.k, deque(maxlen=self.window)).append(s.gpu_s)
        if s.k > 0:
            eq = self._plain_equivalents(exclude=s.k)
            ref = _median(eq) if eq else 0.0
            if ref > 1e-9:
                self.ratio_by_k.setdefault(s.k, deque(maxlen=self.window)).append(s.gpu_s / ref)
            elif s.k not in self.ratio_by_k:
                self._unreferenced.append((s.k, s.gpu_s))
        elif self._unreferenced and s.gpu_s > 1e-9:  # the first plain step references the draft steps before it
            for k, g in self._unreferenced:
                self.ratio_by_k.setdefault(k, deque(maxlen=self.window)).append(g / s.gpu_s)
            self._unreferenced.clear()
        self.recent.append((s.k, s.gpu_s))
        self._update_ref()
        if s.experts:
            self.cpu_per_expert.append(s.cpu_s / s.experts)
            r = s.k + 1
            old = self.experts_by_rows.get(r)
            self.experts_by_rows[r] = s.experts if old is None else 0.8 * old + 0.2 * s.experts

    def _measured(self, k: int, best: bool) -> float:
        """GPU-side time at a measured k: at the current plain cost when k has a ratio (plain: that
        cost itself, or its fastest sample for `best`)."""
        if self._ref is not None and self.relative:
            if k > 0 and k in self.ratio_by_k:
                r = self.ratio_by_k[k]
                return (min(r) if best else _median(r)) * self._ref
            if k == 0 and not best:
                return self._ref
        if not self.relative and k > 0 and self._pair_ratio(k) and self.gpu_by_k.get(0):
            r = self._pair_ratio(k)
            return (min(r) if best else _median(r)) * _median(self.gpu_by_k[0])
        g = self.gpu_by_k[k]
        return min(g) if best else _median(g)

    def gpu(self, k: int, best: bool = False) -> float:
        """Median GPU-side time at k (`best`: the fastest sample, an optimistic figure); for an
        unmeasured k, the line through the measured ones (a per-draft slope of 10% of the step
        when only one length was measured)."""
        if k in self.gpu_by_k:
            return self._measured(k, best)
        known = sorted(self.gpu_by_k)
        if not known:
            return 0.0
        lo = max([x for x in known if x < k], default=None)
        hi = min([x for x in known if x > k], default=None)
        if lo is not None and hi is not None:
            g_lo, g_hi = self.gpu(lo, best), self.gpu(hi, best)
            return g_lo + (g_hi - g_lo) * (k - lo) / (hi - lo)
        if len(known) >= 2:  # extrapolate from the two nearest
            a, b = (known[-2], known[-1]) if lo is not None else (known[0], known[1])
            slope = max((self.gpu(b, best) - self.gpu(a, best)) / (b - a), 0.0)
            ref = b if lo is not None else a
            return max(self.gpu(ref, best) + slope * (k - ref), 0.0)
        g = self.gpu(known[0], best)
        return g * (1 + 0.1 * (k - known[0]))

    def per_expert(self) -> float:
        return _median(self.cpu_per_expert) if self.cpu_per_expert else 0.0

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

    def cost(self, k: int, total_experts: int, best: bool = False) -> float:
        return self.gpu(k, best) + self.per_expert() * self.experts(k + 1, total_experts)


class DraftPolicy:
    """Fixed draft length, or adaptive (the step-cost model in this file): `choose()` before a step, `observe()` after."""

    def __init__(self, draft_max: int, adaptive: bool, total_experts: int,
                 explore_every: int = 16, explore_max: int = 256, prior_accept: float = 0.5,
                 prior_weight: float = 2.0, relative_costs: bool = True, batch: int = 1):
        self.draft_max = draft_max
        # sequences per step of the batches this policy decides for: its back-off after a give-up
        # is counted in batches (RETRY_AFTER x batch sequences), so a re-measure is spread over as
        # many steps in a batch as alone (at 8 sequences a back-off of 8 sequences was one batch:
        # the demo re-measured every 2-5 batches and MTP on ran 0.87-0.97x MTP off)
        self.batch = max(1, int(batch))
        self.adaptive = adaptive
        self.total = total_experts
        self.relative_costs = relative_costs  # StepCosts.relative
        self.margin = 1.0 if relative_costs else self.BATCH_MARGIN  # a batch's policy: see BATCH_MARGIN
        self.model = StepCosts(relative=relative_costs)
        self.reached = [0] * (draft_max + 1)  # position j was verified (all earlier accepted)
        self.accepted = [0] * (draft_max + 1)
        self.prior = (prior_accept, prior_weight)
        self.explore_every = explore_every  # grows (x2, up to explore_max) while probes confirm the
        self.explore_base, self.explore_max = explore_every, explore_max  # choice; resets when not
        self._next_probe = explore_every
        self._probe_from: int | None = None  # the best length when the last probe was made
        self._probes = 0
        self.off_for = 0  # sequences left to run without MTP after drafting was found to lose
        self.gave_up = ""  # the last give-up's reason (`decision`)
        self.started = True  # whether the last `start_sequence` ran MTP
        self.steps = 0
        self.chosen: dict[int, int] = {}
        # warm-up (popped from the end): plain and single-draft steps in turn; longer drafts are
        # then predicted (GPU cost along a line, expert union extrapolated) and tried only if they
        # look worth it. The very first step's cost is not used: it carries one-time costs (first
        # calls, caches); it is a plain step, so that after two single-draft steps and one plain
        # step `mtp_loses` can see a placement where drafting can never pay.
        self._warm = [1, 0, 1, 0] if adaptive else []
        # re-measuring after a give-up: the process has paid its one-time costs and the acceptance
        # counts are kept, so both tests of `mtp_loses` need one single-draft sample, not 2 and 4
        self._remeasure = False
        self._cold = True
        self._retry = self.RETRY_AFTER * self.batch  # sequences without MTP after a give-up; doubles each time
        self._again = 0  # a length to run once more: its last step's cost was not steady-state
        self._flip = False  # while undecided: draft on every other step (see `choose`)

    def accept_rate(self, j: int, optimistic: bool = False) -> float:
        """Acceptance at draft position j (the prior's pseudo-counts added); `optimistic`: one
        standard error higher, the most a few samples leave plausible."""
        m, w = self.prior
        n = self.reached[j] + w
        p = (self.accepted[j] + m * w) / n
        return min(1.0, p + (p * (1 - p) / n) ** 0.5) if optimistic else p

    def expected_tokens(self, k: int, optimistic: bool = False) -> float:
        tot, run = 1.0, 1.0
        for j in range(1, k + 1):
            run *= self.accept_rate(j, optimistic)
            tot += run
        return tot

    def rate(self, k: int, optimistic: bool = False) -> float:
        """Expected tokens per second at k; `optimistic`: at the optimistic acceptance (what a few
        samples cannot rule out; the cost stays the median: optimism on both widened the undecided
        zone until measuring cost 3% where drafting loses 16% a step, synthetic Air at alpha 0.6)."""
        c = self.model.cost(k, self.total)
        return self.expected_tokens(k, optimistic) / c if c > 0 else 0.0

    def choose(self, limit: int) -> int:
        """Draft length for the next step, at most `limit` (context and token budget)."""
        hi = min(self.draft_max, limit)
        if not self.adaptive or hi <= 0:
            return max(hi, 0)
        self.steps += 1
        if self._warm:
            return min(self._warm.pop(), hi)
        if self._again:
            k, self._again = min(self._again, hi), 0
            self.chosen[k] = self.chosen.get(k, 0) + 1
            return k
        k = self._best(hi)
        if k > 0 and not self.relative_costs and len(self.model.gpu_by_k.get(0, ())) < self.MEASURED_PLAIN:
            # a batch's policy prices drafts against its plain steps (StepCosts.relative False):
            # with fewer than 3 plain steps behind the plain price, one noisy step decided that
            # drafting paid (demo model, 4 sequences: one plain sample, drafts run at 2-3 lengths
            # for whole batches, 11-22% slower than MTP off). Plain on every other step until then
            self._flip = not self._flip
            if self._flip:
                self.chosen[0] = self.chosen.get(0, 0) + 1
                return 0
        if self._probe_from is not None:  # the step after a probe: did it change the choice?
            same = k == self._probe_from
            self.explore_every = min(self.explore_every * 2, self.explore_max) if same else self.explore_base
            self._probe_from = None
        if k == 0 and self._gathering():
            # The estimates say plain, but `mtp_loses` has too few draft steps to judge, or so few
            # that the acceptance could still be high enough to pay: draft on every other step
            # until it can tell. Otherwise drafts come only from probes, 16+ steps apart, and MTP
            # stays on for several sequences at the cost of its cache upkeep (measured on
            # synthetic GLM-4.5-Air on the CPU: 5-12% against plain at alpha 0-0.6).
            self._flip = not self._flip
            if self._flip:
                k = min(1, hi)
                self.chosen[k] = self.chosen.get(k, 0) + 1
                return k
        if self.steps >= self._next_probe:
            # probe a neighbour, so estimates stay fresh as the text and the machine change; a
            # neighbour costs little more than the best, and probes thin out while they confirm it
            self._next_probe = self.steps + self.explore_every
            self._probe_from = k
            # up and down in turn: draft costs are priced against recent plain steps, so while
            # drafting, the probes down are what keep those fresh
            self._probes += 1
            up = k < hi and (k == 0 or self._probes % 2)
            # a batch's policy probes down to plain itself: its plain price is made of plain
            # steps alone (not relative), and while it drafts nothing else renews them
            k = k + 1 if up else (max(k - 1, 0) if self.relative_costs else 0)
        self.chosen[k] = self.chosen.get(k, 0) + 1
        return k

    # For a batch's policy, a draft length is chosen over plain decoding only when it promises this
    # much more (`margin`): a batch's step samples leave out what drafting costs around the steps
    # (the MTP layer's share of each prefill, sequences finishing on different steps), and two
    # rates within a few percent are a tie the policy would flip on. (Demo model, 4 sequences:
    # k=1 and k=2 were priced within 2% of plain and ran 9% and 16% slower.)
    BATCH_MARGIN = 1.04

    def peek(self, limit: int) -> int:
        """The length `choose` would exploit now, with no warm-up, probe or count taken: for a
        batch step whose cost is not a decode step's (another sequence's prefill runs in it)."""
        hi = min(self.draft_max, limit)
        if not self.adaptive or hi <= 0:
            return max(hi, 0)
        if self._warm or 0 not in self.model.gpu_by_k:
            return 0
        return self._best(hi)

    def _best(self, hi: int) -> int:
        k = max(range(1, hi + 1), key=self.rate, default=0)
        return k if k and self.rate(k) > self.rate(0) * self.margin else 0

    # `mtp_loses` bound: even with every draft accepted, drafting must beat plain decoding by this
    # factor to be kept on from a single measured step (noise on one step is well below it)
    HOPELESS_MARGIN = 1.15

    MEASURED_DRAFTS = 4  # single-draft steps the measured test of `mtp_loses` needs
    MEASURED_PLAIN = 3
    # draft steps after which the measured test goes by the acceptance estimate alone, even where
    # the optimistic one still says drafting would pay
    MEASURED_DRAFTS_MAX = 16

    def _drafts_short(self) -> bool:
        """Fewer single-draft samples than the measured test of `mtp_loses` needs."""
        return len(self.model.gpu_by_k.get(1, ())) < (1 if self._remeasure else self.MEASURED_DRAFTS)

    def _ambiguous(self) -> bool:
        """Plain wins at the estimated acceptance but not at the optimistic one, and there are
        fewer than MEASURED_DRAFTS_MAX acceptance samples: the first few drafts decide too little.
        (The demo model on the CPU accepts 72% of its drafts and one draft pays 1.05-1.2x there;
        2 accepted of its first 4, a 31% chance, made the policy give up on it.)"""
        if self.reached[1] >= self.MEASURED_DRAFTS_MAX:
            return False
        ks = range(1, self.draft_max + 1)
        plain = self.rate(0)
        return max(self.rate(k) for k in ks) < plain * self.margin <= max(self.rate(k, optimistic=True) for k in ks)

    def _gathering(self) -> bool:
        """Drafting on every other step to collect what `mtp_loses` needs."""
        return self._drafts_short() or self._ambiguous()

    def _undecided(self) -> bool:
        return self._gathering() or len(self.model.gpu_by_k.get(0, ())) < self.MEASURED_PLAIN

    def mtp_loses(self) -> bool:
        """True when drafting clearly does not pay here. Two tests, after plain steps:
        - hopeless: with a plain and two single-draft steps measured (one when re-measuring after
          a give-up: the process has paid its one-time costs by then, and each draft step where
          drafting cannot pay costs ~3 plain steps on a CPU-only machine), no draft length up to
          draft_max beats plain decoding even if every draft were accepted ((k+1) tokens per
          step, at the faster of the draft steps: the first may carry one-time costs), by a margin
          of HOPELESS_MARGIN (a CPU-only machine, where the MTP layer and a verification batch's
          expert union both cost CPU time, is the usual case);
        - measured: with 3 plain and 4 single-draft steps (`choose` drafts on every other step
          until there are), no draft length beats plain at the measured acceptance, nor at one
          standard error above it (up to 16 draft steps; `_ambiguous`), at the median costs:
          the policy would not draft, and keeping the MTP layer's cache up to date only costs.
          (4 draft steps: with 2, a draft model that is right 72% of the time is rejected twice
          in a row 8% of the time; 4 times in a row, 0.6%. A re-measure after a give-up needs
          one: the acceptance counts are kept, only the costs are measured again.)
        Keeping the MTP layer's cache up to date then costs more than it can return, so the engine
        turns MTP off for the rest of the sequence and for the next sequences (see `give_up`)."""
        m = self.model.gpu_by_k
        if not self.adaptive or not m.get(0) or len(m.get(1, ())) < (1 if self._remeasure else 2):
            return False
        plain = 1.0 / max(self.model.cost(0, self.total), 1e-12)
        best = max((k + 1) / max(self.model.cost(k, self.total, best=True), 1e-12)
                   for k in range(1, self.draft_max + 1))
        if best * self.HOPELESS_MARGIN < plain:
            return True
        if self._undecided():
            return False
        return max(self.rate(k) for k in range(1, self.draft_max + 1)) < self.rate(0) * self.margin

    RETRY_AFTER = 8  # first back-off, in sequences; doubled at each give-up, up to RETRY_MAX
    RETRY_MAX = 64

    def start_sequence(self) -> bool:
        """Whether the next sequence should run MTP at all."""
        self.started = self.off_for == 0
        if self.off_for > 0:
            self.off_for -= 1
            if self.off_for == 0:
                # the sequence after this one measures again from scratch: costs drift with the
                # machine and the context (the acceptance counts are kept: they describe the model)
                self.model = StepCosts(relative=self.relative_costs)
                self._warm = [0, 1, 0]  # popped from the end: plain, one draft, plain
                self._remeasure = True
                self._cold = True
                self.explore_every = self.explore_base  # probe at the first pace again
                self._next_probe = self.steps + self.explore_every
            return False
        return True

    def end_sequence(self, turned_off: bool) -> None:
        """After a sequence that ran MTP: one that kept it, with the policy measured enough to
        judge, resets the back-off. (A batch does not price a step in which some sequences run
        without MTP: a re-measure's first sequence beside others still off kept MTP unjudged, and
        its end reset the wait, so the demo model at 4 sequences re-measured every other batch.)"""
        if not turned_off and self.model.gpu_by_k.get(0) and not self._drafts_short():
            self._retry = self.RETRY_AFTER * self.batch

    def give_up(self) -> None:
        """Drafting lost: run the next `_retry - 1` sequences without MTP, then measure again.
        Each give-up doubles the wait (8, 16, ... 64 sequences, times the batch size), so a
        placement where MTP never pays spends ever less on re-measuring it; a finding that it pays
        resets the wait."""
        self.gave_up = self._cost_line("drafting off")  # the costs are reset before the re-measure
        self.off_for = self._retry - 1
        self._retry = min(self._retry * 2, self.RETRY_MAX * self.batch)

    def measured_accept(self) -> float | None:
        """Acceptance of first drafts so far (no prior), None before any."""
        return self.accepted[1] / self.reached[1] if self.draft_max and self.reached[1] else None

    def _cost_line(self, head: str) -> str:
        """`head` with the cost model's reason: a single-draft step at c_1 and a plain step at
        c_0 yield 1 + a and 1 token, so one draft pays above an acceptance a of c_1 / c_0 - 1."""
        m = self.model
        acc = self.measured_accept()
        seen = f" (measured {acc:.0%})" if acc is not None else ""
        if not m.gpu_by_k.get(0) or not m.gpu_by_k.get(1):
            return f"{head}: costs not measured yet{seen}"
        ratio = m.cost(1, self.total) / max(m.cost(0, self.total), 1e-12)
        need = ratio - 1
        if need <= 0:
            return f"{head}: a draft step costs {ratio:.1f}x a plain step here, any acceptance pays{seen}"
        if need >= 1:
            return f"{head}: a draft step costs {ratio:.1f}x a plain step here, more than two tokens' worth{seen}"
        return f"{head}: a draft step costs {ratio:.1f}x a plain step here, needs > {need:.0%} acceptance{seen}"

    def decision(self) -> str:
        """What the policy does now and why, in one line (the `draft_policy` of a result's stats)."""
        if not self.adaptive:
            return f"draft length fixed at {self.draft_max} (adaptive off)"
        if self.off_for > 0 or not self.started:
            again = f"in {self.off_for + 1} sequences" if self.off_for else "from the next sequence"
            return f"{self.gave_up}; measured again {again}"
        return self._cost_line("drafting on")

    def count_accepted(self, n_drafted: int, n_accepted: int) -> None:
        """A step's drafts and how many of them were accepted (the acceptance per position)."""
        for j in range(1, n_drafted + 1):
            if j <= n_accepted + 1:
                self.reached[j] += 1
                self.accepted[j] += int(j <= n_accepted)

    def observe(self, k: int, n_drafted: int, n_accepted: int, sample: StepSample) -> None:
        """After a step that drafted `n_drafted` (<= k: p_min may stop early) and accepted the
        first `n_accepted` of them."""
        self.count_accepted(n_drafted, n_accepted)
        if self._cold:
            self._cold = False
            return
        if sample.catchup > 1 and self.adaptive:
            # A draft after a run of plain steps first brings the MTP cache up to date: its cost
            # is not what this length costs step after step (a probe after 16 plain steps ran
            # 10-15% dearer on the demo model). Keep its acceptance, drop its cost, and run the
            # length once more for a steady sample.
            self._again = k
            return
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
