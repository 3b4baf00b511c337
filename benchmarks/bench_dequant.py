"""Load-time decoding: gguf's reference decoder against the C kernels' (`TensorInfo.dequantize`),
over the tensors a GPU placement dequantizes at load (every matrix but the routed experts).

    python benchmarks/bench_dequant.py MODEL.gguf [--experts]

Per ggml type: elements, seconds with gguf.quants.dequantize and with the kernels (all threads),
the ratio; every tensor is checked equal, bit for bit. Each tensor is decoded by gguf first, so
both see its pages in the page cache. --experts adds the routed experts (what an MTP layer's
experts placed on a GPU cost).
"""
from __future__ import annotations

import argparse
import time

import gguf
import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--experts", action="store_true")
    a = p.parse_args(argv)
    from runtime.gguf_file import GGUFFile

    f = GGUFFile(a.model)
    rows: dict[str, list[float]] = {}
    for name, info in f.tensors.items():
        if len(info.shape) < 2 or ("_exps." in name and not a.experts):
            continue
        t0 = time.perf_counter()
        ref = gguf.quants.dequantize(info.raw(), info.ggml_type) if info.type_name != "F32" else info.raw().view(np.float32)
        t1 = time.perf_counter()
        got = info.dequantize()
        t2 = time.perf_counter()
        if not np.array_equal(got, np.asarray(ref, dtype=np.float32).reshape(info.shape), equal_nan=True):
            raise SystemExit(f"{name} ({info.type_name}): the kernels' values differ from gguf's")
        r = rows.setdefault(info.type_name, [0, 0.0, 0.0])
        r[0] += info.n_elements
        r[1] += t1 - t0
        r[2] += t2 - t1
    print(f"{'type':<8} {'M elements':>11} {'gguf s':>8} {'kernels s':>10} {'ratio':>7}")
    tot = [0, 0.0, 0.0]
    for t, (n, g, k) in sorted(rows.items()):
        print(f"{t:<8} {n / 1e6:>11.1f} {g:>8.2f} {k:>10.2f} {g / max(k, 1e-9):>6.1f}x")
        tot = [tot[0] + n, tot[1] + g, tot[2] + k]
    print(f"{'all':<8} {tot[0] / 1e6:>11.1f} {tot[1]:>8.2f} {tot[2]:>10.2f} {tot[1] / max(tot[2], 1e-9):>6.1f}x"
          "  (every tensor equal)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
