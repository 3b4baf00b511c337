"""Batched decoding: the scheduler over ids (no model), the paged KV pool, and on the demo model
every sequence of a batch decoded exactly as it is alone (bit for bit, CPU float32), with and
without MTP, with admissions, finishes, cancellations and preemptions on different steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from runtime.batch import Batch, Scheduler
from runtime.engine import _Run
from runtime.kvpool import KVPool, PoolFull, SeqKV

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()",
    "class Stack:",
    "    for key, value in sorted(items.items()):",
    "x = [",
    "def quicksort(items):\n    if len(items) <= 1:\n        return items",
    "class Point:\n    def __init__(self, x, y):",
    "with open(path) as f:",
]


# ---- the scheduler alone ------------------------------------------------------------------------

def test_scheduler_admits_in_order_within_the_limit():
    s = Scheduler(max_running=2)
    for i in range(4):
        s.submit(i)
    assert s.admit(lambda sid: True) == [0, 1]
    assert s.admit(lambda sid: True) == []  # full
    s.remove(0)
    assert s.admit(lambda sid: True) == [2]
    assert s.running == [1, 2] and list(s.waiting) == [3]


def test_scheduler_does_not_let_later_ids_overtake_one_that_does_not_fit():
    s = Scheduler(max_running=8)
    for i in range(3):
        s.submit(i)
    assert s.admit(lambda sid: sid != 0) == []
    assert s.admit(lambda sid: True) == [0, 1, 2]


def test_scheduler_preempts_newest_first_and_readmits_them_first():
    s = Scheduler(max_running=8)
    for i in range(4):
        s.submit(i)
    s.admit(lambda sid: True)
    at_boundary = {0: True, 1: True, 2: False, 3: True}
    assert s.victims(1, at_boundary.get) == [3]  # 2 is mid-step; 0 is older than 1
    assert s.victims(0, at_boundary.get) == [3, 1]
    s.preempt(3)
    s.submit(9)
    assert s.running == [0, 1, 2] and list(s.waiting) == [3, 9]
    assert s.admit(lambda sid: True) == [3, 9]
    s.remove(9)
    s.remove(42)  # unknown ids are ignored
    assert s.running == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        Scheduler(0)


# ---- the pool -----------------------------------------------------------------------------------

def test_pool_pages_map_slots_and_go_back():
    pool = KVPool(["cpu", "cpu"], 64, 2, 4, torch.float32, page_size=8)
    assert pool.n_pages == 8 and pool.free_pages == 8
    a, b = SeqKV(pool, 40), SeqKV(pool, 40)
    a.reserve(10)
    b.reserve(3)
    a.reserve(17)
    assert a.pages == [0, 1, 3] and b.pages == [2]
    assert list(a.slot_map[:17]) == list(range(16)) + [24] and a.slot_map[24] == -1
    # writes by logical slot; reads gather when pages are not consecutive, views when they are
    k = torch.arange(17 * 8, dtype=torch.float32).reshape(17, 2, 4)
    a.write(1, 0, k, -k)
    a.length = 17
    ka, va = a.read(1, 17)
    assert torch.equal(ka, k) and torch.equal(va, -k)
    assert torch.equal(pool.k[1][24], k[16])
    b.write(0, 0, k[:3], k[:3])
    assert a.read(0, 16)[0].data_ptr() == pool.k[0].data_ptr()  # slots 0..15: a view
    a.truncate(9)  # rolled back: pages past slot 8 go back
    assert a.pages == [0, 1] and pool.free_pages == 5
    with pytest.raises(PoolFull):
        SeqKV(pool, 64).reserve(64)
    a.release()
    b.release()
    assert pool.free_pages == 8
    with pytest.raises(ValueError):
        pool.release([0])
    with pytest.raises(ValueError):
        a.reserve(41)  # past its context


def test_pool_shared_pages_are_freed_by_their_last_holder():
    pool = KVPool(["cpu"], 32, 1, 2, torch.float32, page_size=8)
    pages = pool.alloc(2)
    pool.share(pages)
    pool.release(pages)
    assert pool.free_pages == 2
    pool.release(pages)
    assert pool.free_pages == 4


# ---- the demo model -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eng():
    e = runtime.load(progress=False)
    assert e.model.fused is not None  # the CPU float32 path whose rows keep their bits in a batch
    return e


GREEDY = dict(temperature=0.0, repeat_penalty=1.0)


def alone(eng, prompts, **kw):
    return [eng.generate(p, **kw).tokens for p in prompts]


@pytest.mark.parametrize("mtp", [None, 1, 3])
def test_a_batch_gives_each_sequence_its_lone_output(eng, mtp):
    spec = dict(mtp=False) if mtp is None else dict(mtp=True, draft_max=mtp, adaptive=False)
    for n in (2, 5, 8):
        kw = dict(max_tokens=24, **GREEDY, **spec)
        got = [r.tokens for r in eng.generate_batch(PROMPTS[:n], **kw)]
        bs = eng.last_batch.stats
        assert bs.sequences / bs.steps > 1.5  # the forwards really took several sequences
        assert got == alone(eng, PROMPTS[:n], **kw), n


def test_admissions_finishes_and_mixed_settings_on_different_steps(eng):
    # different lengths, MTP on for some, a batch limit of 3: sequences start and end at
    # different steps, and the plain ones' rows share forwards with the drafting ones' verifies
    settings = [dict(max_tokens=6 + 5 * i, **({"mtp": True, "draft_max": 1 + i % 3, "adaptive": False}
                                              if i % 2 else {"mtp": False})) for i in range(7)]
    got = eng.generate_batch(PROMPTS[:7], settings=settings, max_batch=3, **GREEDY)
    for p, s, r in zip(PROMPTS, settings, got):
        assert r.tokens == eng.generate(p, **s, **GREEDY).tokens
    assert max(len(r.tokens) for r in got) == 36


def test_seeded_sampling_in_a_batch_equals_sampling_alone(eng):
    kw = dict(max_tokens=20, temperature=0.9, top_p=0.95, repeat_penalty=1.0)
    settings = [dict(seed=10 + i, mtp=bool(i % 2), draft_max=2, adaptive=False) for i in range(4)]
    got = eng.generate_batch(PROMPTS[:4], settings=settings, **kw)
    for p, s, r in zip(PROMPTS, settings, got):
        assert r.tokens == eng.generate(p, **s, **kw).tokens


def test_a_cancelled_sequence_leaves_the_others_exact_and_gives_its_pages_back(eng):
    kw = dict(max_tokens=20, mtp=True, draft_max=2, adaptive=False, **GREEDY)
    runs = [_Run(eng, p, **kw) for p in PROMPTS[:4]]
    b = Batch(eng)
    for r in runs:
        b.add(r)
    main, mtp = eng.pools
    free0 = (main.free_pages, mtp.free_pages)
    for _ in range(9):
        b.round()
    b.cancel(runs[1])
    assert runs[1].done and runs[1].result.finish_reason == "cancelled"
    b.run_to_end()
    want = alone(eng, PROMPTS[:4], **kw)
    assert [runs[i].result.tokens for i in (0, 2, 3)] == [want[i] for i in (0, 2, 3)]
    assert runs[1].result.tokens == want[1][:len(runs[1].result.tokens)]
    assert (main.free_pages, mtp.free_pages) == free0 == (main.n_pages, mtp.n_pages)


def test_caches_after_a_batch_equal_the_caches_of_the_sequence_alone(eng):
    kw = dict(max_tokens=12, mtp=True, draft_max=3, adaptive=False, **GREEDY)
    runs = [_Run(eng, p, **kw) for p in PROMPTS[:3]]
    b = Batch(eng)
    for r in runs:
        r.keep_seq = True
        b.add(r)
    b.run_to_end()
    lone = _Run(eng, PROMPTS[2], **kw)
    lone.keep_seq = True
    for _ in lone:
        pass
    s, t = runs[2].seq, lone.seq
    assert s.tokens == t.tokens and s.cache.length == t.cache.length
    for a, c in zip(s.cache.k + s.cache.v, t.cache.k + t.cache.v):
        assert torch.equal(a, c)
    assert s.mtp_cache.length == t.mtp_cache.length
    for a, c in zip(s.mtp_cache.k + s.mtp_cache.v, t.mtp_cache.k + t.mtp_cache.v):
        assert torch.equal(a, c)
    for r in runs + [lone]:
        r.seq.release()


def test_the_pool_is_allocated_once_and_shared_by_the_batch(eng):
    # 8 sequences of context C/8 share a pool of C positions: the KV memory of one sequence of C
    C = 256
    one = runtime.Engine(eng.file, context=C, progress=False)
    e = runtime.Engine(eng.file, context=C // 8, kv_slots=C, progress=False)
    assert sum(p.nbytes for p in e.pools) <= sum(p.nbytes for p in one.pools)
    tensors = [t.data_ptr() for p in e.pools for t in p.k + p.v]
    res = e.generate_batch(PROMPTS, max_tokens=16, **GREEDY, mtp=True, draft_max=2, adaptive=False)
    assert all(len(r.tokens) == 16 or r.finish_reason in ("eos", "context") for r in res)
    assert e.last_batch.stats.sequences / e.last_batch.stats.steps > 2
    assert [t.data_ptr() for p in e.pools for t in p.k + p.v] == tensors  # no KV allocated since
    assert all(p.free_pages == p.n_pages for p in e.pools)


def test_adaptive_batches_stay_exact_and_give_back_the_mtp_pages_of_sequences_that_stop_drafting(eng):
    """The batch chooses one draft length per step for its adaptive sequences; where drafting
    loses (the demo on the CPU) the policy turns MTP off mid-sequence, and each such sequence's MTP
    pages must go back at once (they once leaked, and a full MTP pool then stalled admission)."""
    e = runtime.Engine(eng.file, context=128, kv_slots=512, progress=False)
    kw = dict(max_tokens=40, **GREEDY)
    ref = alone(e, PROMPTS, mtp=False, **kw)
    for _ in range(4):
        res = e.generate_batch(PROMPTS, mtp=True, **kw)
        assert [r.tokens for r in res] == ref
        assert all(p.free_pages == p.n_pages for p in e.pools)
    policies = [p for key, p in e._policies.items() if len(key) == 3]  # the batch sizes' policies
    assert any(sum(p.chosen.values()) > 0 for p in policies)  # the batch chose the lengths
    # a sequence told to stop drafting mid-run gives its MTP pages back at once
    b = e.batch()
    runs = [b.submit(p, mtp=True, draft_max=2, adaptive=False, **kw) for p in PROMPTS[:3]]
    while not all(r.seq is not None and r.seq.mtp_cache is not None and r.seq.mtp_cache.length > 4
                  for r in runs):
        b.round()
    while b.states[b._ids[id(runs[0])]].gen is not None:  # to a step boundary
        b.round()
    mtp_pool = e.pools[1]
    held, free = len(runs[0].seq.mtp_cache.pages), mtp_pool.free_pages
    runs[0].stop_drafting()
    assert mtp_pool.free_pages == free + held
    b.run_to_end()
    assert [r.result.tokens for r in runs] == ref[:3]
    assert all(p.free_pages == p.n_pages for p in e.pools)


def test_a_batch_that_cannot_admit_into_an_empty_pool_says_so(eng):
    e = runtime.Engine(eng.file, context=64, kv_slots=64, progress=False)
    b = e.batch()
    b.submit(PROMPTS[0], max_tokens=4, mtp=False, **GREEDY)
    e.pools[0]._free.clear()  # as if pages had leaked: nothing runs and nothing fits
    with pytest.raises(runtime.NextnError, match="KV pool"):
        b.run_to_end()


def test_a_short_pool_preempts_and_every_sequence_still_finishes(eng):
    e = runtime.Engine(eng.file, context=64, kv_slots=64, progress=False)
    kw = dict(max_tokens=30, mtp=False, **GREEDY)
    res = e.generate_batch(PROMPTS[:4], **kw)
    assert e.last_batch.preemptions > 0
    for p, r in zip(PROMPTS, res):
        assert len(r.tokens) == 30 or r.finish_reason in ("eos", "context")
    assert e.pools[0].free_pages == e.pools[0].n_pages


def test_the_torch_path_batches_too(eng):
    """Where the fused path is off (a GPU runs the torch path as one batched forward), a batched
    forward gives each sequence its lone logits up to rounding (bits are promised only on the
    fused CPU path)."""
    m = eng.model
    fused, m.fused = m.fused, None
    try:
        seqs = [eng.new_sequence(runtime.sampling.SamplingParams(), use_mtp=False) for _ in range(3)]
        ids = [eng.tokenize(p) for p in PROMPTS[:3]]
        for s, t in zip(seqs, ids):
            s.prefill(t)
        items = [(torch.tensor([5 + i, 9]), s.cache, s.cache.length) for i, s in enumerate(seqs)]
        hs = m.forward_batch(items)
        for (tok, c, start), h, s in zip(items, hs, seqs):
            lone = eng.new_sequence(runtime.sampling.SamplingParams(), use_mtp=False)
            lone.prefill(s.tokens)
            ref = m.forward(tok, lone.cache, start)
            assert torch.allclose(h, ref, atol=1e-5, rtol=1e-5)
            lone.release()
        for s in seqs:
            s.release()
    finally:
        m.fused = fused


def test_bad_slot_maps_are_refused_before_the_kernels_read_them(eng):
    stack = eng.model.fused.main
    pool = eng.pools[0]
    kv = eng.model.fused._view(stack, pool)
    x = np.zeros((1, eng.cfg.hidden), np.float32)
    bad = np.full(8, pool.n_slots + 5, dtype=np.int32)
    with pytest.raises(ValueError, match="out of range"):
        stack.forward_rows(x, kv, np.array([0]), np.array([3]), [bad])
    with pytest.raises(ValueError, match="slot map"):
        stack.forward_rows(x, kv, np.array([0]), np.array([9]), [bad])
    with pytest.raises(ValueError, match="out of range"):
        stack.forward_rows(x, kv, np.array([10**9]), np.array([0]), [np.zeros(1, np.int32)])


def test_a_shared_prompt_prefix_is_reused_and_gives_the_lone_output(eng):
    e = runtime.Engine(eng.file, progress=False)
    e.prefill_chunk = 8  # every prefill chunk on the fused path: a prefix's KV has the same bits
    system = "# utilities for parsing configuration files and command lines\nimport os\nimport sys\n"
    prompts = [system + p for p in ("def main():", "class Config:", "def parse(argv):")]
    kw = dict(max_tokens=12, mtp=True, draft_max=2, adaptive=False, **GREEDY)
    want = [e.generate(p, **kw).tokens for p in prompts]
    assert not e.prefix_cache.entries  # off unless asked for
    first = e.generate_batch(prompts[:1], cache_prompt=True, **kw)[0]
    assert first.stats["cached_tokens"] == 0 and first.tokens == want[0]
    assert e.prefix_cache.entries  # its full pages stay for later prompts
    got = e.generate_batch(prompts, cache_prompt=True, **kw)
    n_sys = len(e.tokenize(system))
    for r, w in zip(got, want):
        assert r.tokens == w
        assert r.stats["cached_tokens"] >= (n_sys // 16) * 16 > 0
    # the pool runs short: cached pages are evicted, not an error
    main, mtp = e.pools
    hold = [e.new_sequence(runtime.sampling.SamplingParams(), use_mtp=False) for _ in range(1)]
    hold[0].cache.reserve(main.n_slots)
    assert not e.prefix_cache.entries
    hold[0].release()
    assert main.free_pages == main.n_pages and mtp.free_pages == mtp.n_pages
