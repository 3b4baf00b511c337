"""`nextn bench`: benchmarks that report ratios against a baseline measured in the same run.

    nextn bench model [PLAN.yaml|MODEL.gguf] [--max-tokens N] [--repeats R] [--draft 1,2,3]
        plain greedy decoding vs MTP at fixed draft lengths, same prompts, same process
    nextn bench kernels [...]
        the CPU expert kernel benchmark (benchmarks/bench_kernels.py; see BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import runpy
import statistics
import sys
from pathlib import Path

from .errors import NextnError

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\ndef main(argv):",
    "class Stack:\n    def __init__(self):",
    "    for key, value in sorted(items.items()):",
]


def bench_model(argv: list[str]) -> int:
    from .api import load

    p = argparse.ArgumentParser(prog="nextn bench model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", metavar="PLAN.yaml|MODEL.gguf")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs per setting; medians are reported")
    p.add_argument("--draft", default="1,2,3", help="comma-separated fixed draft lengths")
    p.add_argument("--gpu", default=None)
    a = p.parse_args(argv)
    try:
        drafts = [int(x) for x in a.draft.split(",") if x.strip()]
    except ValueError:
        raise NextnError(f"--draft {a.draft!r}: expected comma-separated integers") from None
    kw = {"gpu": a.gpu} if a.gpu else {}
    eng = load(a.target, progress=False, **kw)
    settings = [("plain", dict(mtp=False))]
    if eng.has_mtp:
        settings += [(f"mtp k={k}", dict(mtp=True, draft_max=k)) for k in drafts]
    eng.generate(PROMPTS[0], max_tokens=8, mtp=False)  # warm-up
    rows = []
    for name, s in settings:
        speeds, acc, tps = [], [], []
        for _ in range(a.repeats):
            toks, secs = 0, 0.0
            for pr in PROMPTS:
                r = eng.generate(pr, max_tokens=a.max_tokens, **s)
                toks += r.stats["generated_tokens"] - 1
                secs += r.stats["decode_s"]
                acc.append(r.stats["acceptance_rate"])
                tps.append(r.stats["mean_tokens_per_step"])
            speeds.append(toks / max(secs, 1e-9))
        rows.append((name, statistics.median(speeds), statistics.mean(acc), statistics.mean(tps)))
    base = rows[0][1]
    print(f"model: {eng.file.path.name}  gpu side: {eng.device}  prompts: {len(PROMPTS)} x {a.max_tokens} tokens, "
          f"median of {a.repeats}")
    print(f"{'setting':<10} {'decode tok/s':>13} {'vs plain':>9} {'accept':>7} {'tok/step':>9}")
    for name, sp, ac, tp in rows:
        print(f"{name:<10} {sp:>13.1f} {sp / base:>8.2f}x {ac:>7.1%} {tp:>9.2f}")
    return 0


def bench_kernels(argv: list[str]) -> int:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    if not script.exists():
        raise NextnError("the kernel benchmark ships with the source tree (benchmarks/bench_kernels.py)")
    sys.argv = [str(script)] + list(argv)
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(what: str, argv: list[str]) -> int:
    return {"model": bench_model, "kernels": bench_kernels}[what](argv)
