"""GLM-4.7-Flash: `deepseek2` files with multi-head latent attention, on the tiny fixture that
llama.cpp's own converter wrote (tests/data/glm47flash_tiny/make.py), against transformers'
Glm4MoeLiteForCausalLM and its MTP layer run with transformers' modules."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import runtime
from runtime.errors import NextnError

D = Path(__file__).resolve().parent / "data" / "glm47flash_tiny"
FLASH = D / "glm47flash-tiny-f32.gguf"
REF = np.load(D / "reference.npz")


@pytest.fixture(scope="module", params=["fused", "torch"])
def eng(request):
    """The fixture's engine on the fused C blocks (decode-sized forwards), and on the torch path
    (NEXTN_FUSED=0), which is also what a GPU runs."""
    import os

    old = os.environ.get("NEXTN_FUSED")
    if request.param == "torch":
        os.environ["NEXTN_FUSED"] = "0"
    try:
        e = runtime.load(FLASH, progress=False)
    finally:
        if old is None:
            os.environ.pop("NEXTN_FUSED", None)
        else:
            os.environ["NEXTN_FUSED"] = old
    want = "on" if request.param == "fused" else "off (NEXTN_FUSED=0)"
    if request.param == "fused" and e.load_report.fused_blocks != "on":
        pytest.skip(f"fused blocks: {e.load_report.fused_blocks}")
    assert e.load_report.fused_blocks == want
    yield e
    e.close()


def test_config_reads_the_latent_sizes(eng):
    c = eng.cfg
    assert (c.arch, c.mla, c.n_kv_heads, c.head_dim, c.cache_v_dim) == ("deepseek2", True, 1, 48, 0)
    assert (c.q_lora_rank, c.kv_lora_rank, c.nope_dim, c.rope_dim, c.v_dim) == (32, 32, 24, 16, 16)
    assert c.attn_scale == pytest.approx(40 ** -0.5)
    assert (c.n_layers, c.n_nextn, c.n_dense, c.weights_scale) == (3, 1, 1, pytest.approx(1.8))
    assert c.gating_assumed  # the converter writes no expert_gating_func for GLM-4.7-Flash


def test_a_deepseek_v2_file_without_the_glm_tokenizer_is_refused(tmp_path):
    """No gating key means sigmoid for GLM-4.7-Flash but softmax for DeepSeek-V2's files."""
    e = err(rewrite(tmp_path / "dsv2.gguf", keys={"tokenizer.ggml.pre": "deepseek-llm"}))
    assert "softmax router" in e and "expert_gating_func" in e


@pytest.mark.parametrize("i", [0, 1, 2])
def test_logits_match_transformers(eng, i):
    ids = REF[f"ids{i}"].tolist()
    np.testing.assert_allclose(eng.logits(ids), REF[f"hf{i}"], atol=2e-5, rtol=0)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_logits_match_llama_cpp(eng, i):
    """llama.cpp's own logits on the same file (make.py: F32 KV cache, the router said sigmoid)."""
    ids = REF[f"ids{i}"].tolist()
    np.testing.assert_allclose(eng.logits(ids), REF[f"llama{i}"], atol=2e-5, rtol=0)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_mtp_logits_match_transformers(eng, i):
    ids = REF[f"ids{i}"].tolist()
    np.testing.assert_allclose(eng.mtp_logits(ids), REF[f"mtp{i}"], atol=2e-5, rtol=0)


def test_the_cache_holds_one_latent_row_a_position(eng):
    main, mtp = eng.pools
    assert all(v.numel() == 0 for v in main.v + mtp.v)
    assert main.k[0].shape[1:] == (1, 48)
    assert main.nbytes == len(main.k) * main.n_slots * 48 * 4


@pytest.mark.parametrize("draft_max", [1, 2, 3])
def test_greedy_mtp_equals_plain_greedy(eng, draft_max):
    for i in range(3):
        ids = REF[f"ids{i}"].tolist()
        plain = eng.generate(ids, max_tokens=24, mtp=False, temperature=0.0, repeat_penalty=1.0)
        spec = eng.generate(ids, max_tokens=24, mtp=True, draft_max=draft_max, adaptive=False,
                            temperature=0.0, repeat_penalty=1.0)
        assert spec.tokens == plain.tokens


