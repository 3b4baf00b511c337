"""The fused CPU blocks (runtime/fused.py, cpu_kernels/block_impl.h): every block of a decode-sized
forward in one C call. The torch path is the reference: the same logits to float32 rounding, the
same activation accounting; a verify row gets exactly a plain step's bits, so greedy MTP output is
plain greedy output; bad descriptors give exceptions, not crashes."""

import numpy as np
import pytest
import torch

import runtime
from runtime.linear import ROWWISE_MAX
from runtime.sampling import SamplingParams

QUANT = {"default": "Q4_K", "attn_v": "Q6_K", "ffn_down": "Q5_0", "ffn_down_exps": "Q5_0", "token_embd": "Q8_0",
         "output": "Q6_K"}
SPECS = {
    # F32 weights, QK-norm, attention bias, 1 dense block; a head size that is not a multiple of 8
    # (attention's scalar loop on every path)
    "f32": dict(types="F32", head_dim=20),
    # quantized everything, no QK-norm and no bias, scaled un-normalised router with a selection bias
    "quant": dict(types=QUANT, match_hf=True, qk_norm=False, attn_bias=False, routed_scaling=2.5, norm_topk=False,
                  selection_bias_scale=0.5, hidden=256, expert_ffn=256, dense_ffn=256, n_heads=4, head_dim=64,
                  n_kv_heads=2, seed=5),
    # F16 (the demo's dense type), no dense block, full rotary, MHA
    "f16": dict(types={"default": "F16", "ffn_gate_exps": "Q8_0", "ffn_up_exps": "Q8_0", "ffn_down_exps": "Q8_0"},
                n_dense=0, partial_rotary=1.0, n_kv_heads=4, hidden=128, head_dim=32, seed=3),
}


def ids_for(eng, n, seed=0):
    return np.random.default_rng(seed).integers(0, eng.cfg.n_vocab, n).tolist()


@pytest.fixture(scope="module", params=list(SPECS))
def engine(request, make_test_model):
    tm = make_test_model(**SPECS[request.param])
    eng = runtime.load(tm.gguf_path, progress=False, gpu="cpu")
    assert eng.load_report.fused_blocks == "on", eng.load_report.fused_blocks
    return eng


def torch_path(eng, fn):
    fused, eng.model.fused = eng.model.fused, None
    try:
        return fn()
    finally:
        eng.model.fused = fused


def test_fused_logits_match_the_torch_path(engine):
    ids = ids_for(engine, ROWWISE_MAX, seed=1)  # one forward of 17 rows: the fused path
    a = engine.logits(ids)
    b = torch_path(engine, lambda: engine.logits(ids))
    scale = np.abs(b).max()
    # float32 summation order only, except where an 8-bit activation rounding lands on the other side
    # of a boundary (quantized weights): then a row moves by ~1e-3 of the largest logit
    assert np.median(np.abs(a - b).max(1)) < 1e-5 * scale
    assert np.abs(a - b).max() < 2e-2 * scale
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9
    if engine.has_mtp:
        m = engine.mtp_logits(ids)
        n = torch_path(engine, lambda: engine.mtp_logits(ids))
        assert np.median(np.abs(m - n).max(1)) < 1e-5 * np.abs(n).max()


def test_fused_decode_steps_match_the_torch_path(engine):
    """A 40-token prompt prefilled by the torch path (a chunk of more than ROWWISE_MAX rows), then
    one-row steps: fused against torch over a growing cache."""
    ids = ids_for(engine, 48, seed=2)
    m = engine.model

    def steps():
        with torch.inference_mode():
            seq = engine.new_sequence(SamplingParams(), use_mtp=False)
            seq.prefill(ids[:40])
            return torch.stack([m.logits(m.forward(torch.tensor([ids[p]]), seq.cache, p))[0]
                                for p in range(40, 48)]).numpy()

    a, b = steps(), torch_path(engine, steps)
    assert np.median(np.abs(a - b).max(1)) < 1e-4 * np.abs(b).max()


