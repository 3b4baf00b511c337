"""MTP (nextn) self-speculative decoding: parity of the layer, lossless greedy output, an
unchanged sampling distribution, acceptance bookkeeping and cache state."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

import runtime
from runtime.errors import NextnError, UnsupportedError
from runtime.sampling import SamplingParams
from runtime.testmodel import TestModelSpec, build_hf_model, write_gguf


def prompt(n, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


# ---- models ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_engine(test_model):
    return runtime.load(test_model.gguf_path, progress=False, use_kernels=False)


@pytest.fixture(scope="module")
def copy_model_path(tmp_path_factory):
    """A model whose MTP layer reproduces the main model's next-token prediction exactly.

    The main model is made a bigram model (every attention output and FFN/expert down projection
    is zero, so h_p = output_norm(embed(x_p))). The MTP layer's block is zeroed the same way, its
    eh_proj passes the enorm(embed) half through, and its shared_head_norm equals output_norm, so
    the MTP row (h_p, x_{p+1}) yields output_norm(embed(x_{p+1})): the main model's prediction
    after x_{p+1}. Drafts chained from it are right too, so acceptance must be ~100%."""
    spec = TestModelSpec(seed=7, init_std=0.3)
    model, mtp, tok = build_hf_model(spec)
    H = spec.hidden
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(mtp.named_parameters()):
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                p.zero_()
        layer = mtp.layers[0]
        layer.eh_proj.weight.zero_()
        layer.eh_proj.weight[:, :H] = torch.eye(H)
        layer.enorm.weight.fill_(1.0)
        layer.post_norm.weight.copy_(model.model.norm.weight)
    path = tmp_path_factory.mktemp("copymodel") / "copy.gguf"
    write_gguf(model, mtp, tok, spec, path)
    return path


@pytest.fixture(scope="module")
def copy_engine(copy_model_path):
    return runtime.load(copy_model_path, progress=False, use_kernels=False)


# ---- the layer ------------------------------------------------------------------------------------

@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("n", [2, 9, 150])
def test_mtp_logits_match_transformers(make_test_model, qk_norm, n):
    tm = make_test_model(qk_norm=qk_norm)
    eng = runtime.load(tm.gguf_path, progress=False, use_kernels=False)
    ids = prompt(n, eng.cfg.n_vocab, seed=n)
    got, want = eng.mtp_logits(ids), tm.mtp_logits(ids)
    assert got.shape == want.shape == (n - 1, eng.cfg.n_vocab)
    assert np.abs(got - want).max() <= 1e-4


def test_mtp_logits_with_own_embed_and_head_omitted(make_test_model):
    tm = make_test_model(nextn_embed_head="omit")
    eng = runtime.load(tm.gguf_path, progress=False, use_kernels=False)
    ids = prompt(20, eng.cfg.n_vocab, seed=3)
    assert np.abs(eng.mtp_logits(ids) - tm.mtp_logits(ids)).max() <= 1e-4
    assert eng.load_report.mtp_shares_embed and eng.load_report.mtp_shares_head


def test_copy_model_mtp_predicts_the_main_model(copy_engine):
    ids = prompt(30, copy_engine.cfg.n_vocab, seed=5)
    main = copy_engine.logits(ids)
    mtp = copy_engine.mtp_logits(ids)
    # MTP row p (from ids[p+1]) predicts what the main model predicts at p+1.
    assert (mtp.argmax(-1) == main[1:].argmax(-1)).mean() == 1.0


# ---- lossless greedy ---------------------------------------------------------------------------

@pytest.mark.parametrize("draft_max", [1, 2, 3, 4])
@pytest.mark.parametrize("p_min", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("n", [1, 7, 300])
def test_greedy_mtp_equals_plain_greedy(random_engine, copy_engine, draft_max, p_min, n):
    for eng in (random_engine, copy_engine):
        ids = prompt(n, eng.cfg.n_vocab, seed=n + draft_max)
        plain = eng.generate(ids, max_tokens=24, mtp=False)
        spec = eng.generate(ids, max_tokens=24, mtp=True, draft_max=draft_max, p_min=p_min,
                            adaptive=False)
        assert spec.tokens == plain.tokens
        assert spec.text == plain.text
        assert spec.stats["drafted"] > 0


def test_prompt_ending_on_chunk_boundary(copy_engine, random_engine):
    for eng in (copy_engine, random_engine):
        saved = eng.prefill_chunk
        eng.prefill_chunk = 16
        try:
            for n in (16, 32, 33):
                ids = prompt(n, eng.cfg.n_vocab, seed=n)
                plain = eng.generate(ids, max_tokens=20, mtp=False)
                spec = eng.generate(ids, max_tokens=20, mtp=True, draft_max=3, adaptive=False)
                assert spec.tokens == plain.tokens
        finally:
            eng.prefill_chunk = saved


@pytest.mark.parametrize("draft_ahead", [False, True])
@pytest.mark.parametrize("draft_max", [1, 3, 4])
def test_generation_hitting_context_limit(copy_model_path, draft_max, draft_ahead):
    eng = runtime.load(copy_model_path, progress=False, use_kernels=False, context=48)
    ids = prompt(37, eng.cfg.n_vocab, seed=1)
    plain = eng.generate(ids, max_tokens=100, mtp=False)
    spec = eng.generate(ids, max_tokens=100, mtp=True, draft_max=draft_max, adaptive=False,
                        draft_ahead=draft_ahead)
    assert plain.finish_reason == spec.finish_reason == "context"
    assert spec.tokens == plain.tokens
    assert len(ids) + len(plain.tokens) == 48 + 1  # the last token needs no cache slot


def test_stop_string_inside_accepted_run(copy_engine):
    eng = copy_engine
    ids = prompt(5, eng.cfg.n_vocab, seed=9)
    plain = eng.generate(ids, max_tokens=40, mtp=False)
    text = plain.text
    assert len(text) > 12
    stop = text[len(text) // 2:len(text) // 2 + 3]
    a = eng.generate(ids, max_tokens=40, mtp=False, stop=[stop])
    b = eng.generate(ids, max_tokens=40, mtp=True, draft_max=4, stop=[stop], adaptive=False)
    assert a.finish_reason == b.finish_reason == "stop"
    assert a.text == b.text == text[:text.find(stop)]
    assert b.stats["accepted"] > 0


def test_streamed_text_equals_generated_text(copy_engine):
    ids = prompt(4, copy_engine.cfg.n_vocab, seed=2)
    full = copy_engine.generate(ids, max_tokens=30, mtp=True, draft_max=3, adaptive=False)
    pieces = list(copy_engine.stream(ids, max_tokens=30, mtp=True, draft_max=3, adaptive=False))
    assert "".join(pieces) == full.text


# ---- acceptance bookkeeping ------------------------------------------------------------------------

def test_copy_model_acceptance_near_100_percent(copy_engine):
    ids = prompt(10, copy_engine.cfg.n_vocab, seed=4)
    for k in (1, 3):
        r = copy_engine.generate(ids, max_tokens=60, mtp=True, draft_max=k, adaptive=False)
        s = r.stats
        assert s["acceptance_rate"] >= 0.97, s
        assert s["accepted"] <= s["drafted"]
        assert s["mean_tokens_per_step"] >= 1 + 0.97 * k - 0.1
        # every emitted token is accounted for: accepted drafts + one main-model token per step,
        # plus the first token (from prefill); the last step may overshoot max_tokens
        assert s["accepted"] + s["verify_steps"] + 1 >= s["generated_tokens"]


def test_random_model_acceptance_is_low(random_engine):
    ids = prompt(10, random_engine.cfg.n_vocab, seed=4)
    s = random_engine.generate(ids, max_tokens=60, mtp=True, draft_max=1, adaptive=False).stats
    assert s["drafted"] >= 30
    assert s["acceptance_rate"] < 0.3


@pytest.mark.parametrize("draft_max", [1, 2, 3])
@pytest.mark.parametrize("p_min", [0.0, 0.5])
@pytest.mark.parametrize("overlap", [False, True])
def test_greedy_with_draft_ahead_equals_plain_greedy(random_engine, copy_engine, draft_max, p_min, overlap):
    """Draft-ahead (drafts for the next step made beside the verification's last experts, on the
    worker thread when overlapping) changes which drafts are verified, never the output."""
    for eng in (random_engine, copy_engine):
        old = eng.model.overlap
        eng.model.overlap = overlap
        try:
            used = 0
            for n in (1, 7, 12):
                ids = prompt(n, eng.cfg.n_vocab, seed=50 + n + draft_max)
                plain = eng.generate(ids, max_tokens=24, mtp=False)
                spec = eng.generate(ids, max_tokens=24, mtp=True, draft_max=draft_max, p_min=p_min,
                                    adaptive=False, draft_ahead=True)
                assert spec.tokens == plain.tokens
                assert spec.stats["draft_ahead"] and spec.stats["ahead_made"] > 0
                used += spec.stats["ahead_used"]
            if eng is copy_engine:  # drafts nearly always right: made-ahead drafts get used
                assert used > 0
        finally:
            eng.model.overlap = old


def test_draft_ahead_default_is_off(random_engine):
    ids = prompt(5, random_engine.cfg.n_vocab, seed=1)
    r = random_engine.generate(ids, max_tokens=8, mtp=True, adaptive=False)
    assert not r.stats["draft_ahead"] and r.stats["ahead_made"] == 0


def test_draft_ahead_with_oracle_full_acceptance(random_engine):
    """Oracle acceptance 1: every draft and every guess is the true token, so every other step
    verifies drafts made ahead (the one after drafts for itself), and the output is plain's."""
    from runtime.engine import _Run
    from runtime.draft_policy import Oracle

    eng = random_engine
    ids = prompt(6, eng.cfg.n_vocab, seed=2)
    plain = eng.generate(ids, max_tokens=30, mtp=False)
    run = _Run(eng, ids, max_tokens=30, mtp=True, draft_max=2, adaptive=False, draft_ahead=True,
               oracle=Oracle(ids + plain.tokens, 1.0, eng.cfg.n_vocab))
    for _ in run:
        pass
    st = run.result.stats
    assert run.result.tokens == plain.tokens
    assert st["acceptance_rate"] == 1.0
    assert st["ahead_used"] >= st["verify_steps"] // 2 - 1 and st["ahead_made"] >= st["ahead_used"]


