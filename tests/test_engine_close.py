"""Engine.close() and `with runtime.load(...) as eng:` free what the engine holds.

Load/close cycles of the demo model in this process: the GGUF's memory maps are gone after each
close, and open files and threads come back to where they were after the first cycle (the first
one starts the process-wide OpenMP and torch pools, which stay). benchmarks/soak.py runs 200 cycles
and reports RSS; here only counts are asserted (no timing, no RSS threshold on a shared machine).
"""
from __future__ import annotations

import os
import threading

import pytest

import runtime
from runtime.api import DEMO_MODEL
from runtime.errors import NextnError


def _maps() -> int:
    """Mappings of the demo model's file in this process."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if line.rstrip().endswith(DEMO_MODEL.name))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> tuple[int, list[str]]:
    return len(os.listdir("/proc/self/task")), sorted(t.name for t in threading.enumerate())


pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")


def _cycle(i: int) -> None:
    # every other cycle with the CPU-expert worker thread (overlap) and a short generation, so the
    # pool is started and must be shut down by close()
    with runtime.load(progress=False, overlap=bool(i % 2)) as eng:
        assert _maps() >= 1
        if i % 2:
            assert len(eng.generate("def f(x):", max_tokens=4).tokens) == 4
            assert eng.model._executor is not None  # the worker ran: close() must stop it
    assert eng.closed
    assert _maps() == 0


def test_load_close_cycles_return_to_baseline():
    _cycle(1)  # warm-up: process-wide pools start here
    fds0, threads0 = _fds(), _threads()
    for i in range(20):
        _cycle(i)
    assert _fds() == fds0
    assert _threads() == threads0
    assert not any(t.name.startswith("nextn-cpu-experts") for t in threading.enumerate())


def test_a_closed_engine_refuses_every_use():
    eng = runtime.load(progress=False)
    assert not eng.closed
    eng.close()
    eng.close()  # idempotent
    assert eng.closed and _maps() == 0
    for use in (lambda: eng.generate("x", max_tokens=2), lambda: list(eng.stream("x", max_tokens=2)),
                lambda: eng.tokenize("x"), lambda: eng.logits([1, 2]), lambda: eng.has_mtp,
                lambda: eng.model, lambda: eng.__enter__()):
        with pytest.raises(NextnError, match=r"demo\.gguf: the engine is closed"):
            use()
    # an attribute that never existed is still an AttributeError, open or closed
    with runtime.load(progress=False) as other, pytest.raises(AttributeError):
        other.no_such_attribute


def test_close_after_an_error_inside_with_propagates_the_error():
    with pytest.raises(NextnError, match="out of range"):
        with runtime.load(progress=False) as eng:
            eng.logits([10 ** 9])
    assert eng.closed and _maps() == 0
