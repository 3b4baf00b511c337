"""The F16 KV cache (`kv_cache: float16`): rows rounded to float16 once, when written, by the torch
path and the fused C path alike (round to nearest even, as torch and numpy round), attention in
float32 on the rounded values. Half the KV memory; greedy MTP still equals plain greedy, and every
sequence of a batch still equals its lone run."""

import numpy as np
import pytest
import torch

import cpu_kernels as ck
import runtime
from placement import schema as S
from runtime.errors import NextnError
from runtime.sampling import SamplingParams
from test_fused import torch_path


@pytest.mark.parametrize("path", ["ref", "avx2", "avx512"])
def test_f16_rounding_is_round_to_nearest_even_on_every_path(path):
    from cpu_kernels.blocks import to_f16

    if path not in [{"avx512vnni": "avx512"}.get(p, p) for p in ck.available_paths()]:
        pytest.skip(f"{path} is not available on this CPU")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, size=1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    # ties at every exponent (normal and subnormal halves), the overflow threshold, signed zeros
    e = np.arange(-26, 16, dtype=np.float32)
    ties = np.concatenate([(1 + (2 * k + 1) * 2.0 ** -11) * 2.0 ** e for k in (0, 1, 511)]).astype(np.float32)
    edge = np.float32([0.0, -0.0, 65504, 65519.996, 65520, -65520, 2**-24, 2**-25, 3 * 2**-26, 2**-14,
                       2**-14 * (1 - 2**-11), np.inf, -np.inf, 1e-30])
    x = np.concatenate([x, ties, -ties, edge, np.arange(-50, 50, dtype=np.float32) * np.float32(2**-20)])
    x = x[~np.isnan(x)]
    prev = ck._state["path"]
    try:
        ck._set_path(path)
        got = to_f16(x)
    finally:
        ck._state["path"] = prev
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    assert np.array_equal(want, torch.from_numpy(x).to(torch.float16).numpy())  # the torch path rounds alike
    nan = to_f16(np.float32([np.nan, -np.nan]))
    assert np.isnan(nan).all()


@pytest.fixture(scope="module")
def engines(make_test_model):
    tm = make_test_model(types={"default": "Q8_0", "attn_norm": "F32"}, n_heads=4, n_kv_heads=2, head_dim=32,
                         hidden=128, seed=11)
    return {kv: runtime.load(tm.gguf_path, progress=False, gpu="cpu", kv_cache=kv) for kv in ("auto", "f16")}


def test_f16_cache_takes_half_the_memory_and_runs_fused(engines):
    a, h = engines["auto"], engines["f16"]
    assert a.kv_dtype == torch.float32 and h.kv_dtype == torch.float16
    for pa, ph in zip(a.pools, h.pools):
        assert ph.n_slots == pa.n_slots and 2 * ph.nbytes == pa.nbytes
        assert ph.fusable
    assert h.load_report.fused_blocks == "on"


def test_both_paths_write_the_rows_rounded_once(engines):
    """Layer 0's K/V (from the embeddings alone) in an F16 cache are the float32 cache's rows
    rounded, whether the torch path (a prefill chunk) or the fused path (decode steps) wrote them."""
    ids = np.random.default_rng(1).integers(0, engines["auto"].cfg.n_vocab, 40).tolist()
    caches = {}
    for kv, eng in engines.items():
        seq = eng.new_sequence(SamplingParams(), use_mtp=False)
        with torch.inference_mode():
            seq.prefill(ids[:30])  # prefill_chunk > ROWWISE_MAX: the torch path
            for p in range(30, 40):  # one-row steps: the fused path
                eng.model.forward(torch.tensor([ids[p]]), seq.cache, p)
        caches[kv] = (seq.cache.k[0].clone(), seq.cache.v[0].clone())
        seq.release()
    (k32, v32), (k16, v16) = caches["auto"], caches["f16"]
    assert k16.dtype == torch.float16 and k16.shape == k32.shape
    assert torch.equal(k16, k32.half()) and torch.equal(v16, v32.half())