# ---- cache state -------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("draft_ahead", [False, True])
def test_caches_hold_exactly_the_emitted_tokens(temperature, draft_ahead, make_test_model, copy_model_path):
    """After many accept/reject steps the main and MTP caches hold exactly the emitted positions,
    with the same contents as a fresh run over the emitted tokens."""
    eng = runtime.load(copy_model_path, progress=False, use_kernels=False)
    # perturb the MTP block so that drafts are sometimes rejected
    blk = eng.model.nextn.block
    g = torch.Generator().manual_seed(0)
    blk.attn.wo += 0.05 * torch.randn(blk.attn.wo.shape, generator=g).to(blk.attn.wo)
    params = SamplingParams(temperature=temperature, top_k=5, seed=3)
    with torch.inference_mode():
        seq = eng.new_sequence(params, use_mtp=True, draft_ahead=draft_ahead)
        pending = seq.prefill(prompt(11, eng.cfg.n_vocab, seed=8))
        outcomes = set()
        for i in range(25):
            out = seq.spec_step(pending, 1 + i % 4, 0.0)
            outcomes.add(len(out) - 1 < (1 + i % 4))
            pending = out[-1]
        assert outcomes == {True, False}, "need both full acceptance and rejections"
        if temperature == 0.0:  # (sampled main tokens rarely equal the greedy guess)
            assert (seq.stats.ahead_used > 0) == draft_ahead
        n = len(seq.tokens)
        assert seq.cache.length == n
        fresh = eng.new_sequence(params, use_mtp=True)
        fresh.prefill(seq.tokens)
        assert fresh.cache.length == n
        for a, b in zip(seq.cache.k + seq.cache.v, fresh.cache.k + fresh.cache.v):
            assert torch.allclose(a[:n], b[:n], atol=1e-5)
        # pay the owed MTP rows on both (one draft each): the MTP caches then cover slots 0..n-1
        seq.draft(pending, 1, 0.0)
        fresh.draft(pending, 1, 0.0)
        assert seq.mtp_cache.length == fresh.mtp_cache.length == n
        for a, b in zip(seq.mtp_cache.k + seq.mtp_cache.v, fresh.mtp_cache.k + fresh.mtp_cache.v):
            assert torch.allclose(a[:n], b[:n], atol=1e-5)


