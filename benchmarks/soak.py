"""Soak: long greedy decoding with adaptive MTP, and load/close cycles, in one process.

    python benchmarks/soak.py                                  # demo model, 10,000 tokens, 200 cycles
    python benchmarks/soak.py --model demo --model AIR.gguf    # AIR.gguf: python -m runtime.synthetic
    python benchmarks/soak.py --tokens 2000 --cycles 20 --json soak.json

Cycles: `with runtime.load(demo) as eng:` N times (a short generation every 10th), RSS after each
close; the GGUF's mappings, open files and threads counted after the first cycle (it starts the
process-wide OpenMP and torch pools) and at the end.

Soak, per model: one engine; generations of --chunk tokens (the demo's context is 1,024) from a
rotating set of prompts, each decoded twice, with the plan's adaptive MTP and plain (mtp=False):
the token ids must be equal (greedy, temperature 0, the plan's repetition penalty). RSS is read
after every --chunk MTP tokens; the check is its growth after the first 1,000 tokens (under 1%).
Threads and open files are counted after a warm-up engine was loaded and closed, and again after
the soak engine is closed.

Only the public API (runtime.load, Engine.generate, Engine.close). Exit status 1 when a check
fails. Prints a summary per part; --json writes every sample.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import runtime  # noqa: E402
from runtime.api import DEMO_MODEL  # noqa: E402

PROMPTS = [
    "def fibonacci(n):",
    "import os\ndef main():",
    "class Stack:",
    "def quicksort(items):",
    "# read a CSV file and print the sum of the second column\n",
    "def is_prime(n):",
    "class LinkedList:\n    def __init__(self):",
    "def binary_search(arr, target):",
]
GROWTH_LIMIT = 0.01  # RSS growth allowed after the first 1,000 tokens


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def counts(model_name: str | None = None) -> dict:
    c = {"threads": len(os.listdir("/proc/self/task")), "fds": len(os.listdir("/proc/self/fd"))}
    if model_name:
        with open("/proc/self/maps") as f:
            c["maps"] = sum(1 for line in f if line.rstrip().endswith(model_name))
    return c


def load(model: str, context: int | None):
    kw = dict(progress=False)
    if context:
        kw["context"] = context
    if model == "demo":
        return runtime.load(**kw)  # the bundled plan: greedy, repetition penalty, adaptive MTP
    return runtime.load(model, temperature=0.0, **kw)


def cycles(n: int) -> dict:
    name = DEMO_MODEL.name
    rss, t0 = [], time.perf_counter()
    first = None
    for i in range(n):
        with runtime.load(progress=False) as eng:
            if i % 10 == 0:
                eng.generate(PROMPTS[0], max_tokens=16)
        rss.append(rss_mib())
        if i == 0:
            first = counts(name)
    last = counts(name)
    ref = rss[min(9, n - 1)]
    out = {"cycles": n, "seconds": time.perf_counter() - t0, "rss_mib": rss, "after_first": first,
           "after_last": last, "rss_growth_after_10": (rss[-1] - ref) / ref,
           "ok": last == first and last["maps"] == 0 and (rss[-1] - ref) / ref < GROWTH_LIMIT}
    print(f"load/close x{n}: {out['seconds']:.0f} s, RSS after cycle 1 {rss[0]:.1f} MiB, 10 {ref:.1f}, "
          f"{n} {rss[-1]:.1f} (growth after 10: {100 * out['rss_growth_after_10']:+.2f}%, max {max(rss):.1f}); "
          f"after cycle 1 {first}, after {n} {last}: {'ok' if out['ok'] else 'FAIL'}", flush=True)
    return out


def soak(model: str, tokens: int, chunk: int, context: int | None) -> dict:
    name = DEMO_MODEL.name if model == "demo" else Path(model).name
    with load(model, context) as eng:  # warm-up: pools and lazily made state
        eng.generate(PROMPTS[0], max_tokens=8)
    before = counts(name)
    t_load = time.perf_counter()
    eng = load(model, context)
    t_load = time.perf_counter() - t_load
    samples, mismatches, done, gens = [], [], 0, 0
    t_mtp = t_plain = 0.0
    accepted = drafted = 0
    next_sample = chunk
    while done < tokens:
        p = PROMPTS[gens % len(PROMPTS)] + ("" if gens < len(PROMPTS) else f"\n# variant {gens}\n")
        t = time.perf_counter()
        a = eng.generate(p, max_tokens=min(chunk, tokens - done))
        t_mtp += time.perf_counter() - t
        t = time.perf_counter()
        b = eng.generate(p, max_tokens=min(chunk, tokens - done), mtp=False)
        t_plain += time.perf_counter() - t
        if a.tokens != b.tokens:
            k = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), min(len(a.tokens), len(b.tokens)))
            mismatches.append({"generation": gens, "prompt": p, "first_difference": k})
        st = a.stats
        accepted += int(st.get("accepted", 0) or 0)
        drafted += int(st.get("drafted", 0) or 0)
        done += len(a.tokens)
        gens += 1
        if done >= next_sample or done >= tokens:
            samples.append((done, rss_mib()))
            next_sample += chunk
        if not a.tokens:  # EOS straight away: the next prompt
            continue
    eng.close()
    after = counts(name)
    base = next((r for n, r in samples if n >= 1000), samples[-1][1])
    later = [r for n, r in samples if n >= 1000]
    growth = (max(later) - base) / base if later else 0.0
    out = {"model": name, "tokens": done, "generations": gens, "load_s": t_load,
           "mtp_tok_s": done / t_mtp, "plain_tok_s": done / t_plain, "rss_samples": samples,
           "rss_growth_after_1000": growth, "mismatches": mismatches, "before": before, "after": after,
           "draft_tokens": drafted, "draft_accepted": accepted}
    out["ok"] = not mismatches and growth < GROWTH_LIMIT and after == before
    rs = [r for _, r in samples]
    acc = f"{accepted}/{drafted} drafts accepted" if drafted else "no drafts (adaptive kept drafting off)"
    print(f"soak {name}: {done} tokens in {gens} generations, {acc}; MTP {out['mtp_tok_s']:.1f} tok/s, plain "
          f"{out['plain_tok_s']:.1f} tok/s; greedy MTP == plain: {gens - len(mismatches)}/{gens}; RSS at 1000 "
          f"{base:.1f} MiB, min {min(rs):.1f}, max {max(rs):.1f}, last {rs[-1]:.1f}, growth after 1000 "
          f"{100 * growth:+.2f}%; threads/fds before {before}, after close {after}: "
          f"{'ok' if out['ok'] else 'FAIL'}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="'demo' (default) or a GGUF path; repeatable")
    ap.add_argument("--tokens", type=int, default=10_000, help="MTP tokens per model")
    ap.add_argument("--chunk", type=int, default=500, help="tokens per generation (and per RSS sample)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--cycles", type=int, default=200, help="load/close cycles of the demo model (0: none)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    res = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if a.cycles:
        res["cycles"] = cycles(a.cycles)
    res["soak"] = [soak(m, a.tokens, a.chunk, a.context) for m in (a.model or ["demo"])]
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    ok = res.get("cycles", {"ok": True})["ok"] and all(s["ok"] for s in res["soak"])
    print("soak:", "ok" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
