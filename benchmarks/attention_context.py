"""The fused CPU block's attention over long contexts, at GLM-4.5-Air's attention shape.

    python benchmarks/attention_context.py [BASE_CHECKOUT] [--contexts 512,2048,4000] [--rows 1,4]
                                           [--runs 3] [--dir /tmp/nx-attn]

A one-block model (`runtime.testmodel`: hidden 256, 96 query heads on 8 kv heads of 128, F16
weights, so the call is mostly attention) is written once to --dir. For each cache length L the
fused call (`BlockStack.forward_rows`) runs T rows at position L over a cache of random K/V:
"T seq" rows of one sequence (an MTP verify: they share the cache), "T dist" rows of T sequences
(a batched decode step: each its own L slots). Printed: the median ms of the call and the K/V
bytes a row's sequence holds over that time. With BASE_CHECKOUT (a checkout with its kernels
built), processes of BASE and this checkout alternate --runs times and each figure is the median
of its runs, with the ratio new / base; this machine's speed moves between runs.
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
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
import runtime
from runtime.testmodel import TestModelSpec, write_test_model
d, contexts, rows = Path(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")], [int(x) for x in sys.argv[4].split(",")]
path = d / "attn.gguf"
if not path.exists():
    spec = TestModelSpec(hidden=256, n_layers=1, n_dense=1, dense_ffn=256, n_heads=96, n_kv_heads=8, head_dim=128,
                         context_length=131072, n_nextn=0)
    write_test_model(spec, d, types="F16", save_hf_dir=False, gguf_name=path.name)
eng = runtime.load(str(path), progress=False, gpu="cpu", context=max(contexts) + max(rows) + 16)
m = eng.model
stack = m.fused.main
L_max, T_max = max(contexts), max(rows)
n = (L_max + T_max) * T_max
with torch.inference_mode():
    cache = m.new_cache(n, torch.float32)
    g = torch.Generator().manual_seed(0)
    for t in cache.pool.k + cache.pool.v:
        t.copy_(torch.randn(t.shape, generator=g))
kv = stack.cache(cache.pool.k, cache.pool.v)
span = L_max + T_max
maps = [np.arange(s * span, (s + 1) * span, dtype=np.int32) for s in range(T_max)]
rng = np.random.default_rng(0)
for L in contexts:
    for T in rows:
        for kind in ("seq", "dist"):
            if T == 1 and kind == "dist":
                continue
            if kind == "seq":
                at, mp = np.arange(L, L + T), [maps[0]] * T
            else:
                at, mp = np.full(T, L), maps[:T]
            ms = []
            for _ in range(9):
                x = rng.standard_normal((T, m.cfg.hidden)).astype(np.float32)
                t0 = time.perf_counter(); stack.forward_rows(x, kv, at, at, mp); ms.append(time.perf_counter() - t0)
            print(L, T, kind, statistics.median(ms) * 1e3)
"""


def _run(checkout: str, d: str, contexts: str, rows: str) -> dict:
    env = dict(os.environ, PYTHONPATH=checkout)
    r = subprocess.run([sys.executable, "-c", CHILD, checkout, d, contexts, rows], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"attention_context: the run in {checkout} failed:\n{r.stderr[-3000:]}")
    out = r.stdout
    return {(int(a), int(b), c): float(v) for a, b, c, v in (line.split() for line in out.splitlines() if line.strip())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", nargs="?")
    p.add_argument("--contexts", default="512,2048,4000")
    p.add_argument("--rows", default="1,4")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default="/tmp/nx-attn")
    a = p.parse_args(argv)
    here = str(Path(__file__).resolve().parents[1])
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    trees = ([a.base] if a.base else []) + [here]
    runs: dict[str, list[dict]] = {t: [] for t in trees}
    for _ in range(a.runs if a.base else 1):
        for t in trees:
            runs[t].append(_run(t, a.dir, a.contexts, a.rows))
    keys = list(runs[here][0])
    med = {t: {k: statistics.median(r[k] for r in runs[t]) for k in keys} for t in trees}
    kvb = 8 * 128 * 4 * 2  # K and V bytes per position of one layer (float32 cache)
    print("GLM-4.5-Air attention shape (96 heads, 8 kv heads of 128), 1 fused block, float32 cache; "
          f"median ms of 9 calls{f', median of {a.runs} alternated runs' if a.base else ''}")
    print(f"{'L':>6} {'rows':>7}" + (f" {'base ms':>9}" if a.base else "") + f" {'ms':>8} {'GB/s of K/V':>12}"
          + (f" {'new/base':>9}" if a.base else ""))
    for L, T, kind in keys:
        new = med[here][(L, T, kind)]
        line = f"{L:>6} {f'{T} {kind}':>7}"
        if a.base:
            line += f" {med[a.base][(L, T, kind)]:>9.2f}"
        line += f" {new:>8.2f} {(T if kind == 'dist' else 1) * L * kvb / new / 1e6:>12.1f}"
        if a.base:
            line += f" {new / med[a.base][(L, T, kind)]:>8.2f}x"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