# ---- sampling ---------------------------------------------------------------------------------------

def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper quantile of chi-square(df) by Wilson-Hilferty; z = 3.09 is the 99.9% point."""
    a = 2.0 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def test_sampling_distribution_unchanged_by_mtp(copy_model_path):
    """Two-sample chi-square test of homogeneity on the first two generated tokens, N runs with
    and without MTP (different seeds). With the 99.9% critical value the test fails by chance in
    0.1% of runs (seeds are fixed, so in CI it either always passes or always fails)."""
    eng = runtime.load(copy_model_path, progress=False, use_kernels=False)
    ids = prompt(6, eng.cfg.n_vocab, seed=12)
    N = 400
    kw = dict(max_tokens=2, temperature=1.0, top_k=3)
    a = Counter(tuple(eng.generate(ids, seed=s, mtp=False, **kw).tokens) for s in range(N))
    b = Counter(tuple(eng.generate(ids, seed=10_000 + s, mtp=True, draft_max=2, adaptive=False, **kw).tokens)
                for s in range(N))
    _assert_same_distribution(a, b)


def _assert_same_distribution(a: Counter, b: Counter) -> None:
    """Chi-square test of homogeneity of two samples (counts per outcome) at the 99.9% point."""
    cells = sorted(set(a) | set(b))
    # merge rare cells (expected count < 5) into one
    common = [c for c in cells if a[c] + b[c] >= 10]
    rows = [[a[c] for c in common] + [sum(a[c] for c in cells if c not in common)],
            [b[c] for c in common] + [sum(b[c] for c in cells if c not in common)]]
    if rows[0][-1] + rows[1][-1] == 0:
        rows = [r[:-1] for r in rows]
    tot = [sum(r) for r in rows]
    stat = 0.0
    for j in range(len(rows[0])):
        col = rows[0][j] + rows[1][j]
        for i in range(2):
            e = tot[i] * col / (tot[0] + tot[1])
            stat += (rows[i][j] - e) ** 2 / e
    df = len(rows[0]) - 1
    assert df >= 3, "the test needs a spread-out distribution"
    assert stat < _chi2_critical(df), (stat, df, rows)


def test_sampling_distribution_unchanged_by_draft_ahead(copy_model_path):
    """Sampling with drafts made ahead: the 4th generated token (reached through a step that can
    verify drafts made during the previous verification) keeps plain sampling's distribution."""
    eng = runtime.load(copy_model_path, progress=False, use_kernels=False)
    ids = prompt(6, eng.cfg.n_vocab, seed=13)
    N = 400
    kw = dict(max_tokens=4, temperature=1.0, top_k=3)
    a = Counter(tuple(eng.generate(ids, seed=s, mtp=False, **kw).tokens[3:4]) for s in range(N))  # () at eos
    b, used = Counter(), 0
    for s in range(N):
        r = eng.generate(ids, seed=20_000 + s, mtp=True, draft_max=1, adaptive=False, draft_ahead=True, **kw)
        b[tuple(r.tokens[3:4])] += 1
        used += r.stats["ahead_used"]
    assert used > N // 10, "the runs must actually verify drafts made ahead"
    _assert_same_distribution(a, b)


