"""runtime/linear.py: dense weights on the CPU in their file form (KernelLinear, QuantizedTable),
against float64 references; F16/BF16 weights through the kernels for few rows and through chunked
float32 GEMMs for many (FLOAT_GEMM_MIN_ROWS)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

ck = pytest.importorskip("cpu_kernels")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from runtime import linear as L  # noqa: E402


def _part(t, N, K, rng):
    raw = ck.random_blocks(t, (1, N, K), rng)
    return ck.ExpertTensor(raw, t, (1, N, K)), torch.from_numpy(ck.dequantize(raw, t, (1, N, K))[0])


@pytest.mark.parametrize("t", [QT.F16, QT.BF16], ids=lambda t: t.name)
@pytest.mark.parametrize("T", [1, 4, L.FLOAT_GEMM_MIN_ROWS - 1, L.FLOAT_GEMM_MIN_ROWS, 130])
def test_half_weights_against_float64(t, T):
    """Stacked parts (F16/BF16, a Q8_0 part, a float32 torch part) fill their columns of one output
    on either side of the GEMM threshold; the half part has more rows than one conversion chunk
    and a partial last chunk, so every chunk boundary is crossed."""
    rng = np.random.default_rng(T)
    K = 64
    half, half_f = _part(t, L._GEMM_CHUNK_ROWS + 37, K, rng)
    q8, q8_f = _part(QT.Q8_0, 33, K, rng)
    f32 = torch.from_numpy(rng.standard_normal((5, K), dtype=np.float32))
    kl = L.KernelLinear([half, q8, f32])
    x = torch.from_numpy(rng.standard_normal((T, K), dtype=np.float32))
    y = kl(x).double()
    n = half.shape[1]
    xd = x.double()
    want_half = xd @ half_f.double().T
    scale = float(want_half.abs().max())
    assert y.shape == (T, n + 33 + 5)
    # float weights: float32 accumulation only
    assert float((y[:, :n] - want_half).abs().max()) <= 1e-5 * scale
    assert float((y[:, n + 33:] - xd @ f32.double().T).abs().max()) <= 1e-5 * scale
    # the Q8_0 part rounds the activations to 8 bits (tests/test_cpu_kernels.py tolerances)
    want_q8 = xd @ q8_f.double().T
    assert float((y[:, n:n + 33] - want_q8).abs().max()) <= 0.05 * float(want_q8.abs().max())


@pytest.mark.parametrize("t", [QT.F16, QT.BF16], ids=lambda t: t.name)
def test_half_weight_rows_do_not_depend_on_the_batch(t):
    """Up to ROWWISE_MAX rows (decode steps and verify batches) a row gets the same bits alone or
    in a batch: greedy MTP must equal plain greedy."""
    rng = np.random.default_rng(3)
    kl = L.KernelLinear([_part(t, 300, 96, rng)[0]])
    x = torch.from_numpy(rng.standard_normal((L.ROWWISE_MAX, 96), dtype=np.float32))
    rows = torch.cat([kl(x[i:i + 1]) for i in range(L.ROWWISE_MAX)])
    for T in (2, 5, L.ROWWISE_MAX):
        assert torch.equal(kl(x[:T]), rows[:T]), f"T={T}"


@pytest.mark.parametrize("t", [QT.F16, QT.BF16, QT.Q4_K], ids=lambda t: t.name)
def test_table_lookup_is_exact(t, tmp_path):
    """An embedding table in file form returns exactly the rows gguf's reference decoder gives,
    in the shape of the ids."""
    import gguf

    from runtime.gguf_file import GGUFFile

    V, H = 40, 256
    rng = np.random.default_rng(int(t))
    raw = ck.random_blocks(t, (1, V, H), rng)
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "glm4moe")
    w.add_tensor("token_embd.weight", np.asarray(raw).reshape(V, -1), raw_dtype=t)  # F16: halves; else bytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = GGUFFile(tmp_path / "t.gguf").tensors["token_embd.weight"]
    table = L.QuantizedTable(info)
    full = torch.from_numpy(gguf.quants.dequantize(info.raw(), t).reshape(V, H).astype(np.float32))
    ids = torch.tensor([[3, 0], [V - 1, 3]])
    got = table[ids]
    assert got.dtype == torch.float32 and got.shape == (2, 2, H)
    assert torch.equal(got, full[ids])


def test_tensor_dequantize_same_with_and_without_the_kernels(monkeypatch):
    """TensorInfo.dequantize decodes with the kernels where it can and with gguf otherwise (no
    build, a type the kernels lack): the same values either way, whole tensors and selected rows."""
    import runtime.gguf_file as gf
    from runtime.api import DEMO_MODEL

    f = gf.GGUFFile(DEMO_MODEL)
    names = ["token_embd.weight", "blk.1.ffn_gate_exps.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.bias"]
    fast = {n: f.tensors[n].dequantize() for n in names}
    rows = f.tensors["token_embd.weight"].dequantize(rows=np.array([7, 0, 7]))
    assert f.tensors["token_embd.weight"]._kernel_view() is not None
    monkeypatch.setattr(gf, "_ck", None)
    g = gf.GGUFFile(DEMO_MODEL)
    for n in names:
        ref = g.tensors[n].dequantize()
        assert ref.dtype == np.float32 and ref.shape == g.tensors[n].shape
        assert np.array_equal(fast[n], ref), n
    assert np.array_equal(rows, g.tensors["token_embd.weight"].dequantize(rows=np.array([7, 0, 7])))
    with pytest.raises(ValueError, match="2-D"):
        g.tensors["blk.1.ffn_gate_exps.weight"].dequantize(rows=np.array([0]))


@pytest.mark.parametrize("width", [8, 64, 160, 192, 576, 1408, 10944])
@pytest.mark.parametrize("view", ["contiguous", "half_of_gate_up"])
def test_rowwise_transcendentals_do_not_depend_on_the_batch(width, view):
    """sigmoid/silu through `rowwise`: a row's bits alone equal its bits in a batch of 2..17 rows,
    for widths that go in one call (multiples of 64 within one thread's share) and widths that go
    row by row, contiguous or as the first half of a stacked gate/up output; torch on 2 threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(width)
        full = torch.randn(L.ROWWISE_MAX, 2 * width, generator=g) * 4
        x = full[:, :width] if view == "half_of_gate_up" else full[:, :width].contiguous()
        for fn in (torch.sigmoid, torch.nn.functional.silu):
            rows = torch.cat([L.rowwise(fn, x[t:t + 1]) for t in range(L.ROWWISE_MAX)])
            for T in (2, 3, 5, L.ROWWISE_MAX):
                assert torch.equal(L.rowwise(fn, x[:T]), rows[:T]), (fn.__name__, T)
    finally:
        torch.set_num_threads(old)
