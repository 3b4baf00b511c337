"""Several generations decoded together: a scheduler over sequence ids and the driver that steps them.

`Scheduler` is plain Python over ids (no model, no tensors; tests/test_batch.py drives it alone):
it keeps the waiting queue and the running set in admission order, admits while the batch has
room, and names the sequences to preempt (newest first) when the KV pool cannot hold a step.

`Batch` drives `_Run`s (runtime/engine.py) with it. A run's step is a generator of model ops
(runtime/decode.py); each `round()` starts a step for every running sequence that finished its
last one (after reserving the pages the step may write), then serves ONE kind of op for every
sequence waiting on that kind, through the model runner (runtime/runner.py): one forward over all
of their rows. Kinds are served in the order MTP forward, MTP head, main forward, main head, so
sequences that draft (each its own number of drafts) finish drafting first and the main model
verifies all sequences' rows in one forward, with the plain sequences' single rows beside them.
A prompt is prefilled one chunk per step, between the other sequences' steps.

Preemption is by recompute, as vLLM's: a preempted sequence gives back its pages and, when it is
admitted again, prefills the tokens it had; its text so far, sampler and statistics are kept.
Recomputed KV comes from a prefill (a batched forward), so after a preemption a sequence's later
tokens are not promised bit-equal to a lone run's; a pool of one context per sequence never
preempts.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from time import perf_counter

import torch

from .errors import NextnError

from .model import RunContext
from .runner import KINDS, BatchStats, execute


class Scheduler:
    """Sequence ids through waiting -> running -> gone."""

    def __init__(self, max_running: int):
        if max_running < 1:
            raise ValueError(f"max_running must be at least 1, got {max_running}")
        self.max_running = max_running
        self.waiting: deque[int] = deque()
        self.running: list[int] = []  # in admission order

    def submit(self, sid: int) -> None:
        self.waiting.append(sid)

    def admit(self, fits) -> list[int]:
        """Admit waiting ids in order while there is room and `fits(sid)` (its first step's
        pages are free); the first that does not fit waits, and so do the ones behind it (no
        overtaking: a long prompt is not starved by short ones)."""
        out = []
        while self.waiting and len(self.running) < self.max_running and fits(self.waiting[0]):
            sid = self.waiting.popleft()
            self.running.append(sid)
            out.append(sid)
        return out

    def victims(self, sid: int, at_boundary) -> list[int]:
        """Running ids that may be preempted to make room for `sid`'s next step: those admitted
        after it that are between steps, newest first."""
        later = self.running[self.running.index(sid) + 1:]
        return [v for v in reversed(later) if at_boundary(v)]

    def preempt(self, sid: int) -> None:
        """Back to the head of the queue (it is admitted again before anything newer)."""
        self.running.remove(sid)
        self.waiting.appendleft(sid)

    def remove(self, sid: int) -> None:
        """Finished or cancelled, waiting or running."""
        if sid in self.running:
            self.running.remove(sid)
        elif sid in self.waiting:
            self.waiting.remove(sid)


@dataclass
class _State:
    run: object
    gen: object = None  # the step in progress (a generator of ops), None between steps
    op: tuple | None = None  # the op it waits on
    begun: bool = False


class Batch:
    def __init__(self, engine, max_batch: int | None = None):
        self.engine, self.model = engine, engine.model
        self.sched = Scheduler(max_batch or 64)
        self.states: dict[int, _State] = {}
        self._ids: dict[int, int] = {}  # id(run) -> sid
        self._next = 0
        self.stats = BatchStats()
        self.preemptions = 0
        self.t_decode = None  # when every sequence had finished its prefill (benchmarks)
        self.drafts = _BatchDrafts()
        self.cpu_s = 0.0  # routed-expert seconds of every call (main and MTP), for the draft costs
        self.experts = 0  # distinct experts of the main forwards
        # called with (run, exception) when a run's step raises (the run is dropped, the others go
        # on); None: the exception propagates (generate, generate_batch)
        self.on_error = None

    # ---- the callers' side ---------------------------------------------------------------------

    def submit(self, prompt, **kw):
        """A new generation (the keywords of `Engine.generate`) in this batch; returns its run:
        `round()` reports its text as it comes, `run.done` and `run.result` tell when it ended."""
        from .engine import _Run

        run = _Run(self.engine, prompt, **kw)
        self.add(run)
        return run

    def add(self, run, begun: bool = False) -> int:
        """Queue a run (`begun`: its `begin()` was called already, as the server does to report
        its errors to its client)."""
        sid = self._next
        self._next += 1
        self.states[sid] = _State(run, begun=begun)
        self._ids[id(run)] = sid
        self.sched.submit(sid)
        return sid

    def cancel(self, run) -> None:
        """End a run now (what it generated so far is its result); its pages go back."""
        sid = self._ids.pop(id(run), None)
        if sid is None:
            return
        st = self.states.pop(sid)
        self.sched.remove(sid)
        if st.gen is not None:
            st.gen.close()
        if st.begun:
            run.cancel()
        else:
            run.done = True

    @property
    def active(self) -> int:
        return len(self.states)

    def run_to_end(self) -> None:
        try:
            while self.states:
                self.round()
        finally:
            for st in list(self.states.values()):
                self.cancel(st.run)

    # ---- one round -----------------------------------------------------------------------------

    def round(self) -> list[tuple[object, str]]:
        """Start steps where sequences are between steps, serve one kind of op; returns
        (run, text) for every step that ended in this round."""
        out: list[tuple[object, str]] = []
        with torch.inference_mode():
            if all(self.states[sid].gen is None for sid in self.sched.running):
                # a batch step ends here and the next one starts: every running sequence, and
                # those admitted now, take one step together (the step's cost is then one figure,
                # which the draft policy of a batch needs: _BatchDrafts)
                self.drafts.end_step(self)
                for sid in self.sched.admit(self._fits):
                    self._begin(sid, out)
                if not self.sched.running and self.sched.waiting:
                    # nothing holds pages, yet the next run's first chunk does not fit: waiting
                    # would never end (a pool smaller than one chunk, or pages not given back)
                    free = self._free()
                    raise NextnError(f"KV pool: {free[0]} main and {free[1]} MTP pages free with no "
                                     "sequence running, too few for the next prompt's first chunk")
                self.drafts.start_step(self)
                for sid in list(self.sched.running):
                    if sid in self.sched.running:  # not preempted just now for another's pages
                        self._start(sid, out)
            by_kind: dict[str, list[int]] = {}
            for sid in self.sched.running:
                st = self.states.get(sid)
                if st is not None and st.op is not None:
                    by_kind.setdefault(st.op[0], []).append(sid)
            if self.t_decode is None and not self.sched.waiting and all(
                    st.begun and st.run._prefill is None for st in self.states.values()):
                self.t_decode = perf_counter()  # every sequence has its first token: decoding only
            for kind in KINDS:
                sids = by_kind.get(kind)
                if sids:
                    try:
                        results = self._execute(kind, sids)
                    except Exception as e:  # noqa: BLE001 - the call's runs fail together
                        if self.on_error is None:
                            raise
                        for sid in sids:
                            self.states[sid].gen.close()
                            self.states[sid].gen = None
                            self._fail(sid, e)
                        break
                    for sid, r in zip(sids, results):
                        self._advance(sid, r, out)
                    break
        return out

    def _start(self, sid: int, out) -> None:
        """Start the sequence's next step (after reserving its pages); a step that ends without
        a model call (it emitted tokens decided before) is followed at once by the next one."""
        for _ in range(4):
            st = self.states.get(sid)
            if st is None or st.gen is not None or not self._reserve(sid):
                return
            st.gen = st.run.step_ops()
            self._advance(sid, None, out)

    def _begin(self, sid: int, out) -> None:
        st = self.states[sid]
        if st.run._resume_pending:
            st.run.resume()
            return
        if not st.begun:
            st.begun = True
            st.run.batch_size = len(self.sched.running)
            st.run.begin()
        if st.run.done:  # max_tokens 0: nothing to run
            self._finish(sid, out, "")

    def _advance(self, sid: int, value, out) -> None:
        st = self.states[sid]
        run = st.run
        _activate(self.model.bus, run.ctx)
        try:
            st.op = st.gen.send(value)
        except StopIteration as e:
            st.gen = st.op = None
            if run.done:
                self._finish(sid, out, e.value)
            else:
                out.append((run, e.value))
        except Exception as e:  # noqa: BLE001 - this run fails, the others go on
            st.gen = st.op = None
            self._fail(sid, e)

    def _fail(self, sid: int, e: Exception) -> None:
        st = self.states.pop(sid)
        self._ids.pop(id(st.run), None)
        self.sched.remove(sid)
        try:
            st.run.close()
        finally:
            if self.on_error is None:
                raise e
            self.on_error(st.run, e)

    def _finish(self, sid: int, out, piece: str) -> None:
        st = self.states.pop(sid)
        self._ids.pop(id(st.run), None)
        self.sched.remove(sid)
        st.run.close()
        out.append((st.run, piece))

    def _execute(self, kind: str, sids: list[int]) -> list:
        """One kind of op for these sequences in one call; the measured work goes to each
        sequence's run context (each waited for the whole call: its expert time and distinct
        experts are the call's; the activation bytes are shared out by rows)."""
        bus = self.model.bus
        ops = [self.states[s].op for s in sids]
        ctxs = [self.states[s].run.ctx for s in sids]
        if len(ops) == 1:
            c = ctxs[0]
            _activate(bus, c)
            e0, s0 = c.cpu_experts_read, c.cpu_expert_s
            res = execute(self.model, ops)
            self.cpu_s += c.cpu_expert_s - s0
            if kind == "fwd":
                self.experts += c.cpu_experts_read - e0
                self.stats.add(1, _rows(ops[0]), c.cpu_experts_read - e0, c.cpu_expert_s - s0)
            return res
        bctx = RunContext(timeline=ctxs[0].timeline)
        _activate(bus, bctx)
        res = execute(self.model, ops)
        rows = [_rows(op) for op in ops]
        total = max(sum(rows), 1)
        for c, r in zip(ctxs, rows):
            c.activation_bytes += bctx.activation_bytes * r // total
            c.cpu_expert_s += bctx.cpu_expert_s
            c.cpu_experts_read += bctx.cpu_experts_read
        self.cpu_s += bctx.cpu_expert_s
        if kind == "fwd":
            self.experts += bctx.cpu_experts_read
            self.stats.add(len(ops), sum(rows), bctx.cpu_experts_read, bctx.cpu_expert_s)
        return res

    # ---- pages ---------------------------------------------------------------------------------

    def _free(self) -> tuple[int, int]:
        main, mtp = self.engine.pools
        return main.free_pages, (mtp.free_pages if mtp is not None else 0)

    def _fits(self, sid: int) -> bool:
        """Pages for the first prefill chunk are free (a new run holds none yet)."""
        run = self.states[sid].run
        e = self.engine
        n = min(len(run.prompt_ids), e.prefill_chunk) + 1
        main, mtp = e.pools
        pages = main.pages_for(n)
        free = self._free()
        return pages <= free[0] and (mtp is None or not run.use_mtp or pages <= free[1])

    def _reserve(self, sid: int) -> bool:
        """Hold the pages the run's next step may write; preempt newer sequences between steps
        when the pools are short. False: the run waits this round."""
        run = self.states[sid].run
        n = run.slots_next()
        need = run.seq.pages_needed(n)
        if need == (0, 0):  # the usual step: its pages are held already (a page holds many slots)
            return True
        for victim in [None] + self.sched.victims(sid, lambda v: self.states[v].gen is None):
            if victim is not None:
                self.states[victim].run.preempt()
                self.sched.preempt(victim)
                self.preemptions += 1
            free = self._free()
            if need[0] <= free[0] and need[1] <= free[1]:
                run.seq.reserve(n)
                return True
        return False