def test_sampling_with_mtp_accepts_some_drafts(copy_engine):
    r = copy_engine.generate(prompt(6, copy_engine.cfg.n_vocab, seed=1), max_tokens=40, temperature=0.8,
                             seed=1, mtp=True, draft_max=2, adaptive=False)
    assert 0 < r.stats["accepted"] < r.stats["drafted"] or r.stats["acceptance_rate"] == 1.0


# ---- repetition penalty: the same processed distribution in plain and MTP decoding --------------------

def test_greedy_argmax_is_torchs_argmax():
    """The numpy argmax greedy decoding takes on CPU float32 rows picks what torch.argmax picks:
    the first of tied maxima, a NaN as the maximum; other dtypes and devices take torch's."""
    from runtime.sampling import argmax_token

    rng = np.random.default_rng(0)
    rows = [torch.from_numpy(rng.standard_normal(151552).astype(np.float32)) for _ in range(3)]
    rows += [torch.tensor([1.0, 3.0, 3.0, 2.0]), torch.tensor([1.0, float("nan"), 3.0, float("nan")]),
             torch.full((5,), float("-inf")), torch.tensor([float("nan"), 1.0]),
             torch.tensor([0.5, 2.0, 2.0]).to(torch.bfloat16), torch.randn(4, 9)[1]]
    for r in rows:
        assert argmax_token(r) == int(r.argmax(-1))