def test_verify_rows_equal_plain_steps_bit_for_bit(engine):
    """Rows in one fused call of T rows get the bits of T one-row calls (main model and MTP)."""
    m = engine.model
    ids = ids_for(engine, 60, seed=3)
    n0 = 30
    def prefilled():
        seq = engine.new_sequence(SamplingParams(), use_mtp=True)
        seq.prefill(ids[:n0])
        m.mtp_forward(seq.owed_h, torch.tensor([ids[n0]]), seq.mtp_cache, n0 - 1)  # the MTP row owed
        return seq

    with torch.inference_mode():
        plain = prefilled()
        hs = [m.forward(torch.tensor([ids[p]]), plain.cache, p) for p in range(n0, n0 + ROWWISE_MAX)]
        zs = [m.mtp_forward(hs[t], torch.tensor([ids[n0 + t + 1]]), plain.mtp_cache, n0 + t) for t in range(8)]
        for T in (2, 3, 5, 8, ROWWISE_MAX):
            seq = prefilled()
            h = m.forward(torch.tensor(ids[n0:n0 + T]), seq.cache, n0)
            for t in range(T):
                assert torch.equal(h[t], hs[t][0]), f"main T={T}, row {t}"
            if T <= 8:
                z = m.mtp_forward(h[:T], torch.tensor(ids[n0 + 1:n0 + T + 1]), seq.mtp_cache, n0)
                for t in range(T):
                    assert torch.equal(z[t], zs[t][0]), f"mtp T={T}, row {t}"


@pytest.mark.parametrize("draft_max", [1, 2, 3])
def test_greedy_mtp_equals_plain_greedy(engine, draft_max):
    for seed in range(2):
        p = ids_for(engine, 12, seed=10 + seed)
        plain = engine.generate(p, max_tokens=40, mtp=False)
        spec = engine.generate(p, max_tokens=40, mtp=True, draft_max=draft_max, adaptive=False)
        assert spec.tokens == plain.tokens
        assert spec.stats["drafted"] > 0


def test_fused_accounting_matches_the_torch_path(engine):
    p = ids_for(engine, 10, seed=4)
    a = engine.generate(p, max_tokens=12, mtp=False)
    b = torch_path(engine, lambda: engine.generate(p, max_tokens=12, mtp=False))
    assert a.stats["activation_bytes_moved"] == b.stats["activation_bytes_moved"] > 0
    assert a.stats["weight_bytes_moved"] == 0
    assert a.stats["cpu_busy_s"] > 0


def test_demo_model_runs_fused_and_mtp_is_lossless():
    eng = runtime.load(progress=False)
    assert eng.load_report.fused_blocks == "on"
    for prompt in ("def fibonacci(n):", "class Stack:"):
        plain = eng.generate(prompt, max_tokens=48, mtp=False)
        for k in (1, 3):
            assert eng.generate(prompt, max_tokens=48, mtp=True, draft_max=k, adaptive=False).tokens == plain.tokens