def test_f16_cache_is_lossless_for_mtp_and_isolated_in_batches(engines):
    eng = engines["f16"]
    prompts = [np.random.default_rng(s).integers(0, eng.cfg.n_vocab, n).tolist() for s, n in ((2, 5), (3, 19), (4, 11))]
    plain = [eng.generate(p, max_tokens=24, mtp=False).tokens for p in prompts]
    for k in (1, 2, 3):
        assert [eng.generate(p, max_tokens=24, mtp=True, draft_max=k, adaptive=False).tokens
                for p in prompts] == plain, k
    batch = eng.generate_batch(prompts, max_tokens=24, mtp=True, draft_max=2, adaptive=False)
    assert [r.tokens for r in batch] == plain
    # and close to the float32 cache: the first tokens agree (random weights: near-ties are rare)
    ref = [engines["auto"].generate(p, max_tokens=24, mtp=False).tokens for p in prompts]
    assert all(a[:4] == b[:4] for a, b in zip(plain, ref))


def test_fused_logits_with_an_f16_cache_match_the_torch_path(engines):
    eng = engines["f16"]
    m = eng.model
    ids = np.random.default_rng(5).integers(0, eng.cfg.n_vocab, 26).tolist()

    def run():
        with torch.inference_mode():
            seq = eng.new_sequence(SamplingParams(), use_mtp=False)
            seq.prefill(ids[:20])
            rows = [m.logits(m.forward(torch.tensor([ids[p]]), seq.cache, p))[0] for p in range(20, 23)]
            three = m.logits(m.forward(torch.tensor(ids[23:26]), seq.cache, 23))
            seq.release()
            return torch.cat([torch.stack(rows), three]).numpy()

    fused, ref = run(), torch_path(eng, run)
    assert np.abs(fused - ref).max() < 1e-4 * np.abs(ref).max()


def test_kv_cache_setting_is_checked_where_it_is_given(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("gpu: cpu\nkv_cache: q4\n")
    with pytest.raises(S.PlanError, match=r"p\.yaml:2: kv_cache: unknown KV cache type 'q4'"):
        S.load_plan(f)
    f.write_text("kv_cache: f16\n")
    assert S.load_plan(f).kv_cache == "float16"
    assert S.load_plan(None, {"kv_cache": "F32"}).kv_cache == "float32"
    with pytest.raises(S.PlanError, match="override 'kv_cache'"):
        S.load_plan(None, {"kv_cache": 16})
    with pytest.raises(NextnError, match="kv_cache"):
        runtime.Engine(runtime.DEMO_MODEL, progress=False, gpu="cpu", kv_cache="int8")


def test_memory_estimate_counts_an_f16_cache(engines):
    import placement as P
    from runtime.config import read_config

    eng = engines["auto"]
    f, cfg = eng.file, read_config(eng.file)
    est = {}
    for kv in ("auto", "float16"):
        plan = S.load_plan(None, {"model": str(f.path), "gpu": "cpu", "context": 256, "kv_cache": kv})
        est[kv] = P.estimate_memory(P.resolve(plan, f, cfg), f, cfg, plan, gpu_device="cpu")
    assert est["auto"].kv_bytes == cfg.n_blocks * 256 * cfg.n_kv_heads * cfg.head_dim * 2 * 4
    assert est["float16"].kv_bytes * 2 == est["auto"].kv_bytes


def test_llama_server_cache_type_flags_map_to_kv_cache():
    from runtime.cli import _cache_type

    assert _cache_type(None, None, None) is None
    assert _cache_type("f16", None, None) == _cache_type("F16", "f16", "float16") == "f16"
    assert _cache_type(None, "f32", None) == "f32"
    for args, words in (((" q4_0", None, None), "quantized"), (("f16", "f32", None), "same for both"),
                        (("f16", None, "f32"), "disagree")):
        with pytest.raises(NextnError, match=words):
            _cache_type(*args)
