"""Two checkouts' fused block call A/B'd on the same decode steps, in alternated processes.

    python benchmarks/replay_ab.py BASE_CHECKOUT [NEW_CHECKOUT] [--rows 1,4] [--reps 3000] [--runs 3]
                                   [--threads N]

Each run starts one process per checkout in turn (A, B, A, B, ...; each has its kernels built).
A process captures the first main-model decode call of each row count from real batches of the
batch bench's prompts on the demo model (benchmarks/min_work_ab.py's capture: one row per
sequence), replays it --reps times and prints the median ms per call. A C change cannot be
switched inside one process, and this machine's speed moves 1.5-2x over minutes, so the runs
alternate and the table shows every run's figure and the per-run ratio NEW / BASE.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import statistics, sys, time
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/benchmarks")
threads = int(sys.argv[4]) or None
from min_work_ab import _capture
from runtime.api import load
from runtime.bench_batch import PROMPTS
rows, reps = [int(r) for r in sys.argv[2].split(",")], int(sys.argv[3])
eng = load(None, progress=False)
saved = _capture(eng, PROMPTS, dict(max_tokens=16, temperature=0.0, repeat_penalty=1.0, mtp=False))
for T in rows:
    stack, x0, kv, pos, lslot, maps = saved[T]
    ms = []
    for _ in range(reps):
        x = x0.copy(); t = time.perf_counter(); stack.forward_rows(x, kv, pos, lslot, maps, threads); ms.append(time.perf_counter() - t)
    print(T, statistics.median(ms) * 1e3)
"""


def _run(checkout: str, rows: str, reps: int, threads: int) -> dict[int, float]:
    env = dict(os.environ, PYTHONPATH=checkout)
    out = subprocess.run([sys.executable, "-c", CHILD, checkout, rows, str(reps), str(threads)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return {int(a): float(b) for a, b in (line.split() for line in out.splitlines() if line.strip())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base")
    p.add_argument("new", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--rows", default="1,4")
    p.add_argument("--reps", type=int, default=3000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="threads per fused call (default: the engine's)")
    a = p.parse_args(argv)
    rows = [int(r) for r in a.rows.split(",")]
    print(f"fused block call, median ms of {a.reps} replays; base {a.base}, new {a.new}")
    print("run " + " ".join(f"{f'{T} rows base':>12} {'new':>7} {'new/base':>8}" for T in rows))
    ratios: dict[int, list[float]] = {T: [] for T in rows}
    for i in range(a.runs):
        b, n = _run(a.base, a.rows, a.reps, a.threads), _run(a.new, a.rows, a.reps, a.threads)
        for T in rows:
            ratios[T].append(n[T] / b[T])
        print(f"{i:>3} " + " ".join(f"{b[T]:>12.3f} {n[T]:>7.3f} {n[T] / b[T]:>8.2f}" for T in rows))
    print("median new/base: " + ", ".join(f"{T} rows {statistics.median(ratios[T]):.2f}" for T in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