@pytest.mark.parametrize("mtp", [False, True])
def test_batch_equals_alone(eng, mtp):
    """Seven sequences decoded together (one forward for all of them, in forwards of at most
    ROWWISE_MAX rows: with MTP's verify rows that is several a step) give each the tokens it gets
    alone."""
    full = [REF[f"ids{i}"].tolist() for i in range(3)]
    prompts = full + [full[2][:n] for n in (3, 17, 30)] + [full[0][:5]]
    kw = dict(max_tokens=16, temperature=0.0, repeat_penalty=1.0)
    batch = eng.generate_batch(prompts, mtp=mtp, draft_max=3, adaptive=False, **kw)
    assert eng.last_batch.stats.figures()["sequences_per_forward"] > 2
    for p, b in zip(prompts, batch):
        assert b.tokens == eng.generate(p, mtp=False, **kw).tokens


def test_memory_estimate_equals_the_load(eng):
    import placement as P
    from runtime.config import read_config
    from runtime.gguf_file import GGUFFile

    f = GGUFFile(FLASH)
    cfg = read_config(f)
    plan = P.load_plan(None, {"model": str(FLASH), "gpu": "cpu", "context": 256})
    res = P.resolve(plan, f, cfg)
    est = P.estimate_memory(res, f, cfg, plan, gpu_device="cpu")
    assert est.kv_bytes == cfg.n_blocks * 256 * 48 * 4
    assert eng.load_report.bytes_by_side == {"gpu": est.gpu_weight_bytes, "cpu": est.cpu_weight_bytes}
    assert "48 latent" in P.format_report(plan, res, est)


# ---- a quantized file: the matrices through the CPU kernels ------------------------------------

def rewrite(dst: Path, *, keys=None, drop=(), quantize=False):
    """The fixture with metadata keys changed (None: removed), tensors dropped, or its 2-D
    weights quantized to Q8_0 where their rows allow (as llama-quantize would)."""
    keys = keys or {}
    r = gguf.GGUFReader(FLASH)
    w = gguf.GGUFWriter(dst, "deepseek2")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or k in keys:
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_array(k, f.contents())
        else:
            w.add_key_value(k, f.contents(), vt)
    for k, v in keys.items():
        if v is not None:
            w.add_key_value(k, v, gguf.GGUFValueType.STRING if isinstance(v, str) else gguf.GGUFValueType.UINT32)
    Q8 = gguf.GGMLQuantizationType.Q8_0
    for t in r.tensors:
        if t.name in drop:
            continue
        data = np.array(t.data)
        if quantize and data.ndim >= 2 and data.shape[-1] % 32 == 0 and "norm" not in t.name \
                and "ffn_gate_inp" not in t.name:
            w.add_tensor(t.name, gguf.quants.quantize(data, Q8), raw_dtype=Q8)
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def q8_path(tmp_path_factory):
    return rewrite(tmp_path_factory.mktemp("flash") / "flash-q8_0.gguf", quantize=True)


def test_q8_0_file_runs_on_the_kernels_as_its_dequantized_weights(q8_path):
    """The kernels (8-bit activations) against the torch path over the same file's dequantized
    weights: close, apart from the rows where a routing near-tie flips an expert."""
    pytest.importorskip("cpu_kernels")
    e = runtime.load(q8_path, progress=False)
    ref = runtime.load(q8_path, progress=False, use_kernels=False)
    try:
        assert e.load_report.kernel_weights > 0 and ref.load_report.kernel_weights == 0
        for i in range(3):
            ids = REF[f"ids{i}"].tolist()
            lg, lr = e.logits(ids), ref.logits(ids)
            assert np.median(np.abs(lg - lr)) < 0.01
            assert (lg.argmax(-1) == lr.argmax(-1)).mean() > 0.9
        ids = REF["ids2"].tolist()
        plain = e.generate(ids, max_tokens=24, mtp=False, temperature=0.0, repeat_penalty=1.0)
        for k in (1, 3):
            spec = e.generate(ids, max_tokens=24, mtp=True, draft_max=k, adaptive=False, temperature=0.0,
                              repeat_penalty=1.0)
            assert spec.tokens == plain.tokens
    finally:
        e.close()
        ref.close()


def test_fused_blocks_against_the_torch_path(q8_path, monkeypatch):
    """The fused C blocks (decode-sized forwards: these prompts of 8 and 11 tokens) against the
    torch path on the same Q8_0 file, both with the matrices on the kernels: the latent attention,
    norms and rotations written twice agree to float32 rounding."""
    pytest.importorskip("cpu_kernels")
    fused = runtime.load(q8_path, progress=False)
    monkeypatch.setenv("NEXTN_FUSED", "0")
    ref = runtime.load(q8_path, progress=False)
    try:
        assert fused.load_report.fused_blocks == "on" and ref.load_report.fused_blocks.startswith("off")
        for i in (0, 1):
            ids = REF[f"ids{i}"].tolist()
            np.testing.assert_allclose(fused.logits(ids), ref.logits(ids), atol=2e-5, rtol=0)
            np.testing.assert_allclose(fused.mtp_logits(ids), ref.mtp_logits(ids), atol=2e-5, rtol=0)
    finally:
        fused.close()
        ref.close()


