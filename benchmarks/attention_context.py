"""The fused CPU block's attention over long contexts, at GLM-4.5-Air's attention shape.

    python benchmarks/attention_context.py [BASE_CHECKOUT] [--contexts 512,2048,4000] [--rows 1,4]
                                           [--kv float32[,float16]] [--runs 3] [--dir /tmp/nx-attn]

A one-block model (`runtime.testmodel`: hidden 256, 96 query heads on 8 kv heads of 128, F16
weights, so the call is mostly attention) is written once to --dir. For each cache length L the
fused call (`BlockStack.forward_rows`) runs T rows at position L over a cache of random K/V:
"T seq" rows of one sequence (an MTP verify: they share the cache), "T dist" rows of T sequences
(a batched decode step: each its own L slots). Printed: the median ms of the call and the K/V
bytes a row's sequence holds over that time. --kv: the cache's element types (float16: the F16
KV cache, `kv_cache: float16`). With BASE_CHECKOUT (a checkout with its kernels built), or with
two KV types, processes of each setting alternate --runs times and each figure is the median of
its runs, with its ratio to the first setting; this machine's speed moves between runs.
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
kv_dtype = getattr(torch, sys.argv[5])
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
    cache = m.new_cache(n, kv_dtype)
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


def _run(checkout: str, d: str, contexts: str, rows: str, kv: str) -> dict:
    env = dict(os.environ, PYTHONPATH=checkout)
    r = subprocess.run([sys.executable, "-c", CHILD, checkout, d, contexts, rows, kv], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"attention_context: the run in {checkout} ({kv} cache) failed:\n{r.stderr[-3000:]}")
    out = r.stdout
    return {(int(a), int(b), c): float(v) for a, b, c, v in (line.split() for line in out.splitlines() if line.strip())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", nargs="?")
    p.add_argument("--contexts", default="512,2048,4000")
    p.add_argument("--rows", default="1,4")
    p.add_argument("--kv", default="float32", help="comma-separated KV cache types: float32, float16")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default="/tmp/nx-attn")
    a = p.parse_args(argv)
    kvs = [k.strip() for k in a.kv.split(",") if k.strip()]
    if not kvs or any(k not in ("float32", "float16") for k in kvs):
        raise SystemExit(f"--kv {a.kv!r}: expected float32 and/or float16")
    here = str(Path(__file__).resolve().parents[1])
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    # settings (checkout, KV type), base first: the ratios are to the first
    sets = [(t, k) for t in ([a.base] if a.base else []) + [here] for k in kvs]
    names = [("base " if t == a.base else "new " if a.base else "") + k.replace("float", "f") for t, k in sets]
    runs: dict[tuple, list[dict]] = {s: [] for s in sets}
    for _ in range(a.runs if len(sets) > 1 else 1):
        for st in sets:
            runs[st].append(_run(st[0], a.dir, a.contexts, a.rows, st[1]))
    keys = list(runs[sets[0]][0])
    med = {st: {k: statistics.median(r[k] for r in runs[st]) for k in keys} for st in sets}
    print("GLM-4.5-Air attention shape (96 heads, 8 kv heads of 128), 1 fused block; "
          f"median ms of 9 calls{f', median of {a.runs} alternated runs' if len(sets) > 1 else ''}; "
          "GB/s: the K/V bytes the rows' sequences hold over the time")
    head = f"{'L':>6} {'rows':>7}"
    for nm in names:
        head += f" {nm + ' ms':>12} {'GB/s':>6}"
    for nm in names[1:]:
        head += f" {nm + '/' + names[0]:>16}"
    print(head)
    for L, T, kind in keys:
        line = f"{L:>6} {f'{T} {kind}':>7}"
        for st in sets:
            ms = med[st][(L, T, kind)]
            kvb = 8 * 128 * 2 * (2 if st[1] == "float16" else 4)  # K and V bytes per position of one layer
            line += f" {ms:>12.2f} {(T if kind == 'dist' else 1) * L * kvb / ms / 1e6:>6.1f}"
        for st in sets[1:]:
            line += f" {med[st][(L, T, kind)] / med[sets[0]][(L, T, kind)]:>15.2f}x"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
