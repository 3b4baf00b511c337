"""Slots: N generations decoding concurrently on one engine, driven by one worker thread.

The worker owns the model. Each cycle it admits queued requests to free slots, then runs one
round of the slots' batch (runtime/batch.py): every busy slot's step (a prefill chunk, a plain
step or an MTP speculative step) advances, and the steps' model calls of one kind run as one
batched call for all slots, so a long prompt is prefilled chunk by chunk between the other slots'
decode steps. Each slot's generation has its own `Sequence` (KV and MTP caches in the engine's
one pool), sampler and draft state; greedy output is what the engine gives for the same prompt
alone.

Prompt caching: a slot keeps its last sequence, whose KV covers its last prompt and reply. A new
request goes to the free slot sharing the longest prefix with its prompt and prefills only the
rest (`Sequence.keep_prefix`). HTTP handlers talk to the worker through `submit` (a bounded
queue) and `cancel`; the worker reports through each job's `sink`.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..decode import Sequence
from ..engine import Engine, _Run


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


@dataclass
class Job:
    """One request: a validated run (not begun) and where its events go. `sink` is called on the
    worker thread with ("text", str), then ("done", stats) or ("error", message)."""

    run: _Run
    sink: Callable[[tuple], None]
    cache_prompt: bool = True
    cancelled: bool = False
    slot: int | None = None
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class Slot:
    id: int
    seq: Sequence | None = None  # the last finished sequence: its KV is this slot's prompt cache
    job: Job | None = None
    last_used: float = 0.0

    def cached(self) -> list[int]:
        if self.seq is None:
            return []
        return self.seq.tokens[:self.seq.cache.length]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Counters:
    """Totals since start, for /metrics."""

    requests: int = 0
    errors: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    decode_s: float = 0.0
    drafted: int = 0
    accepted: int = 0
    rejected_full: int = 0  # 503s: the queue was full


class Scheduler:
    def __init__(self, engine: Engine, n_slots: int, queue_max: int):
        self.engine = engine
        self.slots = [Slot(i) for i in range(n_slots)]
        self.queue: deque[Job] = deque()
        self.queue_max = queue_max
        self.counters = Counters()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="nextn-slots", daemon=True)
        # the slots' runs step together: one batched forward per round for all of them
        from ..batch import Batch

        self.batch = Batch(engine, max_batch=n_slots)
        self.batch.on_error = self._run_failed
        self._slot_of: dict[int, Slot] = {}  # id(run) -> its slot

    # ---- the handlers' side --------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            free = sum(1 for s in self.slots if s.job is None)
            if len(self.queue) >= self.queue_max + free:
                self.counters.rejected_full += 1
                raise QueueFull(f"all {len(self.slots)} slots are busy and {len(self.queue)} requests are waiting")
            self.queue.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: the worker ends the job before its next step."""
        with self._cv:
            job.cancelled = True
            if job in self.queue:
                self.queue.remove(job)
                self.counters.cancelled += 1
            self._cv.notify()

    def shutdown(self, wait: float = 5.0) -> None:
        """End every job (in-flight streams get their last chunk), then stop the worker."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(wait)

    @property
    def busy(self) -> int:
        return sum(1 for s in self.slots if s.job is not None)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def _free_slot_exists(self) -> bool:
        return any(s.job is None for s in self.slots)

    # ---- the worker ------------------------------------------------------------------------------

    def _pick_slot(self, job: Job) -> Slot:
        """The free slot with the longest cached prefix of this prompt; ties (and no caching):
        the one used least recently, so other slots' caches live longer."""
        free = [s for s in self.slots if s.job is None]
        ids = job.run.prompt_ids
        if job.cache_prompt:
            return max(free, key=lambda s: (common_prefix(s.cached(), ids), -s.last_used))
        return min(free, key=lambda s: s.last_used)

    def _admit(self) -> None:
        while self.queue and self._free_slot_exists():
            job = self.queue.popleft()
            slot = self._pick_slot(job)
            run = job.run
            if slot.seq is not None and not job.cache_prompt:
                slot.seq.cache.length = 0  # reuse the memory, not the prefix
            run.reuse = slot.seq  # taken over by the run's sequence: one owner of the caches
            run.keep_seq = True  # and kept by the slot when the run ends: its prompt cache
            slot.seq, slot.job, job.slot = None, job, slot.id
            try:
                run.batch_size = self.busy
                run.begin()
            except Exception as e:  # noqa: BLE001 - reported to the client, the server goes on
                self._fail(slot, e)
                continue
            self._slot_of[id(run)] = slot
            self.batch.add(run, begun=True)

    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._stopping:
                    break
                self._admit()
                active = [s for s in self.slots if s.job is not None]
                if not active:
                    self._cv.wait(0.5)
                    continue
            for slot in active:
                if slot.job is not None and slot.job.cancelled:
                    self._finish(slot, cancelled=True)
            try:
                events = self.batch.round()
            except Exception as e:  # noqa: BLE001 - a failure outside any one run's step
                for slot in active:
                    if slot.job is not None:
                        self.batch.cancel(slot.job.run)
                        self._fail(slot, e)
                continue
            for run, piece in events:
                slot = self._slot_of.get(id(run))
                if slot is None or slot.job is None:
                    continue
                if piece:
                    slot.job.sink(("text", piece))
                if run.done:
                    self._finish(slot)
        # shutting down: every job ends as it stands
        with self._cv:
            queued, self.queue = list(self.queue), deque()
        for job in queued:
            job.sink(("done", {"finish_reason": "cancelled", "generated_tokens": 0}))
        for slot in self.slots:
            if slot.job is not None:
                self._finish(slot, cancelled=True)

    def _run_failed(self, run, e: Exception) -> None:
        slot = self._slot_of.get(id(run))
        if slot is not None and slot.job is not None:
            self._fail(slot, e)

    def _finish(self, slot: Slot, cancelled: bool = False) -> None:
        job, run = slot.job, slot.job.run
        self._slot_of.pop(id(run), None)
        if cancelled:
            self.batch.cancel(run)
            run.cancel()
        else:
            run.close()
        st = run.result.stats
        c = self.counters
        c.requests += 1
        c.cancelled += int(cancelled)
        c.prompt_tokens += st.get("prompt_tokens", 0)
        c.cached_tokens += st.get("cached_tokens", 0)
        c.generated_tokens += st.get("generated_tokens", 0)
        c.decode_s += st.get("decode_s", 0.0)
        c.drafted += st.get("drafted", 0)
        c.accepted += st.get("accepted", 0)
        slot.seq = run.seq
        slot.job = None
        slot.last_used = time.perf_counter()
        job.sink(("done", st))

    def _fail(self, slot: Slot, e: Exception) -> None:
        """A step raised: the client gets the message, the slot forgets its caches (their state is
        unknown), the server goes on."""
        job = slot.job
        self._slot_of.pop(id(job.run), None)
        from ..errors import NextnError

        if not isinstance(e, NextnError):
            traceback.print_exc(file=sys.stderr)
        try:
            job.run.close()
        except Exception:  # noqa: BLE001
            pass
        self.counters.errors += 1
        if job.run.seq is not None:
            job.run.seq.release()
        slot.seq, slot.job = None, None
        job.sink(("error", f"{type(e).__name__}: {e}" if not isinstance(e, NextnError) else str(e)))
