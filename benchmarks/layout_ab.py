"""One MoE layer in the GGUF's own block layout against the repacked layouts, paired call by call.

    python benchmarks/layout_ab.py --mix Q4_K,Q5_0 --cases 1,2,4,8,4s --calls 41
    python benchmarks/layout_ab.py --mix Q8_0,Q8_0 --cases 1,4s
    python benchmarks/layout_ab.py --shape glm47 --mix Q3_K,Q3_K --experts 32
    python benchmarks/layout_ab.py --checkout /tmp/old --shape glm47 --mix Q3_K,Q3_K --experts 32

`--checkout DIR` runs DIR's cpu_kernels (put first on sys.path; its extension must be built there,
e.g. `git worktree add /tmp/old REV && cd /tmp/old && python cpu_kernels/build.py`): run it in
turn with this checkout to compare two builds. A build without a repacked layout for the mix
times the GGUF layout alone.

GLM-4.5-Air's shape (H 4096, experts of 1408, top-8) or GLM-4.7's (H 5120, experts of 1536, whose
1536 suits 256-element down types) with `--experts` random experts (64 Air experts: 670 MB per
layout for Q4_K/Q5_0, more than any cache). Each call routes T tokens at random (`Ts`: all T
to the same 8 experts) and runs both layouts on that routing, in alternating order; the figure is
the median over calls of (GGUF layout time / repacked time), which machine drift between calls
does not move the way it moves separate medians. Outputs are checked close: the integer sums are
the same, but the float32 summation order differs and can tip an 8-bit rounding of the down
projection's input (tests/test_cpu_kernels.py checks the layouts against the reference and
each other on small shapes).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkout", default=None, help="another checkout whose cpu_kernels to run")
    ap.add_argument("--mix", default="Q4_K,Q5_0", help="gate/up type,down type (ggml names)")
    ap.add_argument("--cases", default="1,2,4,8,4s", help="token counts; a trailing s: all on the same experts")
    ap.add_argument("--calls", type=int, default=41)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--shape", choices=["air", "glm47"], default="air")
    a = ap.parse_args(argv)
    if a.checkout:
        sys.path.insert(0, os.path.abspath(a.checkout))
    import cpu_kernels as ck
    from gguf import GGMLQuantizationType as QT

    try:
        gt, dt = (QT[t.strip().upper()] for t in a.mix.split(","))
    except (KeyError, ValueError):
        raise SystemExit(f"--mix: expected two ggml type names like Q4_K,Q5_0, got {a.mix!r}") from None
    (H, I), K, E = {"air": (4096, 1408), "glm47": (5120, 1536)}[a.shape], 8, a.experts
    if E < K:
        raise SystemExit(f"--experts must be at least {K}")
    rng = np.random.default_rng(0)

    def tensor(t, shape):
        try:
            return ck.ExpertTensor(ck.random_blocks(t, shape, rng, method="bytes"), t, shape)
        except ValueError as e:  # a 256-element type across Air's 1408
            raise SystemExit(f"{t.name} {shape}: {e}") from None

    ggml = (tensor(gt, (E, I, H)), tensor(gt, (E, I, H)), tensor(dt, (E, H, I)))
    rep = tuple(t.repacked() if t.can_repack() else t for t in ggml)   # what `repack: auto` loads
    print(f"# {os.path.dirname(os.path.dirname(os.path.abspath(ck.__file__)))}: path {ck.active_path()}, "
          f"{ck.get_threads()} threads; {a.shape}, {E} experts; layouts: "
          + " / ".join(f"{g.ggml_type.name} {r.layout}" for g, r in zip(ggml, rep)))
    layouts = {"ggml": ggml, "repacked": rep}
    if all(r.layout == "ggml" for r in rep):
        print("# no repacked layout for these types on this path: the GGUF layout alone")
        del layouts["repacked"]
    for case in a.cases.split(","):
        same = case.endswith("s")
        T = int(case.rstrip("s"))
        x = rng.standard_normal((T, H), dtype=np.float32)
        times = {name: [] for name in layouts}
        ratios, worst = [], 0.0
        for c in range(a.calls):
            pick = lambda: rng.choice(E, K, replace=False)  # noqa: E731
            ids = np.tile(pick(), (T, 1)) if same else np.stack([pick() for _ in range(T)])
            ids = ids.astype(np.int32)
            w = rng.random((T, K), dtype=np.float32)
            out, t = {}, {}
            for name in (list(layouts) if c % 2 else list(layouts)[::-1]):
                t0 = time.perf_counter()
                out[name] = ck.moe_forward(x, ids, w, *layouts[name])
                t[name] = time.perf_counter() - t0
                times[name].append(t[name])
            if len(layouts) == 1:
                continue
            ratios.append(t["ggml"] / t["repacked"])
            # a wrong layout is off by the output's own size; a float32 summation order that tips
            # one 8-bit rounding of the down projection's input, by ~1/127 of a block's range
            scale = float(np.abs(out["ggml"]).max()) or 1.0
            diff = float(np.abs(out["ggml"] - out["repacked"]).max()) / scale
            worst = max(worst, diff)
            if diff > 2e-2:
                raise SystemExit(f"T={case}: the layouts' outputs differ by {diff:.3g} of their range")
        if len(layouts) == 1:
            print(f"T={case:>4}: ggml {np.median(times['ggml']) * 1e3:8.2f} ms")
            continue
        q1, med, q3 = np.percentile(ratios, [25, 50, 75])
        print(f"T={case:>4}: ggml {np.median(times['ggml']) * 1e3:8.2f} ms  repacked "
              f"{np.median(times['repacked']) * 1e3:8.2f} ms  paired speed-up {med:.3f}x (quartiles {q1:.3f}-{q3:.3f}), "
              f"outputs within {worst:.1e} of their range")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
