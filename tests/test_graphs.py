"""The capture-ready gpu-side segments (runtime/graphs.py), on the CPU: outputs against the eager
model path, and the capture discipline (no host sync, no allocation per call) checked by a
TorchDispatchMode. CUDA capture and replay themselves run in benchmarks/gpu_check.sh (stage
"graphs")."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from runtime.graphs import CaptureCheck, GraphedLayers, Segment, check_capturable, window_for


@pytest.fixture(scope="module")
def engine(make_test_model):
    eng = runtime.load(make_test_model().gguf_path, progress=False, gpu="cpu")
    eng.model.fused = None  # the torch path: the one graphs replace on a GPU
    assert any(GraphedLayers.eligible(eng.model, b) for b in eng.model.blocks)
    return eng


def ids_for(eng, n, seed=0):
    return torch.tensor(np.random.default_rng(seed).integers(0, eng.cfg.n_vocab, n))


def decode(eng, graphs, rows, prompt=20, max_len=64, seed=0):
    """Prefill `prompt` tokens, then forwards of `rows[i]` rows each; every output and the cache."""
    m = eng.model
    m.graphs = graphs
    try:
        ids = ids_for(eng, prompt + sum(rows), seed)
        c = m.new_cache(max_len, torch.float32)
        outs = []
        with torch.inference_mode():
            m.forward(ids[:prompt], c, 0)
            p = prompt
            for R in rows:
                outs.append(m.forward(ids[p:p + R], c, p))
                p += R
        return outs, c
    finally:
        m.graphs = None


def test_window_buckets():
    assert [window_for(n) for n in (1, 256, 257, 1000, 4096)] == [256, 256, 512, 1024, 4096]


@pytest.mark.parametrize("prompt", [3, 20, 45])
def test_graphed_forward_matches_the_eager_path(engine, prompt):
    rows = [1, 2, 3, 4, 1]
    g = GraphedLayers(engine.model, capture=False)
    want, cw = decode(engine, None, rows, prompt)
    got, cg = decode(engine, g, rows, prompt)
    assert {k[2] for k in g.segments} == {1, 2, 3, 4}  # the segments did run, per row count
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for layer in range(len(engine.model.blocks)):
        torch.testing.assert_close(cg.k[layer], cw.k[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cg.v[layer], cw.v[layer], rtol=1e-5, atol=1e-5)


def test_graphed_mtp_and_batched_sequences_match(engine):
    """The MTP block's segment (its own pool), and two sequences' rows in one forward (each row
    over its own sequence's slots, through the device-side index)."""
    m = engine.model
    pools = m.new_pools(256, torch.float32)
    from runtime.kvpool import SeqKV

    def run(graphs):
        m.graphs = graphs
        try:
            a, b = SeqKV(pools[0], 128), SeqKV(pools[0], 128)
            ma = SeqKV(pools[1], 128)
            with torch.inference_mode():
                ha = m.forward(ids_for(engine, 18, 1), a, 0)
                m.forward(ids_for(engine, 33, 2), b, 0)  # b's pages follow a's: not consecutive with them
                outs = m.forward_batch([(ids_for(engine, 2, 3), a, 18), (ids_for(engine, 1, 4), b, 33)])
                z = m.mtp_forward(ha[:-1], ids_for(engine, 18, 1)[1:], ma, 0)
                z2 = m.mtp_forward(z[-1:], ids_for(engine, 1, 5), ma, 17)
            for c in (a, b, ma):
                c.release()
            return outs + [z, z2]
        finally:
            m.graphs = None

    g = GraphedLayers(m, capture=False)
    want, got = run(None), run(g)
    assert any(k[0] == "mtp " for k in g.segments) and any(k[2] == 3 for k in g.segments)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_a_row_gets_the_same_values_whatever_the_row_count(engine):
    """A verify batch's row against the plain step at its position, both through segments."""
    g = GraphedLayers(engine.model, capture=False)
    plain, _ = decode(engine, g, [1, 1, 1], seed=7)
    batch, _ = decode(engine, g, [3], seed=7)
    torch.testing.assert_close(batch[0], torch.cat(plain), rtol=1e-5, atol=1e-5)


def segments(engine, rows=(1, 3)):
    g = GraphedLayers(engine.model, capture=False)
    decode(engine, g, list(rows))
    return list(g.segments.values())


def test_segments_neither_sync_nor_allocate(engine):
    segs = segments(engine)
    assert segs
    for seg in segs:
        c = check_capturable(seg.run)
        assert len(c.ops) > 30  # the whole segment ran under the check
        assert c.syncs == [], c.syncs
        assert c.allocs == [], c.allocs


def test_the_check_fails_on_bad_segments(engine):
    seg = segments(engine, (1,))[0]

    def syncs():
        seg.run()
        seg.res.add_(seg.w.sum().item())  # a value read back by the host

    def allocates():
        seg.run()
        seg.res.copy_(seg.x_in + 1)  # a new tensor each call

    def data_dependent():
        seg.run()
        seg.res.view(-1)[:1].copy_(torch.nonzero(seg.ids).shape[0])

    c = check_capturable(syncs)
    # .item() shows as aten.item under inference mode, as _local_scalar_dense outside it
    assert any("item" in op or "_local_scalar_dense" in op for op in c.syncs)
    assert c.allocs  # sum() makes a tensor too
    c = check_capturable(allocates)
    assert c.syncs == [] and any("add" in op for op in c.allocs)
    c = check_capturable(data_dependent)
    assert any("nonzero" in op for op in c.syncs)
    with CaptureCheck() as c:
        torch.zeros(3)
    assert c.allocs


def test_graphs_are_off_by_default_and_without_cuda(engine):
    assert engine.model.graphs is None and engine.load_report.cuda_graphs == ""
    g, why = GraphedLayers.build(engine.model, env="1")
    assert g is None and "not CUDA" in why
    g, why = GraphedLayers.build(engine.model, env="0")
    assert g is None and why == ""


def test_segment_runs_as_replay_without_a_graph(engine):
    """replay() without capture is run(): what the CPU path and the tests use."""
    seg = segments(engine, (1,))[0]
    assert isinstance(seg, Segment) and seg.graph is None
    with torch.inference_mode():
        seg.replay()
        res = seg.res.clone()
        seg.run()
    assert torch.equal(res, seg.res)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA capture and replay need a GPU")
def test_captured_segments_match_the_eager_path_on_cuda(make_test_model):
    """On a GPU (benchmarks/gpu_check.sh, stage graphs): captured graphs against the eager path,
    and the capture check on CUDA tensors."""
    eng = runtime.load(make_test_model().gguf_path, progress=False, gpu="cuda:0")
    m = eng.model
    assert any(GraphedLayers.eligible(m, b) for b in m.blocks)
    g = GraphedLayers(m, capture=True)
    rows = [1, 2, 3, 4, 1]
    want, _ = decode(eng, None, rows)
    got, _ = decode(eng, g, rows)
    assert g.segments and all(s.graph is not None for s in g.segments.values())
    for a, b in zip(want, got):
        torch.testing.assert_close(b.float().cpu(), a.float().cpu(), rtol=1e-4, atol=1e-4)
    for seg in g.segments.values():
        c = check_capturable(seg.run)
        assert c.syncs == [] and c.allocs == [], (c.syncs, c.allocs)
