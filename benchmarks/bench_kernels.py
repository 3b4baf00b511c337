"""Benchmark of the CPU expert kernels: one MoE layer, GLM-4.5-Air and GLM-4.7 shapes.

    python benchmarks/bench_kernels.py                 # everything (several minutes)
    python benchmarks/bench_kernels.py --quick         # Air, Q4_K/Q5_0, T in 1 2 4 8 + same-experts 4
    python benchmarks/bench_kernels.py --shapes air --mixes q4k_q5_0,q8_0 --tokens 1,2,512 --same 4

For each call it prints the median time, the distinct experts touched, the GB/s of those experts'
weight bytes (what the call must read), the bound = those bytes / read bandwidth, time/bound, and
the ratio against a torch reference in the same run (float32 weights dequantized once outside the
timing, grouped torch matmuls per expert, torch.set_num_threads = the expert threads).

Read bandwidth: a STREAM-like sum in C, taken right before each row (256 MiB, best of 3, with 1
thread and with the expert threads, the better of the two: on a loaded machine one thread often
reads faster than two) so that the bound follows the machine's state; "bw" is that figure.
"cpu ms": median process CPU time per call (all threads); "GB/s/core" = bytes / CPU time, the
kernel's per-core throughput, which does not depend on how much of the machine other jobs take.
The load average is printed at the start and the end.

To keep memory bounded, the torch reference holds float32 copies of at most --torch-pool
experts and expert e uses copy e % pool (its timing depends on shapes, not values; the pool is
far larger than the caches).  Routing is random per repeat so weights come from DRAM, not cache.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import cpu_kernels as ck
from gguf import GGMLQuantizationType as QT

SHAPES = {  # name: (H, E, I, K)
    "air": (4096, 128, 1408, 8),
    "glm47": (5120, 160, 1536, 8),
}
MIXES = {  # name: (gate/up type, down type, down type when I % 256 != 0)
    "q4k_q5_0": (QT.Q4_K, QT.Q5_0, QT.Q5_0),
    "q4k_q8_0": (QT.Q4_K, QT.Q8_0, QT.Q8_0),
    "q8_0": (QT.Q8_0, QT.Q8_0, QT.Q8_0),
    "iq4xs_iq4nl": (QT.IQ4_XS, QT.IQ4_NL, QT.IQ4_NL),
    "q2k_q3k": (QT.Q2_K, QT.Q3_K, QT.IQ4_NL),
}


def routing(T, E, K, rng, same=False):
    if same:
        return np.tile(rng.choice(E, K, replace=False), (T, 1)).astype(np.int32)
    return np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int32)


def best_bw(nth, nbytes=1 << 28, repeats=3):
    b = ck.read_bandwidth(nbytes, threads=1, repeats=repeats)
    return max(b, ck.read_bandwidth(nbytes, threads=nth, repeats=repeats)) if nth > 1 else b


def median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        ts.append(fn())
    return float(np.median(ts)), float(np.min(ts))


class TorchRef:
    def __init__(self, torch, gate, up, down, pool):
        E = gate.shape[0]
        self.torch = torch
        self.pool = min(pool, E)
        sl = slice(0, self.pool)
        self.g = torch.from_numpy(ck.dequantize(gate.data[sl], gate.ggml_type, (self.pool,) + gate.shape[1:]))
        self.u = torch.from_numpy(ck.dequantize(up.data[sl], up.ggml_type, (self.pool,) + up.shape[1:]))
        self.d = torch.from_numpy(ck.dequantize(down.data[sl], down.ggml_type, (self.pool,) + down.shape[1:]))

    def __call__(self, x, ids, w):
        torch = self.torch
        out = torch.zeros_like(x)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=1).tolist()
        K = ids.shape[1]
        pos = 0
        for e, c in enumerate(counts):
            if not c:
                continue
            sel = order[pos:pos + c]
            pos += c
            rows = sel // K
            p = e % self.pool
            xs = x[rows]
            a = torch.nn.functional.silu(xs @ self.g[p].T) * (xs @ self.u[p].T)
            y = (a @ self.d[p].T) * w.reshape(-1)[sel].unsqueeze(1)
            out.index_add_(0, rows, y)
        return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="air,glm47")
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--tokens", default="1,2,3,4,8,32,512")
    ap.add_argument("--same", default="4", help="T values with all rows on the same experts ('' for none)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--torch", default="first", choices=["first", "all", "none"],
                    help="torch reference for the first shape/mix only (default), all, or none")
    ap.add_argument("--torch-pool", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--interleave", action="store_true",
                    help="time the T cases round-robin (one call each per round, a bandwidth probe beside "
                         "each) instead of one block of repeats per case: steadier ratios on a shared machine")
    ap.add_argument("--layout", default="repacked", choices=["repacked", "ggml", "both"],
                    help="expert tensors as the runtime loads them by default (repacked where a faster "
                         "layout exists: cpu_kernels.REPACKED_TYPES), as they lie in the GGUF, or both in the same run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.mixes, args.tokens, args.same, args.repeats = "air", "q4k_q5_0", "1,2,4,8", "4", 7
    if args.threads:
        ck.set_threads(args.threads)
    nth = ck.get_threads()
    rng = np.random.default_rng(args.seed)
    torch = None
    if args.torch != "none":
        import torch
        torch.set_num_threads(nth)

    info = ck.build_info()
    print(f"# cpu_kernels path={info['active_path']} threads={nth} flags: {info['build_flags']}")
    print(f"# load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} ({os.cpu_count()} CPUs)")
    bw = best_bw(nth, 1 << 30, 5)
    print(f"# read bandwidth (C sum over 1 GiB, best of 5, max of 1 and {nth} threads): {bw:.2f} GB/s")
    hdr = (f"{'shape':6} {'mix':16} {'T':>6} {'experts':>7} {'ms':>9} {'min ms':>9} {'GB/s':>6} {'bw':>6} {'bound ms':>9} "
           f"{'x bound':>7} {'cpu ms':>8} {'GB/s/core':>9} {'torch ms':>9} {'vs torch':>8} {'x T=1':>5}")
    print(hdr)
    first = True
    tok = [int(t) for t in args.tokens.split(",") if t]
    same = [int(t) for t in args.same.split(",") if t]
    for sname in args.shapes.split(","):
        H, E, I, K = SHAPES[sname]
        for mname in args.mixes.split(","):
            tgu, td, td_fallback = MIXES[mname]
            if I % 256:
                td = td_fallback if td in (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS) else td
            t0 = time.perf_counter()
            G = ck.ExpertTensor(ck.random_blocks(tgu, (E, I, H), rng, method="bytes"), tgu, (E, I, H))
            U = ck.ExpertTensor(ck.random_blocks(tgu, (E, I, H), rng, method="bytes"), tgu, (E, I, H))
            D = ck.ExpertTensor(ck.random_blocks(td, (E, H, I), rng, method="bytes"), td, (E, H, I))
            per_expert = G.expert_bytes() + U.expert_bytes() + D.expert_bytes()
            label = f"{tgu.name}/{td.name}"
            # layout -> (gate, up, down) and its label: "r8" marks the tensors in a repacked layout
            downs = {"ggml": (G, U, D)}
            labels = {"ggml": label}
            if args.layout != "ggml" and any(t.can_repack() for t in (G, U, D)):
                downs["repacked"] = tuple(t.repacked() for t in (G, U, D))
                labels["repacked"] = "/".join(t.ggml_type.name + ("r8" if t.layout != "ggml" else "")
                                              for t in downs["repacked"][1:])
                if args.layout == "repacked":
                    del downs["ggml"]
            print(f"# {sname} H={H} E={E} I={I} K={K} {label}: {per_expert / 1e6:.2f} MB per expert "
                  f"(generated in {time.perf_counter() - t0:.1f}s)", flush=True)
            ref = None
            if torch is not None and (args.torch == "all" or first):
                ref = TorchRef(torch, G, U, D, args.torch_pool)
            first = False
            cases = [(T, False, lay) for lay in downs for T in tok] + [(T, True, lay) for lay in downs for T in same]
            rows = {c: {"t": [], "cpu": [], "nd": [], "bw": []} for c in cases}

            def run_kernel(T, is_same, lay, x, out, rec):
                ids = routing(T, E, K, rng, is_same)
                w = rng.random((T, K), dtype=np.float32)
                rec["nd"].append(len(np.unique(ids)))
                c1 = time.process_time()
                t1 = time.perf_counter()
                ck.moe_forward(x, ids, w, *downs[lay], out=out)
                t2 = time.perf_counter()
                rec["cpu"].append(time.process_time() - c1)
                rec["t"].append(t2 - t1)

            bufs = {}
            for c in cases:
                T = c[0]
                x = rng.standard_normal((T, H), dtype=np.float32)
                bufs[c] = (x, np.empty((T, H), np.float32))
                run_kernel(*c, *bufs[c], {"t": [], "cpu": [], "nd": [], "bw": []})  # warm-up
            if args.interleave:
                # round-robin: every case once per round, each beside a bandwidth probe, so a change
                # in the machine's state (other VMs' memory traffic) hits all cases alike
                for _ in range(args.repeats):
                    for c in cases:
                        rows[c]["bw"].append(best_bw(nth, 1 << 27, 1))
                        run_kernel(*c, *bufs[c], rows[c])
            else:
                for c in cases:
                    rows[c]["bw"].append(best_bw(nth))
                    reps = args.repeats if c[0] <= 32 else max(3, args.repeats // 3)
                    for _ in range(reps):
                        run_kernel(*c, *bufs[c], rows[c])
            t1_med = {}
            for T, is_same, lay in cases:
                rec = rows[(T, is_same, lay)]
                med, mn = float(np.median(rec["t"])), float(np.min(rec["t"]))
                bw_case = float(np.median(rec["bw"]))
                nd = float(np.mean(rec["nd"]))
                byts = nd * per_expert
                bound = byts / (bw_case * 1e9)
                cpu_med = float(np.median(rec["cpu"]))
                if T == 1 and not is_same:
                    t1_med[lay] = med
                tstr = vs = ""
                if ref is not None and lay == next(iter(downs)):
                    x = bufs[(T, is_same, lay)][0]
                    xt = torch.from_numpy(x)

                    def run_torch():
                        ids = torch.from_numpy(routing(T, E, K, rng, is_same)).long()
                        w = torch.rand((T, K))
                        t1 = time.perf_counter()
                        ref(xt, ids, w)
                        return time.perf_counter() - t1
                    reps = args.repeats if T <= 32 else max(3, args.repeats // 3)
                    tmed, _ = median_time(run_torch, reps)
                    tstr, vs = f"{tmed * 1e3:9.2f}", f"{tmed / med:7.2f}x"
                tl = f"{T}{'s' if is_same else ''}"
                vs1 = f"{med / t1_med[lay]:5.2f}" if lay in t1_med else ""
                lab = labels[lay]
                print(f"{sname:6} {lab:16} {tl:>6} {nd:7.1f} {med * 1e3:9.2f} {mn * 1e3:9.2f} "
                      f"{byts / med / 1e9:6.2f} {bw_case:6.2f} {bound * 1e3:9.2f} {med / bound:7.2f} "
                      f"{cpu_med * 1e3:8.2f} {byts / max(cpu_med, 1e-9) / 1e9:9.2f} {tstr:>9} {vs:>8} {vs1:>5}", flush=True)
            del G, U, D, downs, ref
    bw2 = best_bw(nth, 1 << 30, 5)
    print(f"# read bandwidth at the end: {bw2:.2f} GB/s (start {bw:.2f}); load average at the end: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("# T suffix 's': all T rows routed to the same K experts; 'x bound' = median time / bound;"
          " 'vs torch' = torch time / kernel time; 'x T=1' = median time / the T=1 row's")


if __name__ == "__main__":
    main()
