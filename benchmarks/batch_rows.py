"""What one fused block call (all blocks of a forward, `BlockStack.forward_rows`) costs by the
rows it carries, in batched decoding: where a batch's step time goes when its bytes are small.

    python benchmarks/batch_rows.py [MODEL|PLAN] [--sequences 1,4,8] [--max-tokens 64] [--rounds 3]

For each batch size n, `Engine.generate_batch` decodes the first n of the batch bench's prompts
(greedy, MTP off) `--rounds` times; every fused call is timed, and the median ms per call is
printed by the rows it carried (decode calls only: n rows), with the distinct routed experts per
main forward of the batch, and what a batch step costs outside its fused calls (the run's wall
time less all its fused calls, over its main forwards, prefill included: the step's host work,
the embedding lookup, the head and sampling), and the same over decode steps only (the batch's
rounds once every sequence has its first token) beside their fused time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from cpu_kernels.blocks import BlockStack
    from runtime.api import load
    from runtime.bench_batch import PROMPTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?")
    p.add_argument("--sequences", default="1,4,8")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    times: dict[int, list[float]] = {}
    orig = BlockStack.forward_rows

    fused_s = [0.0]

    def timed(self, x, *args, **kw):
        t = time.perf_counter()
        out = orig(self, x, *args, **kw)
        dt = time.perf_counter() - t
        times.setdefault(int(x.shape[0]), []).append(dt)
        fused_s[0] += dt
        return out

    BlockStack.forward_rows = timed
    from runtime.batch import Batch

    orig_round = Batch.round
    dec = [0.0, 0.0, 0]  # decode rounds: wall, fused, steps (rounds with a fused call)

    def round_timed(self):
        f0 = fused_s[0]
        t = time.perf_counter()
        out = orig_round(self)
        if self.t_decode is not None:
            dec[0] += time.perf_counter() - t
            dec[1] += fused_s[0] - f0
            dec[2] += fused_s[0] > f0
        return out

    Batch.round = round_timed
    eng = load(a.target, progress=False)
    kw = dict(max_tokens=a.max_tokens, temperature=0.0, repeat_penalty=1.0, mtp=False)
    print(f"{'seqs':>4} {'ms per fused call':>18} {'calls':>6} {'experts/fwd':>11} {'ms outside/step':>15} "
          f"{'decode: fused':>13} {'outside':>8}")
    for n in [int(s) for s in a.sequences.split(",")]:
        eng.generate_batch(PROMPTS[:n], **kw)  # warm-up
        times.clear()
        experts, outside, dfused, doutside = [], [], [], []
        for _ in range(a.rounds):
            fused_s[0] = 0.0
            dec[:] = [0.0, 0.0, 0]
            t = time.perf_counter()
            eng.generate_batch(PROMPTS[:n], **kw)
            wall = time.perf_counter() - t
            bs = eng.last_batch.stats
            experts.append(bs.distinct_experts / max(bs.steps, 1))
            outside.append((wall - fused_s[0]) / max(bs.steps, 1))
            dfused.append(dec[1] / max(dec[2], 1))
            doutside.append((dec[0] - dec[1]) / max(dec[2], 1))
        ts = times.get(n, [])
        ms = statistics.median(ts) * 1e3 if ts else float("nan")
        print(f"{n:>4} {ms:>18.3f} {len(ts):>6} {statistics.median(experts):>11.1f} "
              f"{statistics.median(outside) * 1e3:>15.3f} {statistics.median(dfused) * 1e3:>13.3f} "
              f"{statistics.median(doutside) * 1e3:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
