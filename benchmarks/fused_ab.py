"""Fused CPU blocks against the torch path on one model, in one process, alternating.

    python -m runtime.synthetic /tmp/air.gguf --shape glm45-air --layers 3 --mix q4k_q5_0 --vocab 8192
    python benchmarks/fused_ab.py /tmp/air.gguf [--rounds 3] [--context 1024]

Per round and path: a 48-token prefill (the torch path in both: chunks of more than 17 rows), then
forwards of T = 1, 2, 4, 8 rows at cache position 48 (best of 4 each), then a 16-token greedy
generation. Prints medians over rounds and the fused / torch ratios.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    import torch

    import runtime
    from runtime.sampling import SamplingParams

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--context", type=int, default=1024)
    a = ap.parse_args(argv)
    e = runtime.load(a.model, progress=False, gpu="cpu", context=a.context)
    print(f"{Path(a.model).name}: fused blocks {e.load_report.fused_blocks}")
    m, fused = e.model, e.model.fused
    if fused is None:
        return 1
    ids = [100 + i for i in range(64)]
    res: dict = {}
    try:
        with torch.inference_mode():
            for _ in range(a.rounds):
                for mode in ("fused", "torch"):
                    m.fused = fused if mode == "fused" else None
                    seq = e.new_sequence(SamplingParams(), use_mtp=False)
                    t0 = time.perf_counter()
                    m.forward(torch.tensor(ids[:48]), seq.cache, 0)
                    res.setdefault((mode, "prefill 48 (s)"), []).append(time.perf_counter() - t0)
                    for T in (1, 2, 4, 8):
                        ts = []
                        for _ in range(4):
                            t0 = time.perf_counter()
                            m.forward(torch.tensor(ids[48:48 + T]), seq.cache, 48)
                            ts.append(time.perf_counter() - t0)
                        res.setdefault((mode, f"T={T} (ms)"), []).append(min(ts) * 1e3)
                    g = e.generate(ids[:16], max_tokens=16, mtp=False)
                    res.setdefault((mode, "decode (tok/s)"), []).append(g.stats["decode_tokens_per_s"])
    finally:
        m.fused = fused
    print(f"{'':16} {'fused':>10} {'torch':>10} {'fused/torch':>12}")
    for key in [k for (mode, k) in res if mode == "fused"]:
        f, t = statistics.median(res[("fused", key)]), statistics.median(res[("torch", key)])
        print(f"{key:16} {f:10.3f} {t:10.3f} {f / t:12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