def test_repeat_penalty_rule():
    sp = SamplingParams(repeat_penalty=2.0, repeat_last_n=2)
    x = torch.tensor([4.0, -1.0, 3.0, 0.5])
    # tokens 0 and 1 are among the last two (token 2 is older): 4 / 2 and -1 * 2
    assert torch.equal(sp.penalise(x, [2, 0, 1]), torch.tensor([2.0, -2.0, 3.0, 0.5]))
    assert sp.sample(x, None, [2, 0, 1]) == 2 and sp.sample(x, None) == 0
    assert torch.equal(SamplingParams().penalise(x, [0, 1]), x)  # 1: off
    hot = SamplingParams(temperature=1.0, repeat_penalty=2.0).probs(x, [0])
    assert torch.allclose(hot, torch.softmax(torch.tensor([2.0, -1.0, 3.0, 0.5]), -1))
    for bad in (dict(repeat_penalty=0.0), dict(repeat_penalty=float("nan")), dict(repeat_last_n=0)):
        with pytest.raises(NextnError, match="repeat_"):
            SamplingParams(**bad)


@pytest.mark.parametrize("draft_max", [1, 3])
def test_greedy_mtp_equals_plain_greedy_under_repeat_penalty(random_engine, copy_engine, draft_max):
    for eng in (random_engine, copy_engine):
        ids = prompt(12, eng.cfg.n_vocab, seed=40 + draft_max)
        kw = dict(max_tokens=40, repeat_penalty=1.6, repeat_last_n=16)
        plain = eng.generate(ids, mtp=False, **kw)
        spec = eng.generate(ids, mtp=True, draft_max=draft_max, adaptive=False, **kw)
        assert spec.tokens == plain.tokens
        assert spec.stats["drafted"] > 0
        assert plain.tokens != eng.generate(ids, max_tokens=40, mtp=False).tokens  # the penalty acts
    # drafts are made under the same penalty: the copy model's drafts still equal the target's choice
    r = copy_engine.generate(prompt(12, copy_engine.cfg.n_vocab, seed=5), max_tokens=40, mtp=True,
                             draft_max=draft_max, adaptive=False, repeat_penalty=1.6, repeat_last_n=16)
    assert r.stats["acceptance_rate"] >= 0.97, r.stats


