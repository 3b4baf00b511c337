"""Decode speed and memory of one checkout, for A/B runs of two checkouts taken in turn.

    python benchmarks/decode_ab.py CHECKOUT MODEL_OR_PLAN [--tokens 16] [--repeats 3]

Loads the model with CHECKOUT's runtime (put first on sys.path; its cpu_kernels must be built),
prints the load time, the resident memory after load, and the median ms per generated token
(whole `generate` call, prompt included) of plain greedy decoding and of MTP with one fixed draft
(draft-ahead off). Run it alternately on two checkouts
(`git worktree add /tmp/old REV`) to compare them on a noisy machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("checkout")
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.abspath(a.checkout))
    import runtime

    t0 = time.perf_counter()
    eng = runtime.load(a.model, progress=False)
    load_s = time.perf_counter() - t0
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    ids = eng.tokenize("def main():")
    eng.generate(ids, max_tokens=4, mtp=False)  # warm-up
    ms = []
    for mtp in (False, True):
        per = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            r = eng.generate(ids, max_tokens=a.tokens, mtp=mtp, draft_max=1, adaptive=False, draft_ahead=False)
            per.append((time.perf_counter() - t) / len(r.tokens))
        ms.append(statistics.median(per) * 1e3)
    print(f"{a.checkout}: load {load_s:.1f}s rss {rss / 2**30:.2f} GiB plain {ms[0]:.1f} ms/token, k=1 {ms[1]:.1f} ms/token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
