"""What a speculative step costs against a plain one: medians over many calls, interleaved.

    python benchmarks/step_costs.py [CHECKOUT] [PLAN_OR_MODEL] [--reps 200]

From one cache state (a short prompt prefilled), each repetition times in turn: the main model's
forward + head at T = 1, 2, 3 rows (a plain step, and the verification of 1 and 2 drafts, with the
argmax read back as a step reads it) and one draft (the MTP layer over 1 or 2 owed rows, its head
and the argmax). The cache is rolled back after each call, so every call sees the same context.
Prints each median and its ratio to the plain step. With those ratios, k drafts at acceptance a
pay when verify(k) + k * draft < 1 + a + a^2 + ... (tokens per step); whole-run figures (`nextn
bench model`) swing by 10-30% between runs on a shared machine, these medians far less.
CHECKOUT (default: this one) is put first on sys.path, for A/B runs of two checkouts.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkout", nargs="?", default=os.path.join(os.path.dirname(__file__), ".."))
    p.add_argument("target", nargs="?", default=None, help="PLAN.yaml or MODEL.gguf (default: the demo)")
    p.add_argument("--reps", type=int, default=200)
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.abspath(a.checkout))
    import torch

    import runtime
    from runtime.sampling import SamplingParams

    eng = runtime.load(a.target, progress=False)
    if not eng.has_mtp:
        raise SystemExit(f"{eng.file.path.name}: no MTP layer")
    m = eng.model
    ids = eng.tokenize("def fibonacci(n):\n    if n < 2:\n        return n")
    seq = eng.new_sequence(SamplingParams(0.0), True)
    times: dict[str, list[float]] = {"plain (T=1)": [], "verify 1 draft (T=2)": [], "verify 2 drafts (T=3)": [],
                                     "draft, 1 owed row": [], "draft, 2 owed rows": []}
    names = list(times)
    with torch.inference_mode():
        seq.prefill(ids)
        start, mstart = seq.cache.length, seq.mtp_cache.length
        h = torch.randn(2, eng.cfg.hidden)
        for _ in range(a.reps):
            for T in (1, 2, 3):
                t0 = time.perf_counter()
                int(m.logits(m.forward(torch.tensor(ids[:T]), seq.cache, start))[-1].argmax())
                times[names[T - 1]].append(time.perf_counter() - t0)
                seq.cache.truncate(start)
            for r in (1, 2):
                t0 = time.perf_counter()
                z = m.mtp_forward(h[:r], torch.tensor(ids[:r]), seq.mtp_cache, mstart)
                int(m.mtp_logits(z[-1:])[0].argmax())
                times[names[2 + r]].append(time.perf_counter() - t0)
                seq.mtp_cache.truncate(mstart)
    base = statistics.median(times[names[0]])
    print(f"model: {eng.file.path.name}  gpu side: {eng.device}  {a.reps} repetitions, context {start}")
    for name, v in times.items():
        med = statistics.median(v)
        print(f"{name:<24} median {med * 1e3:8.3f} ms  min {min(v) * 1e3:8.3f}  x plain {med / base:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
