"""The small-call thread threshold (`nx_min_work_per_thread`, cpu_kernels/dispatch.c) A/B'd in one
process, settings interleaved: the figures of BENCHMARKS.md's "Small calls on every thread".

    python benchmarks/min_work_ab.py [MODEL|PLAN] [--settings 1048576,32768,16384] [--reps 400]
                                     [--rounds 10] [--max-tokens 64] [--mtp]

1. Replay: one fused block call (all blocks, `BlockStack.forward_rows`) of a decode step of 1/2/4/8
   sequences is captured from real batches of the batch bench's prompts, then replayed `--reps` times, every
   setting in turn call by call; median ms per call.
2. End to end: `Engine.generate_batch` of 1, 4 and 8 of those prompts (greedy, `--max-tokens`),
   `--rounds` rounds after a warm-up, every setting in turn; median generated tokens/s, prefill
   included, and the ratio to 1 sequence at the same setting.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = (1, 2, 4, 8)
SEQUENCES = (1, 4, 8)


def _capture(eng, prompts, kw) -> dict:
    """The first main-model decode call of each row count in ROWS (one row per sequence: rows of
    one sequence share their slot map, so a prompt chunk is skipped), with copies of its inputs."""
    from cpu_kernels.blocks import BlockStack

    saved, orig = {}, BlockStack.forward_rows

    def hook(self, x, kv, pos, lslot, maps, threads=None):
        T = int(x.shape[0])
        if self.n_blocks > 1 and T in ROWS and T not in saved and len({id(m) for m in maps}) == T:
            xx = x if isinstance(x, np.ndarray) else x.numpy()
            saved[T] = (self, xx.copy(), kv, np.array(pos), np.array(lslot), [m.copy() for m in maps])
        return orig(self, x, kv, pos, lslot, maps, threads)

    BlockStack.forward_rows = hook
    try:
        for n in ROWS:
            eng.generate_batch(prompts[:n], **kw)
    finally:
        BlockStack.forward_rows = orig
    return saved


def main(argv=None) -> int:
    import cpu_kernels
    from runtime.api import load
    from runtime.bench_batch import PROMPTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?")
    p.add_argument("--settings", default="1048576,32768,16384", help="bytes of work per thread, comma-separated")
    p.add_argument("--reps", type=int, default=400)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--mtp", action="store_true", help="end to end with adaptive MTP (default: plain)")
    a = p.parse_args(argv)
    settings = [int(s) for s in a.settings.split(",")]
    eng = load(a.target, progress=False)
    kw = dict(max_tokens=a.max_tokens, temperature=0.0, repeat_penalty=1.0, mtp=a.mtp)
    old = cpu_kernels._set_min_work_per_thread(settings[0])
    try:
        saved = _capture(eng, PROMPTS, dict(kw, max_tokens=16, mtp=False))
        rows = [T for T in ROWS if T in saved]
        ms: dict = {}
        for _ in range(a.reps):
            for mw in settings:
                cpu_kernels._set_min_work_per_thread(mw)
                for T in rows:
                    stack, x0, kv, pos, lslot, maps = saved[T]
                    x = x0.copy()
                    t = time.perf_counter()
                    stack.forward_rows(x, kv, pos, lslot, maps)
                    ms.setdefault((mw, T), []).append((time.perf_counter() - t) * 1e3)
        print("fused block call, ms (median of %d):" % a.reps)
        print(f"{'min work':>10} " + " ".join(f"{f'{T} rows':>8}" for T in rows))
        for mw in settings:
            print(f"{mw:>10} " + " ".join(f"{statistics.median(ms[(mw, T)]):>8.3f}" for T in rows))

        tps: dict = {}
        for r in range(a.rounds + 1):
            for mw in settings:
                cpu_kernels._set_min_work_per_thread(mw)
                for n in SEQUENCES:
                    t = time.perf_counter()
                    out = eng.generate_batch(PROMPTS[:n], **kw)
                    dt = time.perf_counter() - t
                    if r:  # round 0 warms up
                        tps.setdefault((mw, n), []).append(sum(len(o.tokens) for o in out) / dt)
        print(f"generate_batch, tokens/s (median of {a.rounds}, {'adaptive MTP' if a.mtp else 'plain'}):")
        print(f"{'min work':>10} " + " ".join(f"{f'{n} seq':>16}" for n in SEQUENCES))
        for mw in settings:
            one = statistics.median(tps[(mw, 1)])
            cells = (f"{statistics.median(tps[(mw, n)]):.0f} ({statistics.median(tps[(mw, n)]) / one:.2f}x)"
                     for n in SEQUENCES)
            print(f"{mw:>10} " + " ".join(f"{c:>16}" for c in cells))
    finally:
        cpu_kernels._set_min_work_per_thread(old)
    return 0


if __name__ == "__main__":
    sys.exit(main())
