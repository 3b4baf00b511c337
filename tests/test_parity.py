"""Engine.logits against transformers' Glm4MoeForCausalLM on the same random weights."""

import numpy as np
import pytest
import torch

import runtime
from runtime.linear import KernelLinear

TOL = 1e-4

VARIANTS = {
    "default": dict(),
    "no_qk_norm": dict(qk_norm=False),
    "two_dense_scale_2_5": dict(n_dense=2, n_layers=4, routed_scaling=2.5),
    "selection_bias": dict(selection_bias_scale=0.5, seed=3),
    "no_bias_no_norm_topk": dict(attn_bias=False, norm_topk=False, seed=5),
}


def prompt(n, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


@pytest.fixture(scope="module")
def engines(make_test_model):
    cache = {}

    def get(name, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            tm = make_test_model(**VARIANTS[name])
            cache[key] = (tm, runtime.load(tm.gguf_path, progress=False, **kw))
        return cache[key]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n", [1, 7, 300])
def test_logits_match_transformers(engines, variant, n):
    tm, eng = engines(variant, use_kernels=False)
    ids = prompt(n, eng.cfg.n_vocab, seed=n)
    got = eng.logits(ids)
    want = tm.logits(ids)
    assert got.shape == want.shape == (n, eng.cfg.n_vocab)
    assert np.abs(got - want).max() <= TOL


def test_selection_bias_changes_the_chosen_experts(engines):
    """The bias must matter for the test above to mean anything: with it, top-k differs."""
    tm, eng = engines("selection_bias", use_kernels=False)
    blk = next(b for b in eng.model.blocks if hasattr(b.ffn, "router"))
    r = blk.ffn.router
    x = torch.randn(64, eng.cfg.hidden, generator=torch.Generator().manual_seed(0)).to(r.weight.device)
    with_bias = r(x)[0]
    saved = r.bias
    r.bias = torch.zeros_like(saved)
    try:
        without = r(x)[0]
    finally:
        r.bias = saved
    assert (with_bias.sort(-1).values != without.sort(-1).values).any(-1).float().mean() > 0.2


@pytest.mark.parametrize("variant", ["default", "two_dense_scale_2_5"])
def test_chunked_and_token_by_token_prefill_agree(engines, variant):
    tm, eng = engines(variant, use_kernels=False)
    ids = prompt(40, eng.cfg.n_vocab, seed=1)
    whole = eng.logits(ids)
    saved = eng.prefill_chunk
    try:
        for chunk in (1, 13):
            eng.prefill_chunk = chunk
            assert np.abs(eng.logits(ids) - whole).max() <= 1e-5
    finally:
        eng.prefill_chunk = saved


@pytest.mark.parametrize("qtype,tol", [("Q8_0", 1e-4), ("Q4_0", 1e-4)])
def test_quantized_files_exact_against_dequantized_reference(make_test_model, qtype, tol):
    """Against transformers holding the file's dequantized weights: only float rounding differs."""
    tm = make_test_model(types={"default": qtype}, match_hf=True, seed=11)
    eng = runtime.load(tm.gguf_path, progress=False, use_kernels=False)
    ids = prompt(50, eng.cfg.n_vocab, seed=2)
    assert np.abs(eng.logits(ids) - tm.logits(ids)).max() <= tol


@pytest.mark.parametrize("qtype,rel,agree", [("Q8_0", 0.02, 0.95), ("Q4_0", 0.15, 0.75)])
def test_quantized_files_close_to_f32_model(make_test_model, qtype, rel, agree):
    """Against the original F32 weights: the quantization error itself. Q8_0 keeps ~8 bits per
    weight (relative error ~0.4%), Q4_0 ~4 bits (~7%); through a few layers of a random model the
    logit error stays within ~2% / ~15% of the logit range, and argmax agrees on most positions."""
    tm = make_test_model(types={"default": qtype}, seed=11)
    eng = runtime.load(tm.gguf_path, progress=False, use_kernels=False)
    ids = prompt(50, eng.cfg.n_vocab, seed=2)
    got, want = eng.logits(ids), tm.logits(ids)
    span = want.max() - want.min()
    assert np.median(np.abs(got - want).max(-1)) <= rel * span
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= agree


def test_split_file_loads_as_one_model(make_test_model):
    tm = make_test_model(split_max_tensors=20)
    assert len(tm.gguf_paths) > 1
    eng = runtime.load(tm.gguf_path, progress=False, use_kernels=False)
    ids = prompt(9, eng.cfg.n_vocab, seed=4)
    assert np.abs(eng.logits(ids) - tm.logits(ids)).max() <= TOL


def test_tokenizer_ids_match_transformers(test_model):
    eng = runtime.load(test_model.gguf_path, progress=False, use_kernels=False)
    for text in ["def f(x):\n    return x + 1\n", "héllo 世界 🙂 don't   stop\n\n", "<|user|>hi<|assistant|>"]:
        assert eng.tokenize(text) == test_model.tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL", "Q4_1", "Q5_0",
                                   "Q5_1", "BF16", "F16"])
def test_every_load_type_dequantizes_exactly(make_test_model, qtype):
    """Every accepted tensor type, against transformers holding the file's dequantized weights.
    256-element types need rows that are multiples of 256: hidden 256 and expert width 256 here."""
    tm = make_test_model(types={"default": qtype}, match_hf=True, seed=13, hidden=256, expert_ffn=256,
                         dense_ffn=256, n_heads=4, head_dim=64, n_kv_heads=2, n_layers=2)
    eng = runtime.load(tm.gguf_path, progress=False, use_kernels=False)
    ids = prompt(12, eng.cfg.n_vocab, seed=3)
    assert np.abs(eng.logits(ids) - tm.logits(ids)).max() <= 1e-4


