"""Synthetic GLM-4.x files (runtime.synthetic): real shapes, real type mixes, random valid blocks."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from runtime.config import expected_tensors
from runtime.synthetic import (MIXES, SyntheticError, main, random_quant_bytes, synthetic_config, tensor_plan,
                               tokenizer_metadata, write_synthetic)


@pytest.fixture(scope="module")
def air_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("synthetic") / "air1.gguf"
    t0 = time.perf_counter()
    write_synthetic(p, shape="glm45-air", layers=1, mix="q4k_q5_0", vocab=1024, seed=3)
    return p, time.perf_counter() - t0


def test_config_keeps_real_shapes():
    from placement import GLM_SHAPES

    air = synthetic_config("glm45-air", layers=4)
    real = GLM_SHAPES["glm45-air"]
    assert (air.hidden, air.n_heads, air.n_kv_heads, air.head_dim, air.expert_ffn, air.n_experts, air.n_vocab) == \
        (real.hidden, real.n_heads, real.n_kv_heads, real.head_dim, real.expert_ffn, real.n_experts, 151552)
    assert air.n_layers == 4 and air.n_nextn == 1 and air.n_dense == 1
    g = synthetic_config("glm47", layers=5, nextn=False)
    assert g.hidden == 5120 and g.n_experts == 160 and g.n_dense == 3 and g.n_nextn == 0 and g.qk_norm
    assert synthetic_config("glm47", layers=2).n_dense == 1  # keeps at least one MoE block
    with pytest.raises(SyntheticError):
        synthetic_config("glm45-air", layers=0)
    with pytest.raises(SyntheticError):
        synthetic_config("llama", layers=2)


@pytest.mark.parametrize("shape", ["glm45-air", "glm47"])
@pytest.mark.parametrize("mix", MIXES)
def test_type_mixes(shape, mix):
    cfg = synthetic_config(shape, layers=4)
    types = {n: t for n, _, t, _ in tensor_plan(cfg, mix, nextn_copies=True)}
    moe = cfg.n_dense  # first MoE block
    gate, down = types[f"blk.{moe}.ffn_gate_exps.weight"], types[f"blk.{moe}.ffn_down_exps.weight"]
    air = shape == "glm45-air"
    for n, t in types.items():
        if n.endswith(("norm.weight", ".bias", "ffn_gate_inp.weight")):
            assert t == T.F32, n
    if mix == "q4k_q5_0":
        assert gate == T.Q4_K and types[f"blk.{moe}.ffn_up_exps.weight"] == T.Q4_K
        assert down in ((T.Q5_0, T.Q8_0) if air else (T.Q4_K, T.Q6_K))
        assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q4_K
    elif mix == "q8_0":
        assert {t for t in types.values() if t != T.F32} == {T.Q8_0}
    elif mix == "iq4xs_iq4nl":
        assert gate == T.IQ4_XS and down == (T.IQ4_NL if air else T.IQ4_XS)
    else:
        assert gate == T.Q2_K and down == (T.IQ4_NL if air else T.Q3_K)
        assert types[f"blk.{moe}.attn_q.weight"] == T.Q4_K
    # every 1408-wide row uses a 32-element type
    for n, shp, t, _ in tensor_plan(cfg, mix, True):
        from gguf import GGML_QUANT_SIZES
        assert shp[-1] % GGML_QUANT_SIZES[t][0] == 0, n


@pytest.mark.parametrize("t", [T.Q4_K, T.Q5_0, T.Q8_0, T.Q6_K, T.Q2_K, T.Q3_K, T.IQ4_XS, T.IQ4_NL, T.Q4_0])
def test_random_blocks_dequantize_finite_and_small(t):
    from gguf.quants import dequantize

    cols = 512
    raw = random_quant_bytes(t, (8, cols), np.random.SFC64(1), scale=0.5 / np.sqrt(cols))
    w = dequantize(raw, t)
    assert w.shape == (8, cols) and np.isfinite(w).all()
    assert 0.002 < float(np.abs(w).mean()) < 0.2


def test_tokenizer_real_vocab_loads_fast():
    from runtime.tokenizer import Tokenizer

    t0 = time.perf_counter()
    tok = Tokenizer.from_metadata(tokenizer_metadata(151552))
    assert time.perf_counter() - t0 < 5
    assert tok.vocab_size == 151552
    assert tok.token_to_id("<|endoftext|>") == 151329 and tok.token_to_id("[gMASK]") == 151331
    text = "def fibonacci(n): the cat sat <|user|> 你好"
    assert tok.decode(tok.encode(text)) == text


def test_file_loads_and_generates(air_file):
    import runtime
    from runtime.gguf_file import GGUFFile

    path, secs = air_file
    cfg = synthetic_config("glm45-air", layers=1, vocab=1024)
    f = GGUFFile(path)
    want = {n: (s, t) for n, s, t, _ in tensor_plan(cfg, "q4k_q5_0", nextn_copies=True)}
    assert set(f.tensors) == set(want)
    for name, (shape, required) in expected_tensors(cfg).items():
        if name in f.tensors:
            assert f.tensors[name].shape == shape, name
            assert f.tensors[name].ggml_type == want[name][1], name
    assert f.tensors["blk.0.ffn_gate_exps.weight"].shape == (128, 1408, 4096)
    assert f.tensors["blk.0.ffn_down_exps.weight"].shape == (128, 4096, 1408)
    assert f.metadata["glm4moe.nextn_predict_layers"] == 1 and f.metadata["glm4moe.block_count"] == 2
    assert secs < 120, f"writing {f.total_bytes() / 2**30:.1f} GiB took {secs:.0f} s"

    eng = runtime.load(path, cpu_moe=True, progress=False, context=64)
    assert eng.has_mtp and eng.load_report.kernel_expert_layers == 2
    r = eng.generate("def fibonacci(n):", max_tokens=4, mtp=True, draft_max=2)
    assert len(r.tokens) == 4 and r.stats["weight_bytes_moved"] == 0
    ids = eng.tokenize("hello world")
    assert np.isfinite(eng.logits(ids)).all()
    assert np.isfinite(eng.mtp_logits(ids)).all()

    # repack (default auto): the experts of a type with a repacked layout (Q4_K, Q5_0, Q8_0 ...)
    # are copied into it when the SIMD kernels run, and so are such dense weights the kernels run
    # (all of them where the gpu side is the CPU); the logits match those read from the GGUF's own bytes
    import cpu_kernels
    on_cpu = eng.device.type == "cpu"
    rep = eng.load_report
    unread = {"token_embd.weight"}  # tables are looked up, not multiplied; the MTP layer's copies
    unread |= {n for n in f.tensors if (rep.mtp_shares_embed and n.endswith("nextn.embed_tokens.weight"))
               or (rep.mtp_shares_head and n.endswith("nextn.shared_head_head.weight"))}  # not loaded
    repackable = sum(t.nbytes for n, t in f.tensors.items() if t.ggml_type in cpu_kernels.REPACKED_TYPES and (
        n.endswith("_exps.weight") or (on_cpu and len(t.shape) == 2 and n not in unread)))
    assert repackable > 0
    assert eng.load_report.repacked_bytes == (repackable if cpu_kernels.active_path() != "ref" else 0)
    plain = runtime.load(path, cpu_moe=True, progress=False, context=64, repack=False)
    assert plain.load_report.repacked_bytes == 0
    a, b = eng.logits(ids), plain.logits(ids)
    # the layouts' integer sums are equal and only float32 summation order differs (each layout's
    # linear is within ~2e-7 of the float64 product of the same quantized activations, the
    # repacked multi-token kernels the closer), but a ~1e-7 difference can tip an activation's
    # 8-bit rounding in a later layer of these random weights: a few logits move by up to ~4e-3 of
    # the scale, the bulk by far less
    scale = np.abs(b).max()
    print("layout difference: max", np.abs(a - b).max() / scale, "mean", np.abs(a - b).mean() / scale)
    np.testing.assert_allclose(a, b, rtol=0, atol=8e-3 * scale)
    assert np.abs(a - b).mean() < 6e-4 * scale


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from /proc")
def test_release_pages_leaves_the_resident_set(air_file):
    """After a tensor's bytes are copied (repack), the loader releases its file pages: they leave
    the process's resident set, and the tensor still reads the same bytes afterwards."""
    import mmap

    from runtime.gguf_file import GGUFFile

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * mmap.PAGESIZE

    info = GGUFFile(air_file[0]).tensors["blk.0.ffn_up_exps.weight"]   # ~415 MB of Q4_K
    flat = info.raw().reshape(-1)
    first = int(flat[::mmap.PAGESIZE].astype(np.int64).sum())           # touches every page
    before = rss()
    info.release_pages()
    assert before - rss() > info.nbytes // 2
    assert int(info.raw().reshape(-1)[::mmap.PAGESIZE].astype(np.int64).sum()) == first


