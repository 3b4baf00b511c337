"""Same-run A/B of the dense linear (cpu_kernels.linear) between this checkout and another build of
the package (a second worktree of the base commit, built in place), call by call interleaved.

    python benchmarks/linear_ab.py --base /tmp/linbase [--types q8_0,q4_k,q6_k,f16] [--tokens 1,8,16,512]
                                   [--weights attn_qkv,attn_output] [--repeats 7] [--threads N]

Per (weight, type, T): median ms of base and new (weights cycled over --copies copies so each call
reads from DRAM), the ratio base/new, and each build's time vs its own T=1 ("vs 1 row").
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time

import numpy as np


def _load(root):
    for k in [k for k in sys.modules if k == "cpu_kernels" or k.startswith("cpu_kernels.")]:
        del sys.modules[k]
    sys.path.insert(0, root)
    try:
        mod = importlib.import_module("cpu_kernels")
    finally:
        sys.path.remove(root)
    return mod


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--types", default="q8_0,q4_k,q6_k,f16")
    p.add_argument("--tokens", default="1,8,16")
    p.add_argument("--weights", default="attn_qkv,attn_output")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--copies", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    import os
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = _load(os.path.abspath(a.base))
    new = _load(here)
    from gguf import GGMLQuantizationType as QT
    sys.path.insert(0, here)
    from benchmarks.bench_linear import WEIGHTS, TYPES
    nth = a.threads or new.get_threads()
    print(f"# base {a.base} path={base.active_path()}  new {here} path={new.active_path()}  threads={nth}")
    print(f"{'weight':<12} {'type':<5} {'T':>4} {'base ms':>9} {'new ms':>9} {'base/new':>9} {'base vs 1':>10} {'new vs 1':>9}")
    rng = np.random.default_rng(0)
    for wname in a.weights.split(","):
        N, K = WEIGHTS[wname]
        for tname in a.types.split(","):
            t = TYPES[tname]
            raws = [new.random_blocks(t, (1, N, K), rng, method="bytes") for _ in range(a.copies)]
            wb = [base.ExpertTensor(r, t, (1, N, K)).repacked() for r in raws]
            wn = [new.ExpertTensor(r, t, (1, N, K)).repacked() for r in raws]
            one = {}
            for T in (int(s) for s in a.tokens.split(",")):
                x = rng.standard_normal((T, K), dtype=np.float32)
                out = np.empty((T, N), np.float32)
                tb, tn = [], []
                for r in range(a.repeats + 1):
                    t0 = time.perf_counter()
                    base.linear(x, wb[r % a.copies], out=out, threads=nth)
                    t1 = time.perf_counter()
                    new.linear(x, wn[r % a.copies], out=out, threads=nth)
                    t2 = time.perf_counter()
                    if r:
                        tb.append(t1 - t0)
                        tn.append(t2 - t1)
                mb, mn = statistics.median(tb), statistics.median(tn)
                if T == 1:
                    one = {"b": mb, "n": mn}
                vb = f"{mb / one['b']:.2f}x" if one else "-"
                vn = f"{mn / one['n']:.2f}x" if one else "-"
                print(f"{wname:<12} {tname:<5} {T:>4} {mb * 1e3:>9.3f} {mn * 1e3:>9.3f} {mb / mn:>8.2f}x {vb:>10} {vn:>9}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