class _BatchDrafts:
    """The draft length of a batch step, for the adaptive sequences decoding in it.

    Alone, a sequence's draft policy prices each length by what its steps cost. In a batch the
    sequences' steps are one step: a sequence that decodes plainly waits for the others' drafts,
    so its "plain" step costs what theirs cost, and a policy that watched its own steps would see
    drafting as free. So once a batch has held two sequences, the batch asks the policy for the
    number of sequences in the step (`Engine.draft_policy`: 1, 2, ... 8, 9-16, ...) for one length,
    gives it to each adaptive sequence (capped by each one's own limit), and tells the policy what
    the step cost per sequence and what each sequence accepted. A batch that only ever held one
    sequence (`generate`) leaves the decision to the sequence, which prices its own steps."""

    def __init__(self):
        self.runs: list = []  # the runs this batch step decides for
        self.policy = None
        self.k = 0
        self.multi = False  # the batch has held two sequences at once
        self._t0 = self._cpu0 = 0.0
        self._e0 = 0
        self._pure = True  # no prefill in this batch step: its cost is a decode step's
        self._n = 1  # sequences in this batch step

    def start_step(self, batch: "Batch") -> None:
        runs = [batch.states[s].run for s in batch.sched.running]
        for r in runs:
            r.batch_k, r.last_step = None, None
        self.runs, self.policy = [], None
        self.multi = self.multi or len(runs) >= 2
        for r in runs:
            r.batched = self.multi
        ctl = [r for r in runs if r._prefill is None and r._policy is not None and r.adaptive
               and not r.done and r._resume is None]
        if not ctl or not self.multi:
            return  # one sequence: it decides alone, as without a batch
        dm = ctl[0].draft_max
        ctl = [r for r in ctl if r.draft_max == dm]  # others (another draft_max) decide alone
        policy = batch.engine.draft_policy(dm, True, len(runs))
        if policy.off_for > 0:  # drafting lost at this batch size: plain until it measures again
            for r in ctl:
                r.stop_drafting()
            return
        # a step with a prefill in it costs what the prefill costs: it is not sampled (end_step),
        # and it does not use up the policy's warm-up and probes either. Nor is a step with no
        # room to draft (a sequence's last token): the policy was not asked, and such steps come
        # where sequences finish, with the finishing work in them; sampled as plain steps they
        # priced plain decoding dear. Nor one where the policy decides for only some of the
        # sequences (others run without MTP, e.g. started while it was off after a give-up): its
        # draft steps cost what one sequence's drafts cost beside three plain ones (demo model, 4
        # sequences: one draft priced at 1.3x a plain step after a re-measure, measured at 1.9x)
        limit = min(r.draft_limit() for r in ctl)
        self._pure = all(r._prefill is None for r in runs) and limit > 0 and len(ctl) == len(runs)
        self.k = policy.choose(limit) if self._pure else policy.peek(limit)
        for r in ctl:
            r.batch_k = self.k
        self.runs, self.policy, self._n = ctl, policy, len(runs)
        self._t0, self._cpu0, self._e0 = perf_counter(), batch.cpu_s, batch.experts

    def end_step(self, batch: "Batch") -> None:
        policy, runs = self.policy, self.runs
        self.runs, self.policy = [], None
        if policy is None:
            return
        from .draft_policy import StepSample

        # per sequence in the step: a step's cost grows with the sequences in it, and the policy
        # compares lengths by tokens per sequence
        n = self._n
        wall, cpu = perf_counter() - self._t0, batch.cpu_s - self._cpu0
        sample = StepSample(self.k, (wall - cpu) / n, cpu / n, (batch.experts - self._e0) / n)
        done = [r for r in runs if r.last_step is not None]
        if not self._pure or not done:
            for r in done:  # acceptance still counts; the cost is not a decode step's
                policy.count_accepted(*r.last_step[1:])
            return
        first, rest = done[0], done[1:]
        policy.observe(self.k, first.last_step[1], first.last_step[2], sample)
        for r in rest:
            policy.count_accepted(*r.last_step[1:])
        if self.k == 0 and policy.mtp_loses():
            policy.give_up()
            for r in runs:
                r.stop_drafting()


def _rows(op) -> int:
    return op[2].shape[0] if op[0] == "mtp" else op[1].shape[0]


def _activate(bus, ctx) -> None:
    bus._tls.ctx = ctx
