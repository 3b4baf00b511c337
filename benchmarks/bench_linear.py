"""Benchmark of the dense quantized linear (cpu_kernels.linear, runtime/linear.py) against the
float32 copy and torch matmul it replaces on the CPU: the non-expert weights of a GLM-4.5-Air
layer, and a 32k-row slice of its output head.

    python benchmarks/bench_linear.py [--types q8_0,q4_k,q6_k] [--tokens 1,2,4,512] [--repeats 7]
                                      [--float-path] [--runtime-path]

Types: q8_0, q4_k, q6_k, q5_0, f16, bf16.

Per (weight, type, T): median ms of the kernel and of torch (x @ W.T on the dequantized float32
copy, torch.set_num_threads = the kernel threads), interleaved call by call in one process; the
kernel's GB/s of weight bytes; the ratio torch / kernel; "vs 1 row": the kernel's time over its
time for T=1 of the same weight and type (when --tokens lists 1 first: the cost of extra rows,
which the multi-token kernels aim to keep near 1x while the weights' bytes dominate). The read bandwidth (C sum over 256 MiB,
best of 3) and the multiply units' rate (`cpu_kernels.peak_rates`: int8 multiply-adds through the
kernels' integer dot, float32 FMA lanes) are printed first. "floor ms": the least time this machine
allows, the larger of the weight bytes over the read bandwidth and the multiply-adds (T x N x K:
int8 for block types, float32 for F16/BF16) over the multiply rate; "x floor": the kernel's time
over it; "floor/1 row": the floor over the kernel's 1-row time, the least "vs 1 row" possible. Several weights of 4-60 MB are cycled so each call reads from DRAM.
--float-path adds a column: the runtime's own path for a float32 weight on the CPU
(`runtime.linear.linear`: batched one-row products for up to 17 rows, batch-invariant).
--runtime-path adds the model's own call on the file-form weight (`runtime.linear.KernelLinear`:
the kernel, except F16/BF16 weights at FLOAT_GEMM_MIN_ROWS rows or more, which take chunked
float32 GEMMs).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import cpu_kernels as ck
from gguf import GGMLQuantizationType as QT

# name: (rows N, cols K) of GLM-4.5-Air's weights (hidden 4096, 96 heads x 128, 8 KV heads,
# shared expert 1408, vocabulary 151552; the head here is a 32768-row slice)
WEIGHTS = {"attn_qkv": (14336, 4096), "attn_output": (4096, 12288), "shexp_gate_up": (2816, 4096),
           "shexp_down": (4096, 1408), "head_slice": (32768, 4096)}
TYPES = {"q8_0": QT.Q8_0, "q4_k": QT.Q4_K, "q6_k": QT.Q6_K, "q5_0": QT.Q5_0, "f16": QT.F16, "bf16": QT.BF16}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--types", default="q8_0,q4_k,q6_k")
    p.add_argument("--tokens", default="1,2,4,512")
    p.add_argument("--weights", default=",".join(WEIGHTS))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--copies", type=int, default=3, help="weights cycled per call (cache-cold reads)")
    p.add_argument("--float-path", action="store_true", help="also time runtime.linear.linear on the float32 copy")
    p.add_argument("--runtime-path", action="store_true", help="also time runtime.linear.KernelLinear on the file form")
    a = p.parse_args()
    from runtime.linear import KernelLinear, linear
    nth = ck.get_threads()
    torch.set_num_threads(nth)
    print(f"# cpu_kernels path={ck.active_path()} threads={nth}")
    bw = ck.read_bandwidth(256 << 20, repeats=3)
    rates = ck.peak_rates()
    print(f"# read bandwidth: {bw:.2f} GB/s; multiply rate: int8 {rates['int8_macs'] / 1e9:.1f} GMAC/s, "
          f"float32 {rates['f32_fmas'] / 1e9:.1f} GFMA/s")
    print(f"{'weight':<14} {'type':<5} {'T':>4} {'kernel ms':>10} {'torch f32 ms':>12} {'GB/s':>7} {'x torch':>8}"
          f" {'vs 1 row':>9} {'floor ms':>9} {'x floor':>8} {'floor/1 row':>11}"
          + (f" {'rows f32 ms':>12}" if a.float_path else "") + (f" {'runtime ms':>10}" if a.runtime_path else ""))
    rng = np.random.default_rng(0)
    for wname in a.weights.split(","):
        N, K = WEIGHTS[wname]
        for tname in a.types.split(","):
            t = TYPES[tname]
            if K % ck.quant.block_size(t)[0]:
                continue
            raw = [ck.random_blocks(t, (1, N, K), rng, method="bytes") for _ in range(a.copies)]
            fs = [torch.from_numpy(ck.dequantize(r, t, (1, N, K))[0]) for r in raw]
            qs = [ck.ExpertTensor(r, t, (1, N, K)) for r in raw]
            qs = [q.repacked() for q in qs]  # the load's repack: auto (Q5_0 -> q5_0_r8)
            one = None
            for T in (int(s) for s in a.tokens.split(",")):
                x = rng.standard_normal((T, K), dtype=np.float32)
                xt = torch.from_numpy(x)
                out = np.empty((T, N), np.float32)
                kt, tt, rt, ut = [], [], [], []
                for r in range(a.repeats + 1):
                    q, f = qs[r % len(qs)], fs[r % len(fs)]
                    t0 = time.perf_counter()
                    ck.linear(x, q, out=out)
                    t1 = time.perf_counter()
                    xt @ f.T
                    t2 = time.perf_counter()
                    if a.float_path:
                        linear(xt, f)
                    t3 = time.perf_counter()
                    if a.runtime_path:
                        KernelLinear([q])(xt)
                    t4 = time.perf_counter()
                    if r:
                        kt.append(t1 - t0)
                        tt.append(t2 - t1)
                        rt.append(t3 - t2)
                        ut.append(t4 - t3)
                km, tm = statistics.median(kt), statistics.median(tt)
                if T == 1:
                    one = km
                vs1 = f"{km / one:.2f}x" if one else "-"
                rate = rates["f32_fmas"] if tname in ("f16", "bf16") else rates["int8_macs"]
                floor = max(qs[0].nbytes / (bw * 1e9), T * N * K / rate if rate > 0 else 0.0)
                f1 = f"{floor / one:.2f}x" if one else "-"
                print(f"{wname:<14} {tname:<5} {T:>4} {km * 1e3:>10.3f} {tm * 1e3:>12.3f} "
                      f"{qs[0].nbytes / km / 1e9:>7.2f} {tm / km:>7.2f}x {vs1:>9} {floor * 1e3:>9.3f} "
                      f"{km / floor:>7.2f}x {f1:>11}"
                      + (f" {statistics.median(rt) * 1e3:>12.3f}" if a.float_path else "")
                      + (f" {statistics.median(ut) * 1e3:>10.3f}" if a.runtime_path else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