def test_fused_attention_over_several_chunks(monkeypatch):
    """600 positions: the fused latent attention's chunks of 256 positions, merged. Decode rows
    against the torch path, and a verify batch's rows bit for bit against the same rows one at a
    time."""
    pytest.importorskip("cpu_kernels")
    ids = np.random.default_rng(0).integers(300, 390, 600).tolist()
    fused = runtime.load(FLASH, progress=False)
    monkeypatch.setenv("NEXTN_FUSED", "0")
    ref = runtime.load(FLASH, progress=False)
    try:
        assert fused.load_report.fused_blocks == "on"
        outs = []
        for e in (fused, ref):
            m = e.model
            with torch.inference_mode():
                c = m.new_cache(640, torch.float32)
                m.forward(torch.tensor(ids[:597]), c, 0)  # prefill chunks: the torch path in both
                rows = torch.cat([m.forward(torch.tensor(ids[597 + i:598 + i]), c, 597 + i) for i in range(3)])
                c.truncate(597)
                batch = m.forward(torch.tensor(ids[597:600]), c, 597)
            assert torch.equal(batch, rows)
            outs.append(rows)
        torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=0)
    finally:
        fused.close()
        ref.close()


# ---- bad files: one line that names the key or tensor --------------------------------------------

def err(path) -> str:
    with pytest.raises(NextnError) as e:
        runtime.load(path, progress=False, use_kernels=False)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("keys,words", [
    ({"deepseek2.expert_gating_func": 1}, "expert_gating_func is 1"),
    ({"deepseek2.attention.q_lora_rank": None}, "missing metadata key deepseek2.attention.q_lora_rank"),
    ({"deepseek2.rope.scaling.type": "yarn"}, "rope.scaling.type 'yarn'"),
    ({"deepseek2.attention.head_count_kv": 4}, "head_count_kv 4"),
    ({"deepseek2.attention.value_length": 48}, "value_length is not kv_lora_rank"),
    ({"deepseek2.attention.key_length_mla": 16}, "key_length_mla 16"),
])
def test_bad_metadata_is_named(tmp_path, keys, words):
    assert words in err(rewrite(tmp_path / "bad.gguf", keys=keys))


@pytest.mark.parametrize("name", ["blk.1.attn_k_b.weight", "blk.0.attn_q_a_norm.weight", "blk.2.ffn_norm.weight"])
def test_missing_latent_tensor_is_named(tmp_path, name):
    assert f"missing tensor {name}" in err(rewrite(tmp_path / "bad.gguf", drop=(name,)))


def test_rows_of_several_sequences_in_one_forward(eng):
    """The batched forward (one call over several sequences' rows, each over its own cache: a
    batch step) against each sequence's rows alone."""
    from runtime.kvpool import SeqKV

    m = eng.model
    pool, _ = m.new_pools(6 * 64, torch.float32)  # one pool, as an engine's sequences share
    prompts = [REF[f"ids{i}"].tolist()[:n] for i, n in ((0, 9), (1, 5), (2, 12))]
    alone, caches = [], []
    with torch.inference_mode():
        for p in prompts:
            alone.append(m.forward(torch.tensor(p), SeqKV(pool, 64), 0))
        caches = [SeqKV(pool, 64) for _ in prompts]
        # first chunks of different lengths together, then one decode row each together
        split = [4, 2, 7]
        outs = m.forward_batch([(torch.tensor(p[:s]), c, 0) for p, s, c in zip(prompts, split, caches)])
        rest = m.forward_batch([(torch.tensor(p[s:]), c, s) for p, s, c in zip(prompts, split, caches)])
    for a, o, r in zip(alone, outs, rest):
        # bit for bit: decode-sized forwards keep each row's bits (runtime/runner.py batches on it)
        assert torch.equal(torch.cat([o, r]), a)


def test_bench_batch_runs_on_a_flash_file(capsys):
    from runtime.bench_batch import main

    assert main([str(FLASH), "--sequences", "1,3", "--rounds", "1", "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "outputs equal to each prompt decoded alone: all" in out
