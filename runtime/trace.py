"""Timeline of one generation: spans on a "gpu" track (GPU-side work, copies, drafting) and a "cpu"
track (routed experts in the C kernels), busy/overlap/idle figures, and Chrome/Perfetto JSON.
A third track, "phase", brackets prefill and drafting for the viewer; it is not busy time.

Spans are wall-clock intervals taken on the host. On a machine without CUDA the "gpu" side runs on
the CPU synchronously, so its spans are exact; with CUDA the GPU-side spans end when the host has
waited for the stream (every CPU-side expert call does), which makes them upper bounds.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import NextnError


class Timeline:
    def __init__(self, keep_spans: bool = False):
        self.keep = keep_spans
        self.spans: list[tuple[str, str, float, float, dict | None]] = []  # (track, name, t0, t1, args)
        self.busy = {"gpu": [], "cpu": []}  # merged intervals are computed at the end
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()

    @contextmanager
    def span(self, track: str, name: str, **args):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(track, name, t0, time.perf_counter(), args or None)

    def add(self, track: str, name: str, t0: float, t1: float, args: dict | None = None):
        with self._lock:
            self.busy.setdefault(track, []).append((t0, t1))
            if self.keep:
                self.spans.append((track, name, t0, t1, args))

    def figures(self, wall_t0: float, wall_t1: float) -> dict:
        """cpu_busy_s, gpu_busy_s (unions of each track's spans), overlap_s (both busy) and
        idle_wait_s (neither busy: Python bookkeeping, sampling, waiting)."""
        g = _union(self.busy.get("gpu", []), wall_t0, wall_t1)
        c = _union(self.busy.get("cpu", []), wall_t0, wall_t1)
        gb, cb = _length(g), _length(c)
        ov = _length(_intersect(g, c))
        wall = wall_t1 - wall_t0
        return {"gpu_busy_s": gb, "cpu_busy_s": cb, "overlap_s": ov,
                "idle_wait_s": max(0.0, wall - (gb + cb - ov)), "wall_s": wall}

    def write_chrome_trace(self, path) -> None:
        """Chrome trace event format (opens in chrome://tracing and ui.perfetto.dev)."""
        tids = {"gpu": 1, "cpu": 2, "phase": 3}  # "phase": prefill / draft brackets, not busy time
        events = [{"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": f"{track} side"}}
                  for track, tid in tids.items()]
        events.append({"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "nextn"}})
        for track, name, t0, t1, args in self.spans:
            ev = {"ph": "X", "pid": 1, "tid": tids.setdefault(track, len(tids) + 1), "name": name,
                  "cat": track, "ts": (t0 - self.t0) * 1e6, "dur": max(0.0, (t1 - t0) * 1e6)}
            if args:
                ev["args"] = args
            events.append(ev)
        write_atomic(path, json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}), "trace")


def check_writable(path, what: str) -> None:
    """A one-line NextnError unless a file can be written at `path` (its folder exists, is one,
    and is writable; `path` is not a folder)."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise NextnError(f"{what} {p}: is a directory")
    if not parent.is_dir():
        raise NextnError(f"{what} {p}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise NextnError(f"{what} {p}: folder {parent} is not writable")


def write_atomic(path, text: str, what: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: an interrupted
    or failed write leaves the old file (or none), never half of one."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    except OSError as e:
        raise NextnError(f"{p}: cannot write the {what}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _union(iv, lo, hi):
    out = []
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in iv):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _intersect(x, y):
    i = j = 0
    out = []
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append([a, b])
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def _length(iv):
    return sum(b - a for a, b in iv)


class NullTimeline(Timeline):
    """Records nothing (the model's timeline outside a generation)."""

    def add(self, track, name, t0, t1, args=None):
        pass


NULL_TIMELINE = NullTimeline()
