"""Test-model writer: GGUF layout equals llama.cpp's converter output, weights read back exactly,
quantized types, splits, nextn variants, transformers checkpoint round trip."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from runtime.testmodel import (TestModelSpec, build_hf_model, gguf_entries, hf_from_gguf, hf_logits, hf_mtp_logits,
                               load_hf, main, write_gguf)

# the fixture's configuration (../shared/fixtures/README.md), to compare layouts
FIXTURE_SPEC = dict(hidden=128, n_layers=3, n_dense=1, dense_ffn=256, n_experts=8, top_k=2, n_shared=1,
                    expert_ffn=64, n_heads=4, n_kv_heads=1, head_dim=32, rope_theta=5e5, routed_scaling=1.5,
                    context_length=1024)


def _reader(path):
    return gguf.GGUFReader(str(path))


def _fields(r):
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _deq(t):
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])


# ------------------------------------------------------------------ layout vs the real converter

@pytest.mark.parametrize("ftype", ["f32", "q8_0"])
def test_layout_matches_llamacpp_converter(make_test_model, glm4moe_fixture_dir, ftype):
    tm = make_test_model(types=ftype.upper(), **FIXTURE_SPEC)
    ours, ref = _reader(tm.gguf_path), _reader(glm4moe_fixture_dir / f"glm4moe-tiny-{ftype}.gguf")
    fo, fr = _fields(ours), _fields(ref)
    assert set(fo) - set(fr) == {"tokenizer.chat_template"}
    assert set(fr) <= set(fo)
    for k in fr:  # same value types everywhere
        assert ours.fields[k].types == ref.fields[k].types, k
    skip = {"general.name", "general.size_label"} | {k for k in fr if k.startswith("tokenizer.")}
    for k in fr:
        if k not in skip:
            assert fo[k] == pytest.approx(fr[k]), k
    to = {t.name: t for t in ours.tensors}
    tr = {t.name: t for t in ref.tensors}
    assert set(to) == set(tr)
    V_o, V_r = len(fo["tokenizer.ggml.tokens"]), len(fr["tokenizer.ggml.tokens"])
    for name, t in tr.items():
        so = [int(x) for x in to[name].shape]
        sr = [int(x) for x in t.shape]
        assert [V_r if d == V_o else d for d in so] == sr, name
        assert to[name].tensor_type == t.tensor_type, name
    # tokenizer roles as the converter sets them
    for k in ("bos", "eos", "eot", "eom", "padding", "unknown"):
        key = f"tokenizer.ggml.{k}_token_id"
        assert fo["tokenizer.ggml.tokens"][fo[key]] == fr["tokenizer.ggml.tokens"][fr[key]], k
    types_o = dict(zip(fo["tokenizer.ggml.tokens"], fo["tokenizer.ggml.token_type"]))
    types_r = dict(zip(fr["tokenizer.ggml.tokens"], fr["tokenizer.ggml.token_type"]))
    for t, ty in types_r.items():
        if ty == 3:
            assert types_o[t] == 3, t


def test_inverse_mapping_reproduces_fixture_references(glm4moe_fixture_dir):
    """hf_from_gguf (the writer's mapping, inverted) rebuilds the fixture's transformers model exactly:
    the mapping is the one llama.cpp's converter uses, and hf_mtp_logits follows the MTP contract."""
    model, mtp = hf_from_gguf(glm4moe_fixture_dir / "glm4moe-tiny-f32.gguf")
    ref = np.load(glm4moe_fixture_dir / "reference.npz")
    for i in range(3):
        ids = ref[f"ids{i}"]
        np.testing.assert_allclose(hf_logits(model, ids), ref[f"hf{i}"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(hf_mtp_logits(model, mtp, ids), ref[f"mtp{i}"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------ F32 read-back

def test_f32_readback_exact(test_model):
    tm = test_model
    r = _reader(tm.gguf_path)
    f = _fields(r)
    s = tm.spec
    assert f["general.architecture"] == "glm4moe"
    assert f["glm4moe.block_count"] == s.n_layers + s.n_nextn
    assert f["glm4moe.nextn_predict_layers"] == s.n_nextn
    assert f["glm4moe.embedding_length"] == s.hidden
    assert f["glm4moe.leading_dense_block_count"] == s.n_dense
    assert f["glm4moe.rope.dimension_count"] == s.rope_dim
    assert f["glm4moe.attention.key_length"] == s.head_dim
    assert f["glm4moe.expert_weights_scale"] == pytest.approx(s.routed_scaling)
    assert f["tokenizer.ggml.pre"] == "glm4"
    assert len(f["tokenizer.ggml.tokens"]) == len(tm.tokenizer) == tm.hf_model.config.vocab_size
    tensors = {t.name: t for t in r.tensors}
    ents = gguf_entries(tm.hf_model, tm.mtp_model, s.nextn_embed_head)
    assert set(tensors) == {e.name for e in ents}
    for e in ents:
        t = tensors[e.name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(_deq(t), e.get(), err_msg=e.name)
    L = s.n_layers
    H, E, I = s.hidden, s.n_experts, s.expert_ffn
    assert tensors[f"blk.{L - 1}.ffn_gate_exps.weight"].data.shape == (E, I, H)
    assert tensors[f"blk.{L - 1}.ffn_down_exps.weight"].data.shape == (E, H, I)
    assert tensors[f"blk.{L}.nextn.eh_proj.weight"].data.shape == (H, 2 * H)
    # experts: gate is the first half of transformers' fused gate_up_proj
    gu = tm.hf_model.model.layers[L - 1].mlp.experts.gate_up_proj.detach().numpy()
    np.testing.assert_array_equal(_deq(tensors[f"blk.{L - 1}.ffn_gate_exps.weight"]), gu[:, :I])
    np.testing.assert_array_equal(_deq(tensors[f"blk.{L - 1}.ffn_up_exps.weight"]), gu[:, I:])
    # nextn copies are byte-identical to the main ones
    assert np.array_equal(tensors[f"blk.{L}.nextn.embed_tokens.weight"].data, tensors["token_embd.weight"].data)
    assert np.array_equal(tensors[f"blk.{L}.nextn.shared_head_head.weight"].data, tensors["output.weight"].data)


def test_gguf_round_trip_logits(test_model):
    model, mtp = hf_from_gguf(test_model.gguf_path)
    ids = test_model.tokenizer.encode("The quick brown fox 12345 我想", add_special_tokens=False)
    np.testing.assert_array_equal(hf_logits(model, ids), test_model.logits(ids))
    np.testing.assert_array_equal(hf_mtp_logits(model, mtp, ids), test_model.mtp_logits(ids))


def test_hf_dir_round_trip(test_model):
    model, mtp, tok = load_hf(test_model.hf_dir)
    ids = tok.encode("hello world, don't panic 42", add_special_tokens=False)
    assert ids == test_model.tokenizer.encode("hello world, don't panic 42", add_special_tokens=False)
    np.testing.assert_array_equal(hf_logits(model, ids), test_model.logits(ids))
    np.testing.assert_array_equal(hf_mtp_logits(model, mtp, ids), test_model.mtp_logits(ids))
    assert (test_model.hf_dir / "model-mtp.safetensors").exists()


def test_random_init_is_useful_and_deterministic(test_model):
    m = test_model.hf_model
    a, _, _ = build_hf_model(test_model.spec, tokenizer=test_model.tokenizer)
    for (n1, p1), (n2, p2) in zip(m.state_dict().items(), a.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    norm = m.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, torch.ones_like(norm))
    assert m.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    # the router spreads tokens over experts
    ids = torch.arange(0, min(200, m.config.vocab_size))[None]
    with torch.no_grad():
        h = m.model.embed_tokens(ids)
        layer = m.model.layers[test_model.spec.n_dense]
        _, _, idx = layer.mlp.gate(layer.post_attention_layernorm(h))
    assert len(torch.unique(idx)) == test_model.spec.n_experts


def test_selection_bias_changes_expert_choice(make_test_model):
    tm = make_test_model(selection_bias_scale=0.5)
    m = tm.hf_model
    layer = m.model.layers[tm.spec.n_dense]
    b = layer.mlp.gate.e_score_correction_bias
    assert b.abs().sum() > 0
    x = layer.post_attention_layernorm(m.model.embed_tokens(torch.arange(0, 100)[None]))
    with torch.no_grad():
        _, _, with_bias = layer.mlp.gate(x)
        saved = b.clone()
        b.zero_()
        try:
            _, _, without = layer.mlp.gate(x)
        finally:
            b.copy_(saved)
    assert not torch.equal(with_bias.sort(-1).values, without.sort(-1).values)
    t = {t.name: t for t in _reader(tm.gguf_path).tensors}[f"blk.{tm.spec.n_dense}.exp_probs_b.bias"]
    np.testing.assert_array_equal(t.data, saved.numpy())


# ------------------------------------------------------------------ types

@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantized_types(make_test_model, qtype):
    tm = make_test_model(types=qtype)
    r = _reader(tm.gguf_path)
    ents = {e.name: e for e in gguf_entries(tm.hf_model, tm.mtp_model)}
    want = gguf.GGMLQuantizationType[qtype]
    for t in r.tensors:
        keep_f32 = len(t.shape) == 1 or "ffn_gate_inp" in t.name or "exp_probs_b" in t.name
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if keep_f32 else want), t.name
        ref = ents[t.name].get()
        got = _deq(t)
        tol = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.02}.get(qtype, 0.25)
        assert np.abs(got - ref).max() <= tol * max(1.0, np.abs(ref).max()), t.name


def test_match_hf_makes_quantized_file_exact(make_test_model):
    tm = make_test_model(types="Q4_0", match_hf=True)
    r = _reader(tm.gguf_path)
    ents = {e.name: e for e in gguf_entries(tm.hf_model, tm.mtp_model)}
    for t in r.tensors:
        np.testing.assert_array_equal(_deq(t), ents[t.name].get(), err_msg=t.name)


def test_mixed_types(make_test_model):
    tm = make_test_model(types={"default": "F16", "experts": "Q4_0", "ffn_down_exps": "Q8_0", "attn": "BF16",
                                "embd": "Q8_0", "output": "F32", "shexp": "Q5_1", "dense": "Q4_1", "nextn": "F32"})
    Q = gguf.GGMLQuantizationType
    types = {t.name: t.tensor_type for t in _reader(tm.gguf_path).tensors}
    L = tm.spec.n_layers
    assert types["blk.1.ffn_gate_exps.weight"] == Q.Q4_0
    assert types["blk.1.ffn_down_exps.weight"] == Q.Q8_0
    assert types["blk.1.attn_q.weight"] == Q.BF16
    assert types["blk.1.attn_q.bias"] == Q.F32
    assert types["blk.1.ffn_gate_inp.weight"] == Q.F32
    assert types["token_embd.weight"] == Q.Q8_0
    assert types[f"blk.{L}.nextn.embed_tokens.weight"] == Q.Q8_0
    assert types["output.weight"] == Q.F32
    assert types["blk.1.ffn_up_shexp.weight"] == Q.Q5_1
    assert types["blk.0.ffn_up.weight"] == Q.Q4_1
    assert types[f"blk.{L}.nextn.eh_proj.weight"] == Q.F32
    assert types[f"blk.{L}.nextn.enorm.weight"] == Q.F32


def test_type_errors(tmp_path, test_model):
    args = (test_model.hf_model, test_model.mtp_model, test_model.tokenizer, test_model.spec)
    with pytest.raises(ValueError, match="cannot write tensor type 'IQ1_S'"):
        write_gguf(*args, tmp_path / "a.gguf", types="IQ1_S")
    with pytest.raises(ValueError, match="cannot quantize to Q4_K .*match_hf=True"):
        write_gguf(*args, tmp_path / "a.gguf", types="Q4_K")
    with pytest.raises(ValueError, match="unknown tensor group 'exprts'"):
        write_gguf(*args, tmp_path / "b.gguf", types={"exprts": "Q8_0"})
    spec = TestModelSpec(expert_ffn=48, n_layers=2, n_nextn=0)
    m, mtp, tok = build_hf_model(spec, tokenizer=test_model.tokenizer)
    with pytest.raises(ValueError, match="not a multiple of the Q8_0 block size"):
        write_gguf(m, mtp, tok, spec, tmp_path / "c.gguf", types={"default": "Q8_0"})
    with pytest.raises(ValueError, match="n_dense"):
        TestModelSpec(n_dense=5).validate()


# ------------------------------------------------------------------ splits and nextn variants

def test_split_write(make_test_model):
    tm = make_test_model(split_max_tensors=30)
    paths = tm.gguf_paths
    n = len(paths)
    assert n == 3  # 80 tensors, 30 per file
    assert [p.name for p in paths] == [f"nextn-test-f32-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    names = []
    for i, p in enumerate(paths):
        r = _reader(p)
        f = _fields(r)
        assert f["split.no"] == i and f["split.count"] == n and f["split.tensors.count"] == 80
        assert r.fields["split.no"].types == [gguf.GGUFValueType.UINT16]
        assert r.fields["split.count"].types == [gguf.GGUFValueType.UINT16]
        assert r.fields["split.tensors.count"].types == [gguf.GGUFValueType.INT32]
        assert ("glm4moe.block_count" in f) == (i == 0)  # model metadata only in the first file
        names += [t.name for t in r.tensors]
    assert len(names) == 80 and set(names) == {e.name for e in gguf_entries(tm.hf_model, tm.mtp_model)}
    from runtime.gguf_file import GGUFFile
    g = GGUFFile(paths[0])
    assert len(g.tensors) == 80


def test_nextn_embed_head_omit(make_test_model):
    tm = make_test_model(nextn_embed_head="omit")
    names = {t.name for t in _reader(tm.gguf_path).tensors}
    L = tm.spec.n_layers
    assert f"blk.{L}.nextn.eh_proj.weight" in names and f"blk.{L}.nextn.shared_head_norm.weight" in names
    assert f"blk.{L}.nextn.embed_tokens.weight" not in names
    assert f"blk.{L}.nextn.shared_head_head.weight" not in names


def test_no_nextn(make_test_model):
    tm = make_test_model(n_nextn=0, qk_norm=False, n_dense=2, routed_scaling=2.5)
    assert tm.mtp_model is None
    r = _reader(tm.gguf_path)
    f = _fields(r)
    assert f["glm4moe.block_count"] == tm.spec.n_layers and f["glm4moe.nextn_predict_layers"] == 0
    names = {t.name for t in r.tensors}
    assert not any("nextn" in n for n in names)
    assert not any(f"blk.{tm.spec.n_layers}." in n for n in names)
    assert not any("attn_q_norm" in n for n in names)
    assert "blk.1.ffn_up.weight" in names and "blk.2.ffn_up_exps.weight" in names
    model, mtp = hf_from_gguf(tm.gguf_path)
    assert mtp is None
    ids = [1, 2, 3, 50, 60]
    np.testing.assert_array_equal(hf_logits(model, ids), tm.logits(ids))


def test_cli(tmp_path, capsys):
    rc = main([str(tmp_path), "--types", "default=Q8_0,experts=Q4_0", "--layers", "2", "--nextn", "1", "--no-hf",
               "--split-max-tensors", "40"])
    assert rc == 0
    out = capsys.readouterr().out.split()
    assert len(out) == 2 and out[0].endswith("-00001-of-00002.gguf")
    rc = main([str(tmp_path / "x"), "--types", "Q8_1"])
    assert rc == 2 and "cannot write tensor type" in capsys.readouterr().err


def test_kquant_types_with_match_hf(make_test_model):
    """Types gguf.quants cannot quantize (K-quants, IQ4) are written as random blocks whose dequantized
    values become the transformers weights; a GLM-4.5-Air-like mix (down_exps in a 32-element type)."""
    types = {"default": "Q8_0", "ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q5_K", "ffn_down_exps": "IQ4_NL",
             "attn_q": "Q6_K", "attn_output": "Q3_K", "output": "Q2_K", "ffn_up_shexp": "IQ4_XS"}
    tm = make_test_model(types=types, match_hf=True, hidden=256, expert_ffn=64, dense_ffn=256, n_heads=4,
                         head_dim=64, n_layers=2, vocab_target=300)
    Q = gguf.GGMLQuantizationType
    r = _reader(tm.gguf_path)
    tt = {t.name: t.tensor_type for t in r.tensors}
    assert tt["blk.1.ffn_gate_exps.weight"] == Q.Q4_K and tt["blk.1.ffn_down_exps.weight"] == Q.IQ4_NL
    assert tt["blk.1.attn_q.weight"] == Q.Q6_K and tt["output.weight"] == Q.Q2_K
    assert tt["blk.2.nextn.shared_head_head.weight"] == Q.Q2_K
    ents = {e.name: e for e in gguf_entries(tm.hf_model, tm.mtp_model)}
    for t in r.tensors:
        got = _deq(t)
        assert np.isfinite(got).all(), t.name
        np.testing.assert_array_equal(got, ents[t.name].get(), err_msg=t.name)
    model, mtp = hf_from_gguf(tm.gguf_path)  # exact transformers reference for this K-quant file
    ids = [5, 17, 280, 42, 7, 99]
    np.testing.assert_array_equal(hf_logits(model, ids), tm.logits(ids))
    np.testing.assert_array_equal(hf_mtp_logits(model, mtp, ids), tm.mtp_logits(ids))
    w = _deq({t.name: t for t in r.tensors}["blk.1.ffn_gate_exps.weight"])
    assert 0.01 < w.std() < 0.2  # magnitudes like the random init (std 0.05)
    with pytest.raises(ValueError, match="match_hf=True"):
        write_gguf(tm.hf_model, tm.mtp_model, tm.tokenizer, tm.spec, tm.gguf_path.with_name("z.gguf"), types="Q4_K")


def test_vocab_padding(make_test_model):
    from runtime.tokenizer import Tokenizer
    tm = make_test_model(vocab_pad_multiple=128, n_nextn=0, n_layers=2)
    n_tok = len(tm.tokenizer)
    V = tm.hf_model.config.vocab_size
    assert V % 128 == 0 and V > n_tok
    f = _fields(_reader(tm.gguf_path))
    toks, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(toks) == V and toks[n_tok] == f"[PAD{n_tok}]" and types[n_tok] == 5
    t = Tokenizer.from_metadata(f)
    assert t.vocab_size == V
    s = "hello 我想 <|user|>"
    assert t.encode(s) == tm.tokenizer.encode(s, add_special_tokens=False)
    assert t.decode([n_tok], skip_special=True) == ""