def test_demo_decode_is_a_few_host_calls_per_token():
    """Host calls per decoded token (torch ops reaching the dispatcher plus C kernel calls):
    ~1,500 on the torch path, at most 60 fused (benchmarks/host_calls.py prints the table)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from host_calls import calls_per_token

    eng = runtime.load(progress=False)
    for kw in (dict(mtp=False), dict(mtp=True, draft_max=3, adaptive=False)):
        # the decoding machinery alone: the demo plan's repetition penalty adds a few ops per row
        ops, kc, n = calls_per_token(eng, "def fibonacci(n):", 32, repeat_penalty=1.0, **kw)
        assert n >= 20
        assert ops + kc <= 60, (kw, ops, kc)


def test_fused_is_off_where_a_side_is_not_float32_cpu(make_test_model):
    tm = make_test_model(**SPECS["f32"])
    eng = runtime.load(tm.gguf_path, progress=False, gpu="cpu", gpu_dtype="bfloat16")
    assert eng.model.fused is None and "float32" in eng.load_report.fused_blocks
    eng = runtime.load(tm.gguf_path, progress=False, gpu="cpu", use_kernels=False)
    assert eng.model.fused is None and "kernels" in eng.load_report.fused_blocks
    p = ids_for(eng, 8)
    assert eng.generate(p, max_tokens=8, mtp=True, draft_max=2, adaptive=False).tokens == \
        eng.generate(p, max_tokens=8, mtp=False).tokens


def test_block_stack_rejects_bad_input(engine):
    from cpu_kernels.blocks import BlockStack

    f = engine.model.fused
    stack = f.main
    cache = engine.new_sequence(SamplingParams(), use_mtp=False).cache
    kv = stack.cache(cache.pool.k, cache.pool.v)
    H = engine.cfg.hidden
    with pytest.raises(ValueError, match="float32"):
        stack.forward(np.zeros((1, H), np.float64), kv, 0, 0)
    with pytest.raises(ValueError, match="exceed"):
        stack.forward(np.zeros((2, H), np.float32), kv, 0, kv.length - 1)
    with pytest.raises(ValueError, match="exceed"):
        stack.forward(np.zeros((1, H), np.float32), kv, 10**9, 0)
    with pytest.raises(ValueError):
        stack.cache(cache.pool.k[:1], cache.pool.v[:1])
    with pytest.raises(ValueError):
        BlockStack(stack.dims, [])
    # a descriptor damaged after validation: C checks again before it reads anything
    saved = stack._blocks[0].qkv.n_parts
    stack._blocks[0].qkv.n_parts = 9
    try:
        with pytest.raises(ValueError, match="inconsistent"):
            stack.forward(np.zeros((1, H), np.float32), kv, 0, 0)
    finally:
        stack._blocks[0].qkv.n_parts = saved
    stack.forward(np.zeros((1, H), np.float32), kv, 0, 0)


def _restorer(pool):
    """A function that puts the KV pool's contents back as they are now (each call starts from
    the same cache)."""
    k0, v0 = [k.clone() for k in pool.k], [v.clone() for v in pool.v]

    def restore():
        with torch.inference_mode():
            for k, v, a, b in zip(pool.k, pool.v, k0, v0):
                k.copy_(a)
                v.copy_(b)
    return restore


@pytest.mark.parametrize("kv", ["float32", "float16"])
@pytest.mark.parametrize("heads", [(8, 1, 32), (16, 4, 128)], ids=["mqa-in-place", "gqa-packed"])
def test_gqa_attention_gives_each_row_its_bits_whatever_the_units(make_test_model, heads, kv):
    """Grouped attention at ~2000 positions, where the fused attention groups rows and heads into
    units (by row count, sequences and threads) so a kv group's K and V are read once per unit:
    every row of a call gets the bits of one-row calls on one thread, with rows of two sequences in
    one call and 1, 2 or 3 threads. 8 query heads on one kv head of 32 (K/V rows read in place;
    units of 8, 4 or 3 heads, runs of at most 6 rows), 16 on 4 of 128 (rows copied block by
    block, as at GLM-4.5-Air's 8 x 128). An F16 cache's rows are converted block by block in both."""
    n_heads, n_kv, hd = heads
    tm = make_test_model(hidden=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd, context_length=4608,
                         n_nextn=0, seed=7)
    eng = runtime.load(tm.gguf_path, progress=False, gpu="cpu")
    m = eng.model
    stack = m.fused.main
    with torch.inference_mode():
        cache = m.new_cache(4608, getattr(torch, kv))
        g = torch.Generator().manual_seed(0)
        for t in cache.pool.k + cache.pool.v:
            t.copy_(torch.randn(t.shape, generator=g))
    kv = stack.cache(cache.pool.k, cache.pool.v)
    rng = np.random.default_rng(0)
    perm = rng.permutation(kv.length).astype(np.int32)
    maps = [perm[:kv.length // 2].copy(), perm[kv.length // 2:].copy()]  # two sequences' slots, apart
    # rows: 9 of sequence 0 at its slots 2001.., 3 of sequence 1 at 1500..
    rows = [(0, 2001 + i) for i in range(9)] + [(1, 1500 + i) for i in range(3)]
    x = rng.standard_normal((len(rows), eng.cfg.hidden)).astype(np.float32)
    reset = _restorer(cache.pool)

    def call(sel, threads):
        y = x[sel].copy()
        at = np.array([rows[i][1] for i in sel])
        stack.forward_rows(y, kv, at, at, [maps[rows[i][0]] for i in sel], threads)
        return y

    reset()
    alone = [call([i], 1)[0] for i in range(len(rows))]  # in order: a row sees the K/V of those before it
    for threads in (1, 2, 3):
        reset()
        y = call(list(range(len(rows))), threads)
        for i in range(len(rows)):
            assert np.array_equal(y[i], alone[i]), (threads, i)


@pytest.mark.parametrize("kv", ["float32", "float16"])
@pytest.mark.parametrize("heads", [(8, 1, 32), (16, 4, 128)], ids=["mqa-in-place", "gqa-packed"])
def test_grouped_attention_matches_the_torch_path(make_test_model, heads, kv):
    """The same shapes against the torch path: a 300-token prompt prefilled by it, then one-row
    steps and a 5-row verify-shaped call, fused against torch over the same cache (float32, or
    float16: both paths round the rows they write alike and compute on them in float32)."""
    n_heads, n_kv, hd = heads
    tm = make_test_model(hidden=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd, context_length=4608,
                         n_nextn=0, seed=7)
    eng = runtime.load(tm.gguf_path, progress=False, gpu="cpu", kv_cache=kv)
    assert eng.pools[0].k[0].dtype == getattr(torch, kv) and eng.pools[0].fusable
    m = eng.model
    ids = ids_for(eng, 312, seed=4)

    def steps():
        with torch.inference_mode():
            seq = eng.new_sequence(SamplingParams(), use_mtp=False)
            seq.prefill(ids[:300])
            one = [m.logits(m.forward(torch.tensor([ids[p]]), seq.cache, p))[0] for p in range(300, 306)]
            five = m.logits(m.forward(torch.tensor(ids[306:311]), seq.cache, 306))
            return torch.cat([torch.stack(one), five]).numpy()

    a, b = steps(), torch_path(eng, steps)
    assert np.abs(a - b).max() < 1e-4 * np.abs(b).max()


def test_long_context_attention_matches_the_torch_path(make_test_model):
    """16K positions, 8 heads on one kv head (on 2 threads a one-row step splits them into units of
    4): one-row and 3-row steps over a cache of random K/V, fused against the torch path from the
    same cache."""
    tm = make_test_model(hidden=64, n_layers=2, n_heads=8, n_kv_heads=1, head_dim=32, context_length=16512,
                         n_nextn=0, seed=7)
    eng = runtime.load(tm.gguf_path, progress=False, gpu="cpu", context=16512)
    m = eng.model
    L = 16400
    with torch.inference_mode():
        seq = eng.new_sequence(SamplingParams(), use_mtp=False)
        seq.cache.reserve(L + 8)
        g = torch.Generator().manual_seed(1)
        pool = seq.cache.pool
        for t in pool.k + pool.v:
            t.copy_(torch.randn(t.shape, generator=g))
    reset = _restorer(pool)

    def step():
        reset()
        with torch.inference_mode():
            seq.cache.length = L
            one = m.logits(m.forward(torch.tensor([5]), seq.cache, L))
            three = m.logits(m.forward(torch.tensor([6, 7, 8]), seq.cache, L + 1))
            return torch.cat([one, three]).numpy()

    a, b = step(), torch_path(eng, step)
    assert np.abs(a - b).max() < 1e-4 * np.abs(b).max()


def test_block_calls_from_several_threads_keep_their_own_scratch(make_test_model):
    """The fused call keeps its scratch per calling thread between calls (grown when a call needs
    more): calls of different sizes from several Python threads at once, each over its own cache,
    give the results of the same calls made one after another on one thread."""
    from concurrent.futures import ThreadPoolExecutor

    tm = make_test_model(hidden=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=32, context_length=2048,
                         n_nextn=0, seed=7)
    eng = runtime.load(tm.gguf_path, progress=False, gpu="cpu")
    m = eng.model
    stack = m.fused.main
    rng = np.random.default_rng(3)
    jobs = []
    for i in range(6):
        with torch.inference_mode():
            cache = m.new_cache(2048, torch.float32)
            for t in cache.pool.k + cache.pool.v:
                t.copy_(torch.from_numpy(rng.standard_normal(t.shape).astype(np.float32)))
        kv = stack.cache(cache.pool.k, cache.pool.v)
        L, T = (100, 1500, 40, 1900, 7, 800)[i], (1, 3, 5, 2, 1, 4)[i]  # small and large scratch in turn
        jobs.append((kv, L, T, rng.standard_normal((T, eng.cfg.hidden)).astype(np.float32), _restorer(cache.pool)))

    def call(job):
        kv, L, T, x, _ = job
        y = x.copy()
        at = np.arange(L, L + T)
        for _ in range(3):  # the same rows again over the K/V they wrote: the same result
            z = y.copy()
            stack.forward_rows(z, kv, at, at, [kv.identity()] * T, 1)
        return z

    want = [call(j) for j in jobs]
    for j in jobs:
        j[4]()
    with ThreadPoolExecutor(3) as ex:
        got = list(ex.map(call, jobs))
    for i, g in enumerate(got):
        assert np.array_equal(g, want[i % len(jobs)]), i
