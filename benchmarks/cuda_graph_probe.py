"""Can one layer's GPU segment be captured in a CUDA graph, and what would that save? A probe for
the next GPU check: the GPU side of a hybrid decode step is bound by host time (~0.8 ms per
layer to issue ~30 small kernels on an H200, BENCHMARKS.md "GPU check"), and CUDA graphs are the
known remedy. This measures the remedy's ceiling before anyone builds it into the model.

    python benchmarks/cuda_graph_probe.py [MODEL.gguf] [--gpu cuda:0] [--layer 1] [--reps 200]

For one MoE layer at a fixed cache position (a short prompt prefilled), one row:
  eager    `GLM4Model._attention` + the router + the shared expert, as a decode step runs them:
           host time per call, and wall time per call with a synchronize after each
  graph    the same segment captured once (static input, the cache slot fixed) and replayed:
           host time per replay, wall time per replay
and whether capture worked at all (what failed, if not). Each segment's output is checked against
the eager one. Then the same for the model's own capture-ready form (runtime/graphs.py `Segment`,
what NEXTN_CUDA_GRAPHS=1 replays), 1 and 4 rows:
  segment  Segment.run() issued eagerly (out= ops, device-side positions and window), and under a
           TorchDispatchMode check on the device (host syncs, allocations: both must be 0)
  replay   Segment.capture() once, then replay(): host time and wall time per replay
Without CUDA it says so and exits 0; --dry-run runs the eager parts on the CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="MODEL.gguf or PLAN.yaml (default: the demo)")
    p.add_argument("--gpu", default="cuda:0")
    p.add_argument("--layer", type=int, default=None, help="an MoE layer (default: the first)")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--dry-run", action="store_true",
                   help="without CUDA: run the eager segment on the CPU only (checks the probe's own code)")
    a = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run:
        print("cuda_graph_probe: no CUDA device here; nothing to measure")
        return 0
    if not cuda:
        a.gpu = "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda dev=None: None)
    import runtime
    from runtime.model import MoE, Seg, rms_norm
    from runtime.sampling import SamplingParams

    eng = runtime.load(a.model, gpu=a.gpu, progress=False)
    m = eng.model
    layer = a.layer if a.layer is not None else next(i for i, b in enumerate(m.blocks) if isinstance(b.ffn, MoE))
    b = m.blocks[layer]
    if b.attn.side != "gpu" or b.ffn.router.side != "gpu":
        print(f"layer {layer}: attention/router not on the GPU side; nothing to capture")
        return 0
    dev, cfg = m.bus.devices["gpu"], eng.cfg
    seq = eng.new_sequence(SamplingParams(0.0), False)
    with torch.inference_mode():
        seq.prefill(eng.tokenize("def fibonacci(n):\n    if n < 2:\n        return n"))
    start = seq.cache.length
    x_static = torch.randn(1, cfg.hidden, device=dev, dtype=eng.dtype)
    seq.cache.reserve(start + 1)
    pos = m._positions([Seg(seq.cache, start, 1, start)])
    pos.cos_sin(dev)  # made (host-to-device) before any capture: a graph cannot copy from the host
    shared = b.ffn.shared

    def segment(x):
        h = x + m._attention(b.attn, x, layer, pos)
        hn = rms_norm(h, b.attn.post_norm, cfg.rms_eps)
        ids, w = b.ffn.router(hn)
        ys = shared(hn) if shared is not None and shared.side == "gpu" else None
        return h, hn, ids, w, ys

    def timed(fn, reps):
        host, wall = [], []
        for _ in range(reps):
            sync(dev)
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            sync(dev)
            host.append(t1 - t0)
            wall.append(time.perf_counter() - t0)
        return statistics.median(host) * 1e6, statistics.median(wall) * 1e6

    where = torch.cuda.get_device_name(dev) if cuda else "CPU (dry run)"
    print(f"model {eng.file.path.name}  {where}  layer {layer}, 1 row at position {start}")
    with torch.inference_mode():
        for _ in range(10):
            eager_out = segment(x_static)
        eh, ew = timed(lambda: segment(x_static), a.reps)
        print(f"eager:  host {eh:8.1f} us/call   wall {ew:8.1f} us/call")
        for rows in (1, 4):
            segment_probe(m, eng, seq, layer, rows, timed, cuda, a.reps)
        if not cuda:
            return 0
        try:
            s = torch.cuda.Stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):  # warm-up on a side stream, as capture requires
                for _ in range(3):
                    segment(x_static)
            torch.cuda.current_stream(dev).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                graph_out = segment(x_static)
        except Exception as e:  # what breaks capture is the finding
            print(f"graph:  capture failed: {type(e).__name__}: {e}")
            return 0
        g.replay()
        torch.cuda.synchronize(dev)
        for name, e_t, g_t in zip(("h", "hn", "ids", "w", "ys"), eager_out, graph_out):
            if e_t is None:
                continue
            same = torch.equal(e_t, g_t) if not e_t.is_floating_point() else \
                bool(torch.allclose(e_t.float(), g_t.float(), rtol=1e-2, atol=1e-2))
            print(f"        output {name}: {'matches eager' if same else 'DIFFERS from eager'}")
        gh, gw = timed(g.replay, a.reps)
        print(f"graph:  host {gh:8.1f} us/call   wall {gw:8.1f} us/call   "
              f"(host {eh / max(gh, 1e-9):.1f}x less, wall {ew / max(gw, 1e-9):.1f}x less)")
    return 0


def segment_probe(m, eng, seq, layer, rows, timed, cuda, reps) -> None:
    """runtime/graphs.py's Segment for `rows` rows of the probe's sequence, at its next slots."""
    import torch
    from runtime.graphs import GraphedLayers, Segment, StepInputs, check_capturable, window_for
    from runtime.model import Seg

    b, dev = m.blocks[layer], m.bus.devices["gpu"]
    if not GraphedLayers.eligible(m, b):
        print(f"segment x{rows}: layer {layer} is not eligible for graphs")
        return
    start = seq.cache.length
    seq.cache.reserve(start + rows)
    pool = seq.cache.pool
    W = min(window_for(start + rows), pool.n_slots)
    st = StepInputs(rows, W, dev)
    segs = [Seg(seq.cache, start, rows, start)]
    st.load(segs)
    seg = Segment(m, b, pool.k[layer], pool.v[layer], st)
    seg.x_in.copy_(torch.randn(rows, eng.cfg.hidden, device=dev, dtype=eng.dtype))
    pos = m._positions(segs)
    pos.cos_sin(dev)
    # the eager model path on the same rows, for the outputs (it writes the same K/V slots)
    from runtime.model import rms_norm
    ref = seg.x_in + m._attention(b.attn, seg.x_in.clone(), layer, pos)
    seg.run()
    err = (seg.res.float() - ref.float()).abs().max().item()
    print(f"segment x{rows} (window {W}): res vs eager max |diff| {err:.3g}")
    c = check_capturable(seg.run)
    print(f"segment x{rows}: {len(c.ops)} ops, host syncs {len(c.syncs)} {c.syncs[:3]}, "
          f"allocations {len(c.allocs)} {c.allocs[:3]}")
    sh, sw = timed(seg.run, reps)
    print(f"segment x{rows}: eager run()  host {sh:8.1f} us/call   wall {sw:8.1f} us/call")
    if not cuda:
        return
    try:
        seg.capture()
    except Exception as e:
        print(f"segment x{rows}: capture failed: {type(e).__name__}: {e}")
        return
    want = seg.res.clone()
    seg.replay()
    torch.cuda.synchronize(dev)
    print(f"segment x{rows}: replay output {'matches' if torch.equal(want, seg.res) else 'DIFFERS from'} run()")
    gh, gw = timed(seg.replay, reps)
    print(f"segment x{rows}: replay       host {gh:8.1f} us/call   wall {gw:8.1f} us/call   "
          f"(host {sh / max(gh, 1e-9):.1f}x less than run())")


if __name__ == "__main__":
    raise SystemExit(main())