def test_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path / "x.gguf"), "--mix", "q9_9"]) == 2
    assert "unknown mix" in capsys.readouterr().err
    assert main([str(tmp_path / "x.gguf"), "--layers", "0"]) == 2
    assert not (tmp_path / "x.gguf").exists()


def test_repack_auto_stops_when_memory_is_short(monkeypatch):
    """`repack: auto` copies while the copy leaves REPACK_RESERVE_BYTES free, then keeps the rest
    in the GGUF's bytes with one warning; `true` copies regardless; `false` never. The file pages
    of exactly the copied tensors are released."""
    import torch
    import cpu_kernels
    from runtime import loader

    if cpu_kernels.active_path() == "ref":
        pytest.skip("auto repacks only when a SIMD path is active")
    rng = np.random.default_rng(0)
    t = cpu_kernels.ExpertTensor(cpu_kernels.random_blocks(T.Q5_0, (2, 8, 256), rng), T.Q5_0, (2, 8, 256))

    def builder(mode):
        return loader._Builder(None, None, None, "cpu", torch.float32, True, None, False, repack=mode)

    released = []

    def info(name):  # the TensorInfo the loader passes: its name, and its pages to release
        return SimpleNamespace(name=name, release_pages=lambda: released.append(name))

    free = [loader.REPACK_RESERVE_BYTES + 2 * t.nbytes]
    monkeypatch.setattr(loader, "mem_available", lambda: free[0])
    b = builder("auto")
    assert b._maybe_repack(t, info("blk.1.ffn_down_exps.weight")).layout == "q5_0_r8"
    free[0] = loader.REPACK_RESERVE_BYTES + t.nbytes // 2
    with pytest.warns(UserWarning, match=r"repack: auto stopped before blk\.2\.ffn_down_exps\.weight"):
        assert b._maybe_repack(t, info("blk.2.ffn_down_exps.weight")) is t
    free[0] = 1 << 40
    assert b._maybe_repack(t, info("blk.3.ffn_down_exps.weight")) is t   # stays stopped (copies now would crowd out the rest)
    assert b.report.repacked_bytes == t.nbytes and "blk.2" in b.report.repack_skipped
    free[0] = 0
    assert builder(True)._maybe_repack(t, info("x")).layout == "q5_0_r8"
    assert builder(False)._maybe_repack(t, info("y")) is t
    assert released == ["blk.1.ffn_down_exps.weight", "x"]
    with pytest.raises(ValueError, match="repack must be"):
        builder("yes")
