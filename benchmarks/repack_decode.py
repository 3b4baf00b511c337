"""Decode speed with the CPU experts repacked at load against the GGUF's own layout, paired.

    python benchmarks/repack_decode.py /tmp/bench/air-cpu-mtp-experts.yaml --pairs 12

Loads the plan twice (repack: true and repack: false), then alternates plain greedy generations
of the same prompts on the two engines, checks the tokens are equal, and compares the summed
decode times (prefill excluded). Pairing and alternating keeps machine drift out of the ratio.
"""
from __future__ import annotations

import argparse
import statistics

from runtime.api import load
from runtime.bench import PROMPTS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?", default=None, help="PLAN.yaml or MODEL.gguf (default: the demo model)")
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=2)
    a = ap.parse_args(argv)
    engines = {"repacked": load(a.target, progress=False, repack=True, mtp=False),
               "ggml": load(a.target, progress=False, repack=False, mtp=False)}
    rep = engines["repacked"].load_report
    print(f"# repacked at load: {rep.repacked_bytes / 2**30:.2f} GiB of CPU expert weights")
    if not rep.repacked_bytes:
        print("# nothing to repack in this model (no Q4_0/Q5_0/Q8_0/IQ4_NL/Q4_K CPU weights, or the ref kernel path)")
    prompts = [engines["ggml"].tokenize(t) for t in PROMPTS[:a.prompts]]
    for e in engines.values():
        e.generate(prompts[0], max_tokens=4)  # warm-up
    decode = {k: [] for k in engines}
    tokens = {k: 0 for k in engines}  # decoded tokens (the first comes from prefill; eos may stop early)
    for i in range(a.pairs):
        ids = prompts[i % len(prompts)]
        order = list(engines) if i % 2 == 0 else list(engines)[::-1]
        toks = {}
        for k in order:
            r = engines[k].generate(ids, max_tokens=a.max_tokens)
            toks[k] = r.tokens
            decode[k].append(r.stats["decode_s"])
            tokens[k] += max(r.stats["generated_tokens"] - 1, 0)
        if toks["repacked"] != toks["ggml"]:
            print(f"# pair {i}: outputs differ (float summation order): {toks['repacked']} vs {toks['ggml']}")
    tot = {k: sum(v) for k, v in decode.items()}
    for k in engines:
        print(f"{k:9} decode {tokens[k] / tot[k]:7.2f} tok/s (sum of {a.pairs} sequences), median sequence "
              f"{statistics.median(decode[k]) * 1e3:7.1f} ms")
    print(f"repacked / ggml decode time: {tot['repacked'] / tot['ggml']:.3f}  "
          f"(speed-up {tot['ggml'] / tot['repacked']:.3f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
