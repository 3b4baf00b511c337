"""Where a decode step's time goes on a CUDA machine: torch.profiler over plain (1-row) steps and
MTP verify (2-row) steps of one model, after a warm-up, printing the ops that take the most time.

    python benchmarks/gpu_profile.py MODEL.gguf [--tokens 16] [--gpu cuda:0]

Made for the first GPU check's finding (BENCHMARKS.md): in the trace of a synthetic GLM-4.5-Air
run, the first attention layer of a 2-row forward took ~36 ms against ~1 ms for 1 row, while
later layers took ~1.3 ms at 2 rows. Also times the bare bfloat16 matmuls of those shapes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bare_matmuls(dev) -> None:
    import torch

    for n, k in ((21888, 4096), (4096, 10944), (12288, 4096)):
        w = torch.randn(n, k, dtype=torch.bfloat16, device=dev)
        for t in (1, 2, 3, 4):
            x = torch.randn(t, k, dtype=torch.bfloat16, device=dev)
            for _ in range(3):
                x @ w.T
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                x @ w.T
            torch.cuda.synchronize()
            print(f"bf16 matmul [{t},{k}] x [{k},{n}]: {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms")


def sdpa_backends(dev) -> None:
    """Decode-shaped attention (32 query heads over 8 KV heads, head 128, bfloat16) with a new KV
    length every call, as decoding makes: per backend, the median ms of a call."""
    import statistics

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B = SDPBackend
    for label, backends in (("default", None), ("cudnn", [B.CUDNN_ATTENTION]), ("flash", [B.FLASH_ATTENTION]),
                            ("efficient", [B.EFFICIENT_ATTENTION]), ("math", [B.MATH]),
                            ("flash+efficient+math", [B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH])):
        for T in (1, 2):
            times = []
            try:
                for S in range(2000, 2012):
                    q = torch.randn(1, 32, T, 128, dtype=torch.bfloat16, device=dev)
                    k = torch.randn(1, 8, S, 128, dtype=torch.bfloat16, device=dev)
                    m = torch.ones(T, S, dtype=torch.bool, device=dev).tril(S - T) if T > 1 else None
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    if backends is None:
                        F.scaled_dot_product_attention(q, k, k, attn_mask=m, enable_gqa=True)
                    else:
                        with sdpa_kernel(backends):
                            F.scaled_dot_product_attention(q, k, k, attn_mask=m, enable_gqa=True)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                print(f"sdpa {label:<21} T={T}: median {statistics.median(times) * 1e3:8.3f} ms, "
                      f"first {times[0] * 1e3:8.3f} ms (new KV length each call)")
            except Exception as e:  # a backend that does not take these inputs
                print(f"sdpa {label:<21} T={T}: n/a ({str(e).splitlines()[0][:90]})")


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import runtime

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--gpu", default="cuda:0")
    a = p.parse_args(argv)
    if a.gpu.startswith("cuda"):
        sdpa_backends(a.gpu)
        bare_matmuls(a.gpu)
    eng = runtime.load(a.model, gpu=a.gpu, progress=False)
    ids = eng.tokenize("def main():")
    for mtp in (False, True):  # warm-up both shapes
        eng.generate(ids, max_tokens=8, mtp=mtp, draft_max=1, adaptive=False, draft_ahead=False)
    for name, mtp in (("plain", False), ("mtp k=1", True)):
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.gpu.startswith("cuda") else [])
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            r = eng.generate(ids, max_tokens=a.tokens, mtp=mtp, draft_max=1, adaptive=False, draft_ahead=False)
            wall = time.perf_counter() - t0
        print(f"\n===== {name}: {len(r.tokens)} tokens in {wall * 1e3:.1f} ms, {r.stats.get('mean_tokens_per_step', 1):.2f} tokens/step")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=48))
        print(prof.key_averages().table(sort_by="cuda_time_total" if a.gpu.startswith("cuda") else "self_cpu_time_total", row_limit=12, max_name_column_width=48))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