@pytest.mark.parametrize("mix", [{"default": "F32", "experts": "Q8_0"},
                                 {"default": "F32", "experts": "Q4_K", "ffn_down_exps": "Q5_0"}])
def test_cpu_kernel_path_close_to_transformers(make_test_model, mix):
    """The kernels round activations to 8 bits (Q8_0 / Q8_K blocks) before the integer dot
    products, as llama.cpp does: ~0.4% relative error per expert matmul, so the logits agree to
    about 1e-2 of their range rather than 1e-4."""
    tm = make_test_model(types=mix, match_hf=True, seed=17, hidden=256, expert_ffn=256, dense_ffn=256,
                         n_heads=4, head_dim=64, n_kv_heads=2, n_layers=3)
    eng = runtime.load(tm.gguf_path, progress=False)
    # main MoE layers 1, 2; the MTP layer's too where the gpu side is the CPU
    assert eng.load_report.kernel_expert_layers == 2 + (eng.device.type == "cpu")
    ids = prompt(20, eng.cfg.n_vocab, seed=4)
    got, want = eng.logits(ids), tm.logits(ids)
    span = want.max() - want.min()
    assert np.abs(got - want).max() <= 0.02 * span
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("mix", [{"default": "Q8_0"},
                                 {"default": "Q4_K", "attn_v": "Q6_K", "ffn_down": "Q5_0", "ffn_down_exps": "Q5_0",
                                  "token_embd": "Q4_K", "output": "Q6_K"},
                                 {"default": "F16", "ffn_down_exps": "Q8_0", "output": "BF16"}])
def test_dense_weights_on_the_kernels_close_to_transformers(make_test_model, mix):
    """Every side on the CPU: the block-quantized, F16 and BF16 matrices (attention, dense and
    shared FFNs, the head, eh_proj) run on cpu_kernels.linear from the file's bytes, activations rounded to 8 bits
    as for the experts; logits and MTP logits agree with transformers to ~1e-2 of their range at a
    typical position (median), and greedy MTP decoding still gives plain greedy's tokens. The worst
    position can be further off: a rounding that flips one of the router's top-k choices changes
    that token's output far more than the rounding itself (7% of the range measured with only the
    experts on the kernels, as before this path existed)."""
    tm = make_test_model(types=mix, match_hf=True, seed=19, hidden=256, expert_ffn=256, dense_ffn=256,
                         n_heads=4, head_dim=64, n_kv_heads=2, n_layers=3)
    eng = runtime.load(tm.gguf_path, progress=False, gpu="cpu")
    rep = eng.load_report
    # per main layer q/k/v/o (+ dense gate/up/down or shared gate/up/down), the head, the MTP layer's
    assert rep.kernel_weights >= 3 * 7 + 1 and all(
        isinstance(w, KernelLinear) for w in (eng.model.head.weight, eng.model.blocks[0].attn.wqkv,
                                              eng.model.blocks[1].ffn.shared.down, eng.model.nextn.eh_proj))
    ids = prompt(20, eng.cfg.n_vocab, seed=4)
    for got, want in ((eng.logits(ids), tm.logits(ids)), (eng.mtp_logits(ids), tm.mtp_logits(ids))):
        span = want.max() - want.min()
        assert np.median(np.abs(got - want).max(-1)) <= 0.01 * span
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.85
    plain = eng.generate(ids, max_tokens=24, mtp=False)
    for k in (1, 3):
        assert eng.generate(ids, max_tokens=24, mtp=True, draft_max=k, adaptive=False).tokens == plain.tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_against_float64(dtype):
    """Both forms of the model's RMSNorm (one weight row, and one row per head as the joint q/k norm
    uses) against float64, rounded once to the dtype."""
    from runtime.model import rms_norm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 6, 64, generator=g) * 3).to(dtype)
    for shape in ((64,), (6, 64)):
        w = (torch.rand(shape, generator=g) + 0.5).to(dtype)
        xd, wd = x.double(), w.double()
        want = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * wd).to(dtype)
        got = rms_norm(x, w, 1e-5)
        assert got.dtype == dtype and got.shape == x.shape
        tol = 1e-6 if dtype == torch.float32 else 2 ** -7
        assert torch.allclose(got.double(), want.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dim,head_dim", [(24, 48), (64, 64)])
def test_rope_against_float64(dim, head_dim):
    """Partial NEOX rotation, half-split order, against float64: the first `dim` dims of each head
    rotate by position, the rest pass through unchanged; bfloat16 input comes back bfloat16."""
    from runtime.model import Positions, RoPE

    rope = RoPE(dim, 10000.0, 64, "cpu", head_dim=head_dim)
    pos = torch.tensor([0, 5, 63])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, head_dim, generator=g)
    got = rope(x, Positions(rope, pos, 0).cos_sin(torch.device("cpu")))
    half = dim // 2
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    ang = pos.double()[:, None, None] * inv  # [T, 1, half]
    x1, x2 = x[..., :half].double(), x[..., half:dim].double()
    want = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin(), x[..., dim:].double()], -1)
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert torch.equal(got[..., dim:], x[..., dim:])
    xb = x.bfloat16()
    gb = rope(xb, Positions(rope, pos, 0).cos_sin(torch.device("cpu")))
    assert gb.dtype == torch.bfloat16 and torch.allclose(gb.double(), want, atol=0.05)