def test_sampling_distribution_under_repeat_penalty_unchanged_by_mtp(copy_model_path):
    """As test_sampling_distribution_unchanged_by_mtp, with a strong repetition penalty over the
    generated tokens: the 2nd and 3rd tokens' rows see the earlier ones (accepted drafts included)."""
    eng = runtime.load(copy_model_path, progress=False, use_kernels=False)
    ids = prompt(6, eng.cfg.n_vocab, seed=12)
    N = 400
    kw = dict(max_tokens=3, temperature=1.0, top_k=3, repeat_penalty=3.0, repeat_last_n=4)
    a = Counter(tuple(eng.generate(ids, seed=s, mtp=False, **kw).tokens[1:]) for s in range(N))
    b = Counter(tuple(eng.generate(ids, seed=30_000 + s, mtp=True, draft_max=2, adaptive=False, **kw).tokens[1:])
                for s in range(N))
    _assert_same_distribution(a, b)


# ---- controls -------------------------------------------------------------------------------------

def test_model_without_nextn_layer(make_test_model, capsys):
    tm = make_test_model(n_nextn=0)
    eng = runtime.load(tm.gguf_path, progress=False, use_kernels=False)
    r = eng.generate("hello", max_tokens=5)
    assert r.stats["mtp"] is False and len(r.tokens) == 5
    eng.generate("hello", max_tokens=5)
    assert capsys.readouterr().err.count("no nextn") == 1  # said once
    with pytest.raises(UnsupportedError):
        eng.generate("hello", max_tokens=5, mtp=True)
    with pytest.raises(UnsupportedError):
        eng.mtp_logits([1, 2, 3])


def test_invalid_draft_settings(random_engine):
    with pytest.raises(NextnError):
        random_engine.generate("x", draft_max=100)


@pytest.mark.parametrize("use_kernels", [True, False])
def test_verify_rows_equal_plain_steps_bit_for_bit(make_test_model, use_kernels):
    """Lossless MTP needs more than close logits: a verify batch's row must give the bits a plain
    step gives for that position, or a near-tie can flip the greedy token (the kernels' 8-bit
    activation rounding turns a 1e-7 difference into a 1e-3 one now and then: it happened on the
    synthetic GLM-4.5-Air). Every matrix here is block-quantized and every side on the CPU, so
    the dense kernels, the MoE kernels, the attention and the torch matmuls all take part."""
    tm = make_test_model(types={"default": "Q4_K", "attn_v": "Q6_K", "ffn_down": "Q5_0", "ffn_down_exps": "Q5_0"},
                         match_hf=True, seed=23, hidden=256, expert_ffn=256, dense_ffn=256, n_heads=4, head_dim=64,
                         n_kv_heads=2, n_layers=3)
    eng = runtime.load(tm.gguf_path, progress=False, gpu="cpu", use_kernels=use_kernels)
    m = eng.model
    ids = prompt(40, eng.cfg.n_vocab, seed=9)
    n0 = 30  # a prefill chunk longer than ROWWISE_MAX: the batched attention path fills the cache
    with torch.inference_mode():
        plain = eng.new_sequence(SamplingParams(), use_mtp=False)
        plain.prefill(ids[:n0])
        steps = [m.logits(m.forward(torch.tensor([ids[p]]), plain.cache, p))[0] for p in range(n0, 40)]
        for T in (2, 3, 5, 10):
            seq = eng.new_sequence(SamplingParams(), use_mtp=False)
            seq.prefill(ids[:n0])
            got = m.logits(m.forward(torch.tensor(ids[n0:n0 + T]), seq.cache, n0))
            for t in range(T):
                assert torch.equal(got[t], steps[t]), f"T={T}, row {t}"
