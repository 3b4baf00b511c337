"""Tests of the CPU expert kernels (cpu_kernels): every type, mixes, odd T, routing corner cases,
every SIMD path this machine has, and argument checking.

Two references:
  * exact  : gguf.quants.dequantize weights + float64 math, float activations. The kernels quantize
             activations to 8 bits (x once per call, silu(g)*u once per (token, expert)), so they
             differ from it by that rounding: TOL_EXACT per type, relative to max|ref|.
  * emulated: the same float64 reference, but with the kernels' activation quantization emulated
             in numpy. What is left is float32 accumulation order and the rare flip of a rounding
             tie, so TOL_EMU is tight (catches any wrong element, scale or offset of a block layout).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

cpu_kernels = pytest.importorskip("cpu_kernels")
import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402

ck = cpu_kernels
ALL_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.IQ4_NL,
             QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS]
FLOAT_TYPES = {QT.F32, QT.F16, QT.BF16}
K_TYPES = {QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS}

# Tolerances, max|out - ref| / max|ref|.
# Float weight types: no activation quantization, only float32 accumulation over <= ~1300 terms
# (rel. error ~1e-6) -> 1e-4.
# Quantized types vs the exact float reference: x is rounded to 8 bits per block (step
# amax/127, i.e. ~1/3 % of a Gaussian row's scale per element, averaging down in the dot) and
# silu(g)*u, a heavy-tailed product, is rounded again for down (its block amax is ~5-8x its rms, so
# the relative step is ~5 %, error per dot ~1-2 % of the output scale). Measured max errors are
# 1-2.5 % (32-blocks) and 1.5-3 % (256-blocks: one scale per 256 values is coarser); tolerances
# are ~2x that. Mixed calls take the largest tolerance of their three types.
TOL_EXACT = {t: 1e-4 for t in FLOAT_TYPES}
TOL_EXACT.update({t: 0.05 for t in (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.IQ4_NL)})
TOL_EXACT.update({t: 0.06 for t in K_TYPES})
TOL_EMU = 2e-3

PATHS = ck.available_paths()


@pytest.fixture(params=PATHS)
def path(request):
    """Force each SIMD path; small test calls also run on all threads (not the 1-thread shortcut
    that calls under ~16 KiB of work per thread take), so the parallel code is what gets checked."""
    old = ck.active_path()
    ck._set_path(request.param)
    old_mw = ck._set_min_work_per_thread(0)
    yield request.param
    ck._set_path(old)
    ck._set_min_work_per_thread(old_mw)


def _bs(t):
    return gguf.GGML_QUANT_SIZES[t][0]


def _fam(t):
    return "F" if t in FLOAT_TYPES else "K" if t in K_TYPES else "B"


def _fake_quant(a: np.ndarray, fam: str) -> np.ndarray:
    """The kernels' activation rounding (quant_b32 / quant_k), in float32, dequantized to float64."""
    if fam == "F":
        return a.astype(np.float64)
    n = 32 if fam == "B" else 256
    a32 = a.astype(np.float32)
    blk = a32.reshape(a32.shape[:-1] + (-1, n))
    amax = np.abs(blk).max(axis=-1, keepdims=True)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        iscale = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(blk * iscale)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(a.shape)


def _emulated_moe(x, ids, wts, gf, uf, df, tg, tu, td):
    T, K = ids.shape
    out = np.zeros((T, x.shape[1]))
    xg, xu = _fake_quant(x, _fam(tg)), _fake_quant(x, _fam(tu))
    for t in range(T):
        for k in range(K):
            e = ids[t, k]
            g = (gf[e].astype(np.float32) @ xg[t].astype(np.float32)).astype(np.float64)
            u = (uf[e].astype(np.float32) @ xu[t].astype(np.float32)).astype(np.float64)
            g32 = g.astype(np.float32)
            a = (g32 / (np.float32(1) + np.exp(-g32)) * u.astype(np.float32)).astype(np.float32)
            aq = _fake_quant(a, _fam(td))
            out[t] += wts[t, k] * (df[e].astype(np.float64) @ aq)
    return out


def _make(tg, tu, td, E, I, H, rng):
    g = ck.random_blocks(tg, (E, I, H), rng)
    u = ck.random_blocks(tu, (E, I, H), rng)
    d = ck.random_blocks(td, (E, H, I), rng)
    tens = (ck.ExpertTensor(g, tg, (E, I, H)), ck.ExpertTensor(u, tu, (E, I, H)), ck.ExpertTensor(d, td, (E, H, I)))
    flt = (ck.dequantize(g, tg, (E, I, H)), ck.dequantize(u, tu, (E, I, H)), ck.dequantize(d, td, (E, H, I)))
    return tens, flt


def _routing(T, K, E, rng, repeat=False):
    if repeat:
        return rng.integers(0, E, size=(T, K)).astype(np.int32)
    return np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)


def _check(tg, tu, td, E, I, H, T, K, rng, ids=None, emulate=True, threads=None):
    (G, U, D), (gf, uf, df) = _make(tg, tu, td, E, I, H, rng)
    x = rng.standard_normal((T, H), dtype=np.float32)
    if ids is None:
        ids = _routing(T, K, E, rng)
    wts = rng.random(ids.shape, dtype=np.float32)
    out = np.full((T, H), np.nan, dtype=np.float32)       # unwritten elements must fail
    res = ck.moe_forward(x, ids, wts, G, U, D, out=out, threads=threads)
    assert res is out
    assert np.isfinite(out).all()
    ref = ck.reference_moe(x, ids, wts, gf, uf, df)
    scale = np.abs(ref).max()
    tol = max(TOL_EXACT[tg], TOL_EXACT[tu], TOL_EXACT[td])
    err = np.abs(out - ref).max() / scale
    assert err < tol, f"{tg.name}/{tu.name}/{td.name} T={T}: error {err:.4g} vs exact reference > {tol}"
    if emulate:
        emu = _emulated_moe(x, ids, wts, gf, uf, df, tg, tu, td)
        err2 = np.abs(out - emu).max() / np.abs(emu).max()
        assert err2 < TOL_EMU, f"{tg.name}/{tu.name}/{td.name} T={T}: error {err2:.4g} vs emulated > {TOL_EMU}"
    return out


# ------------------------------------------------------------------ correctness
@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_each_type_min_width(path, t):
    """Smallest legal width for gate/up/down (one block), odd T, K < E."""
    rng = np.random.default_rng(int(t))
    bs = _bs(t)
    w = max(bs, 32)
    _check(t, t, t, E=5, I=w, H=w, T=3, K=2, rng=rng)


@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_each_type_odd_width(path, t):
    """Non-power-of-2 multiples of the block size, T=7, K=8 of 12 experts."""
    rng = np.random.default_rng(100 + int(t))
    bs = max(_bs(t), 32)
    _check(t, t, t, E=12, I=3 * bs, H=5 * bs, T=7, K=8, rng=rng)


MIXES = [
    (QT.Q4_K, QT.Q4_K, QT.Q5_0),    # GLM-4.5-Air style
    (QT.Q4_K, QT.Q4_K, QT.Q8_0),
    (QT.Q8_0, QT.Q8_0, QT.Q8_0),
    (QT.IQ4_XS, QT.IQ4_XS, QT.IQ4_NL),
    (QT.Q2_K, QT.Q3_K, QT.Q4_0),
    (QT.Q3_K, QT.Q3_K, QT.Q6_K),
    (QT.Q8_0, QT.Q4_K, QT.F16),     # gate/up of different families
    (QT.BF16, QT.Q6_K, QT.Q5_K),
    (QT.F32, QT.IQ4_NL, QT.Q5_1),
    (QT.Q5_K, QT.Q4_1, QT.BF16),
]


@pytest.mark.parametrize("mix", MIXES, ids=lambda m: "-".join(t.name for t in m))
def test_mixes(path, mix):
    tg, tu, td = mix
    rng = np.random.default_rng(7)
    H = 512
    I = 256 if td in K_TYPES else 96
    _check(tg, tu, td, E=10, I=I, H=H, T=5, K=4, rng=rng)


@pytest.mark.parametrize("T", [1, 3, 7, 33, 130])
def test_token_counts_air_mix(path, T):
    """Decode, speculative-verify and prefill-sized T; K=8 of 16 experts, some experts empty."""
    rng = np.random.default_rng(T)
    _check(QT.Q4_K, QT.Q4_K, QT.Q5_0, E=16, I=96, H=256, T=T, K=8, rng=rng, emulate=T <= 33)


def test_repeated_ids_and_k1(path):
    rng = np.random.default_rng(11)
    ids = np.array([[2, 2, 2, 5], [0, 0, 1, 1], [3, 3, 3, 3]], dtype=np.int64)  # int64 accepted
    _check(QT.Q8_0, QT.Q4_K, QT.IQ4_NL, E=8, I=64, H=256, T=3, K=4, rng=rng, ids=ids)
    _check(QT.Q6_K, QT.Q6_K, QT.Q5_0, E=8, I=64, H=256, T=4, K=1, rng=rng,
           ids=np.array([[7], [7], [0], [3]], dtype=np.int32))


@pytest.mark.parametrize("T", [6, 70])
def test_all_tokens_same_experts(path, T):
    """Every expert gets all T tokens: the tiled many-token path (T > 4), and at T=70 the down
    projection's token chunks (64 + 6)."""
    rng = np.random.default_rng(12)
    ids = np.tile(np.array([[1, 4, 6, 9]], dtype=np.int32), (T, 1))
    _check(QT.Q4_K, QT.Q4_K, QT.Q8_0, E=12, I=64, H=256, T=T, K=4, rng=rng, ids=ids, emulate=T <= 6)


# ------------------------------------------------------------------ repacked layouts
# down widths (I) covering every shape of a repacked row: only a group of 4 blocks, 4 + 1 loose,
# one group of 8, 8 + 1, 8 + 4 + 1, GLM-4.5-Air's 44 blocks (5 x 8 + 4), and < 4 blocks (unchanged)
R8_WIDTHS = [128, 160, 256, 288, 416, 1408, 96]


def _assert_blocks_read_back(r, rows_in, rows_out):
    """Every block of every repacked row, read back through the C accessor (nx_repacked_block,
    the element-by-element reference the fast repack is held to), equals the original bytes."""
    n_rows = rows_out.shape[0]
    ins, outs = rows_in.reshape(n_rows, -1), rows_out.reshape(n_rows, -1)
    bs = ck.row_bytes(r.ggml_type, 32 if r.ggml_type not in K_TYPES else 256)
    nb = ins.shape[1] // bs
    blk = ck._ffi.new(f"uint8_t[{bs}]")
    for row in range(n_rows):
        for i in range(nb):
            ck._lib.nx_repacked_block(r._c.type, ck._ffi.from_buffer(outs[row]), nb, i, blk)
            assert bytes(blk) == ins[row, bs * i:bs * i + bs].tobytes(), (row, i)


B32_REPACKED = [QT.Q5_0, QT.Q8_0, QT.Q4_0, QT.IQ4_NL]


@pytest.mark.parametrize("t", B32_REPACKED, ids=lambda t: t.name)
@pytest.mark.parametrize("nb", list(range(1, 21)) + [44, 48])
def test_b32_repacked_layout_roundtrip(t, nb):
    """Every block of a repacked row reads back as the original bytes (C accessor), the row keeps
    its size, and only whole groups of 4 or 8 blocks move."""
    rng = np.random.default_rng(nb + 100 * int(t))
    bs = ck.row_bytes(t, 32)
    raw = rng.integers(0, 256, size=(3, 2, nb * bs), dtype=np.uint8)    # any bytes: every bit pattern
    w = ck.ExpertTensor(raw, t, (3, 2, nb * 32))
    r = w.repacked(threads=2)
    assert r.layout == f"{t.name.lower()}_r8" and r.nbytes == w.nbytes and r.data is not raw
    rows_in, rows_out = raw.reshape(6, nb * bs), r.data.reshape(6, nb * bs)
    moved = nb // 4 * 4 * bs
    np.testing.assert_array_equal(rows_out[:, moved:], rows_in[:, moved:])
    if moved:
        assert (rows_out[:, :moved] != rows_in[:, :moved]).any()
    _assert_blocks_read_back(r, rows_in, rows_out)


@pytest.mark.parametrize("t", B32_REPACKED, ids=lambda t: t.name)
@pytest.mark.parametrize("I", R8_WIDTHS)
def test_b32_repacked_moe(path, t, I):
    """Repacked down projections give the reference result, and the same result as the GGUF
    layout (same integer sums; only float summation order differs), for 1..4 tokens per expert
    pass and more."""
    rng = np.random.default_rng(I)
    H = 64
    (G, U, D), (gf, uf, df) = _make(QT.Q8_0, QT.Q8_0, t, 6, I, H, rng)
    R = D.repacked()
    assert R.layout != "ggml"
    for T in (1, 2, 3, 4, 9):
        _same_as_ggml_layout(rng, T, (G, U, R), (G, U, D), (gf, uf, df), TOL_EXACT[t])


def _same_as_ggml_layout(rng, T, repacked, ggml, floats, tol):
    """One random call: tensors in repacked layouts against the float reference (within `tol`)
    and against the same tensors in the GGUF's layout. Their integer sums are the same and only the
    float32 summation order differs, but that can tip one 8-bit rounding of silu(g)*u before the
    down projection, which moves that token's whole output row by ~1/127 of a block's range: so
    most rows must agree to 1e-5 and every row to 2e-2 (a wrong layout is off by O(1)). The
    matrices alone agree to 1e-5 everywhere (test_repacked_linear_matches_ggml_layout). Returns
    the call's args and the GGUF layout's output."""
    H = ggml[0].shape[2]
    x = rng.standard_normal((T, H), dtype=np.float32)
    ids = _routing(T, 3, ggml[0].shape[0], rng)
    w = rng.random(ids.shape, dtype=np.float32)
    out = np.full((T, H), np.nan, dtype=np.float32)
    ck.moe_forward(x, ids, w, *repacked, out=out)
    base = ck.moe_forward(x, ids, w, *ggml)
    ref = ck.reference_moe(x, ids, w, *floats)
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() / scale < tol
    row_diff = np.abs(out - base).max(axis=1) / scale
    assert (row_diff <= 1e-5).mean() >= 0.5 and row_diff.max() <= 2e-2, row_diff
    return (x, ids, w), base


def test_b32_repacked_gate_up():
    """Repacked gate and up (all-Q8_0 and Q4_0 files): their activations are word-transposed as
    the down projection's are, and gate/up of two layouts share nothing they should not."""
    rng = np.random.default_rng(77)
    H, I = 416, 160  # groups of 8 + 4 + 1 loose block across H; 4 + 1 across I
    for gt, ut in ((QT.Q8_0, QT.Q8_0), (QT.Q4_0, QT.Q5_0), (QT.IQ4_NL, QT.Q8_0)):
        (G, U, D), (gf, uf, df) = _make(gt, ut, QT.Q8_0, 6, I, H, rng)
        x = rng.standard_normal((5, H), dtype=np.float32)
        ids = _routing(5, 3, 6, rng)
        w = rng.random(ids.shape, dtype=np.float32)
        base = ck.moe_forward(x, ids, w, G, U, D)
        for g, u in ((G.repacked(), U.repacked()), (G.repacked(), U), (G, U.repacked())):
            out = ck.moe_forward(x, ids, w, g, u, D.repacked())
            np.testing.assert_allclose(out, base, rtol=0, atol=1e-5 * np.abs(base).max())


@pytest.mark.parametrize("t", [QT.Q2_K, QT.Q3_K], ids=lambda t: t.name)
def test_k16_repacked_layout(t):
    """Q2_K_R8 / Q3_K_R8: blocks of random bytes read back as the original bytes (C accessor),
    only the code bytes move, and the code of element e sits where moe_kernels.h says: register
    r = (e % 16) // 2, byte b = 2 (e // 16) + e % 2, low 2 bits at bits 2(r % 4) of qs[32 (r // 4) + b]."""
    rng = np.random.default_rng(int(t))
    bs, nb = ck.row_bytes(t, 256), 5
    raw = rng.integers(0, 256, size=(2, 3, nb * bs), dtype=np.uint8)
    w = ck.ExpertTensor(raw, t, (2, 3, nb * 256))
    r = w.repacked(threads=2)
    assert r.layout == f"{t.name.lower()}_r8" and r.nbytes == w.nbytes
    rows_in, rows_out = raw.reshape(6, nb, bs), r.data.reshape(6, nb, bs)
    qo, q3 = (32, True) if t == QT.Q3_K else (16, False)
    fixed = [i for i in range(bs) if not (qo <= i < qo + 64 or (q3 and i < 32))]
    np.testing.assert_array_equal(rows_out[:, :, fixed], rows_in[:, :, fixed])
    _assert_blocks_read_back(r, rows_in, rows_out)
    g, p = rows_in[0, 0], rows_out[0, 0]
    for e in range(256):
        n, j, l = e // 128, (e % 128) // 32, e % 32
        reg, b = (e % 16) // 2, 2 * (e // 16) + e % 2
        assert (p[qo + 32 * (reg // 4) + b] >> (2 * (reg % 4))) & 3 == (g[qo + 32 * n + l] >> (2 * j)) & 3
        if q3:
            assert (p[b] >> reg) & 1 == (g[l] >> (4 * n + j)) & 1


def test_q6_k_r8_layout():
    """Q6_K_R8: random-byte blocks read back as the original bytes, the scales and d stay put, and
    element e's 6-bit code sits where moe_kernels.h says (register r = (e % 16) // 2, byte
    b = 2 (e // 16) + e % 2: low 4 bits in nibble r % 2 of ql[32 (r // 2) + b], high 2 at bits
    2 (r % 4) of qh[32 (r // 4) + b])."""
    rng = np.random.default_rng(61)
    nb = 3
    raw = rng.integers(0, 256, size=(2, 2, nb * 210), dtype=np.uint8)
    w = ck.ExpertTensor(raw, QT.Q6_K, (2, 2, nb * 256))
    r = w.repacked(threads=2)
    assert r.layout == "q6_k_r8" and r.nbytes == w.nbytes
    rows_in, rows_out = raw.reshape(4, nb, 210), r.data.reshape(4, nb, 210)
    np.testing.assert_array_equal(rows_out[:, :, 192:], rows_in[:, :, 192:])
    _assert_blocks_read_back(r, rows_in, rows_out)
    g, p = rows_in[0, 0], rows_out[0, 0]
    for e in range(256):
        n, q, l = e // 128, (e % 128) // 32, e % 32
        code = ((g[64 * n + 32 * (q % 2) + l] >> (4 * (q // 2))) & 15) | ((g[128 + 32 * n + l] >> (2 * q)) & 3) << 4
        reg, b = (e % 16) // 2, 2 * (e // 16) + e % 2
        got = ((p[32 * (reg // 2) + b] >> (4 * (reg % 2))) & 15) | ((p[128 + 32 * (reg // 4) + b] >> (2 * (reg % 4))) & 3) << 4
        assert got == code, e


@pytest.mark.parametrize("qt", [QT.Q4_K, QT.Q5_K, QT.IQ4_XS], ids=lambda t: t.name)
@pytest.mark.parametrize("nb", [1, 2, 3, 16])
def test_q4_k_r8_layout_roundtrip(qt, nb):
    """Every block of a repacked Q4_K / Q5_K / IQ4_XS row reads back as the original bytes (C
    accessor), with the header (d, dmin, scales) in place and the row's size kept; the codes do
    move."""
    rng = np.random.default_rng(40 + nb)
    bs = ck.row_bytes(qt, 256)
    raw = rng.integers(0, 256, size=(2, 3, nb * bs), dtype=np.uint8)
    t = ck.ExpertTensor(raw, qt, (2, 3, nb * 256))
    r = t.repacked(threads=2)
    assert r.layout == f"{qt.name.lower()}_r8" and r.nbytes == t.nbytes
    rows_in, rows_out = raw.reshape(6, nb, bs), r.data.reshape(6, nb, bs)
    hdr = 8 if qt == QT.IQ4_XS else 16
    np.testing.assert_array_equal(rows_out[:, :, :hdr], rows_in[:, :, :hdr])
    assert (rows_out[:, :, hdr:] != rows_in[:, :, hdr:]).any()
    _assert_blocks_read_back(r, rows_in, rows_out)


def test_q4_k_r8_element_order():
    """The layout itself, element by element against moe_kernels.h: qs[p][4i+k] holds element
    8p+k of sub-block i in its low nibble and 8p+4+k in its high one."""
    q = np.arange(256) % 16                                       # element e of the block: code e % 16
    q = (q + np.arange(256) // 32) % 16                           # ... shifted by its sub-block
    blk = np.zeros(144, np.uint8)
    for j in range(4):                                            # Q4_K: 64 elements per 32 bytes
        blk[16 + 32 * j:48 + 32 * j] = q[64 * j:64 * j + 32] | (q[64 * j + 32:64 * j + 64] << 4)
    r = ck.ExpertTensor(blk.reshape(1, 1, 144), QT.Q4_K, (1, 1, 256)).repacked().data.reshape(144)
    for p in range(4):
        for i in range(8):
            for k in range(4):
                b = r[16 + 32 * p + 4 * i + k]
                assert b & 15 == q[32 * i + 8 * p + k] and b >> 4 == q[32 * i + 8 * p + 4 + k]


@pytest.mark.parametrize("mix", [(QT.Q4_K, QT.Q4_K, QT.Q4_K), (QT.Q5_K, QT.Q5_K, QT.Q5_K), (QT.Q4_K, QT.Q5_K, QT.Q6_K),
                                 (QT.Q2_K, QT.Q2_K, QT.Q2_K), (QT.Q3_K, QT.Q3_K, QT.Q3_K), (QT.Q2_K, QT.Q3_K, QT.Q4_K),
                                 (QT.IQ4_XS, QT.IQ4_XS, QT.IQ4_XS), (QT.IQ4_XS, QT.Q4_K, QT.Q2_K),
                                 (QT.Q6_K, QT.Q6_K, QT.Q6_K), (QT.Q2_K, QT.Q6_K, QT.Q3_K)],
                         ids=lambda m: "-".join(t.name for t in m))
@pytest.mark.parametrize("H", [256, 768, 4096])
def test_k_repacked_moe(path, mix, H):
    """Repacked 256-element types (gate/up, and down) give the reference result, and the GGUF
    layout's result to float32 summation order, for 1..4 tokens per expert pass and more; gate
    and up of two repacked types share one transposed activation where their families agree
    (Q4_K/Q5_K/IQ4_XS), and keep their own where not (Q2_K gate, Q3_K up, Q4_K down)."""
    rng = np.random.default_rng(H + int(mix[0]))
    I = 256
    (G, U, D), (gf, uf, df) = _make(*mix, 6, I, H, rng)
    RG, RU, RD = G.repacked(), U.repacked(), D.repacked()
    assert RG.layout == f"{mix[0].name.lower()}_r8" and RU.layout == f"{mix[1].name.lower()}_r8"
    for T in (1, 2, 3, 4, 9):
        args, base = _same_as_ggml_layout(rng, T, (RG, RU, RD), (G, U, D), (gf, uf, df), TOL_EXACT[QT.Q4_K])
        mixed = ck.moe_forward(*args, RG, U, RD)                  # gate and up in different layouts
        assert np.abs(mixed - base).max() <= 2e-2 * np.abs(base).max()


@pytest.mark.parametrize("t", sorted(ck.REPACKED_TYPES, key=int), ids=lambda t: t.name)
def test_repacked_linear_matches_ggml_layout(path, t):
    """One matrix, every repacked type: the same activations meet the same integer sums in both
    layouts, so the outputs agree to float32 summation order, for 1..5 rows (widths that make
    groups of 8, 4 and loose blocks for the 32-element types)."""
    rng = np.random.default_rng(int(t) + 7)
    W, _, x = _linear_case(t, 37, 512 if t in K_TYPES else 416, 5, rng)
    R = W.repacked()
    assert R.layout == f"{t.name.lower()}_r8"
    for T in range(1, 6):
        a, b = ck.linear(x[:T], R), ck.linear(x[:T], W)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_repacked_api():
    rng = np.random.default_rng(31)
    q41 = ck.ExpertTensor(ck.random_blocks(QT.Q4_1, (2, 8, 256), rng), QT.Q4_1, (2, 8, 256))
    assert q41.repacked() is q41 and not q41.can_repack()          # no repacked layout for Q4_1
    q4k = ck.ExpertTensor(ck.random_blocks(QT.Q4_K, (2, 8, 256), rng), QT.Q4_K, (2, 8, 256))
    assert "q4_k_r8" in repr(q4k.repacked()) and q4k.can_repack() == (ck.active_path() != "ref")
    q50 = ck.ExpertTensor(ck.random_blocks(QT.Q5_0, (2, 8, 256), rng), QT.Q5_0, (2, 8, 256))
    r = q50.repacked()
    assert r.repacked() is r and "q5_0_r8" in repr(r) and not r.can_repack()
    assert q50.can_repack() == (ck.active_path() != "ref")
    with pytest.raises(ValueError, match="layout 'q5_0_r8' does not apply to Q4_K"):
        ck.ExpertTensor(q4k.data, QT.Q4_K, (2, 8, 256), layout="q5_0_r8")
    with pytest.raises(ValueError, match="layout 'q4_k_r8' does not apply to Q5_0"):
        ck.ExpertTensor(q50.data, QT.Q5_0, (2, 8, 256), layout="q4_k_r8")
    with pytest.raises(ValueError, match="layout 'bogus'"):
        ck.ExpertTensor(q50.data, QT.Q5_0, (2, 8, 256), layout="bogus")


@pytest.fixture
def all_threads():
    """Small calls normally run on fewer threads; force every call onto all threads it is given."""
    old = ck._set_min_work_per_thread(0)
    yield
    ck._set_min_work_per_thread(old)


@pytest.mark.parametrize("mix", [(QT.Q4_K, QT.Q4_K, QT.Q5_0), (QT.Q8_0, QT.Q8_0, QT.Q8_0),
                                 (QT.IQ4_XS, QT.Q6_K, QT.IQ4_NL), (QT.Q2_K, QT.Q5_K, QT.F16)],
                         ids=lambda m: "-".join(t.name for t in m))
def test_results_independent_of_thread_count(path, all_threads, mix):
    """Bit-identical output for 1, 2 and 3 threads (each output element is owned by one work unit and
    summed in a fixed order; the tokens-per-pass grouping does not depend on the threads)."""
    rng = np.random.default_rng(21)
    I = 256 if mix[2] in K_TYPES else 288    # 288: a group of 8 blocks and one loose block
    (G, U, D), _ = _make(*mix, 16, I, 512, rng)
    D = D.repacked()      # Q5_0: the repacked layout, as the loader uses it
    for T in (1, 4, 9, 33, 160):   # 160 x 512 > 64k: x is quantized inside the parallel region
        x = rng.standard_normal((T, 512), dtype=np.float32)
        ids = _routing(T, 8, 16, rng)
        w = rng.random((T, 8), dtype=np.float32)
        a = ck.moe_forward(x, ids, w, G, U, D, threads=1)
        for th in (2, 3):
            np.testing.assert_array_equal(ck.moe_forward(x, ids, w, G, U, D, threads=th), a)


def test_threads_deterministic_and_torch_inputs(all_threads):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    (G, U, D), _ = _make(QT.Q4_K, QT.Q4_K, QT.Q5_0, 16, 96, 256, rng)
    x = rng.standard_normal((9, 256), dtype=np.float32)
    ids = _routing(9, 8, 16, rng)
    w = rng.random((9, 8), dtype=np.float32)
    a = ck.moe_forward(x, ids, w, G, U, D, threads=1)
    b = ck.moe_forward(x, ids, w, G, U, D, threads=2)
    np.testing.assert_array_equal(a, b)
    out = torch.full((9, 256), float("nan"))
    r = ck.moe_forward(torch.from_numpy(x), torch.from_numpy(ids).long(), torch.from_numpy(w), G, U, D, out=out)
    assert r is out
    np.testing.assert_array_equal(out.numpy(), a)


def test_paths_agree():
    """Every SIMD path gives (nearly) the reference path's result: same integer math, only float
    summation order differs."""
    rng = np.random.default_rng(14)
    (G, U, D), _ = _make(QT.IQ4_XS, QT.Q5_K, QT.Q5_0, 16, 96, 512, rng)
    x = rng.standard_normal((5, 512), dtype=np.float32)
    ids = _routing(5, 6, 16, rng)
    w = rng.random((5, 6), dtype=np.float32)
    old = ck.active_path()
    try:
        res = {}
        for p in PATHS:
            ck._set_path(p)
            res[p] = ck.moe_forward(x, ids, w, G, U, D)
    finally:
        ck._set_path(old)
    for p in PATHS:
        np.testing.assert_allclose(res[p], res["ref"], rtol=0, atol=1e-4 * np.abs(res["ref"]).max())


def test_random_blocks_valid():
    rng = np.random.default_rng(15)
    for t in ALL_TYPES:
        for method in ("auto", "bytes"):
            shape = (2, 3, max(_bs(t), 32) * 2)
            data = ck.random_blocks(t, shape, rng, method=method)
            f = ck.dequantize(data, t, shape)
            assert f.shape == shape and np.isfinite(f).all()
            assert 0 < np.abs(f).max() < 10


# ------------------------------------------------------------------ path selection / info
def _run_py(code, env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_env_forces_path():
    for p in PATHS:
        key = "avx512" if p.startswith("avx512") else p
        r = _run_py("import cpu_kernels; print(cpu_kernels.active_path())", {"NEXTN_KERNEL_PATH": key})
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == p
    if "avx512vnni" not in PATHS:
        r = _run_py("import cpu_kernels", {"NEXTN_KERNEL_PATH": "avx512"})
        assert r.returncode != 0 and "not supported by this CPU" in r.stderr
    r = _run_py("import cpu_kernels", {"NEXTN_KERNEL_PATH": "sse9"})
    assert r.returncode != 0 and "NEXTN_KERNEL_PATH" in r.stderr


def test_main_prints_info():
    r = subprocess.run([sys.executable, "-m", "cpu_kernels"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "path" in r.stdout and "-fopenmp" in r.stdout and "threads" in r.stdout


def test_threads_api():
    old = ck.get_threads()
    ck.set_threads(1)
    assert ck.get_threads() == 1
    ck.set_threads(None)
    assert ck.get_threads() >= 1
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError):
            ck.set_threads(bad)
    ck.set_threads(old)


# ------------------------------------------------------------------ bad arguments
@pytest.fixture(scope="module")
def good():
    rng = np.random.default_rng(16)
    E, I, H = 4, 64, 256
    (G, U, D), _ = _make(QT.Q4_K, QT.Q4_K, QT.Q8_0, E, I, H, rng)
    x = rng.standard_normal((3, H), dtype=np.float32)
    ids = np.array([[0, 1], [2, 3], [1, 1]], dtype=np.int32)
    w = np.ones((3, 2), dtype=np.float32)
    return dict(x=x, expert_ids=ids, expert_weights=w, gate=G, up=U, down=D)


def _call(good, **over):
    args = dict(good)
    args.update(over)
    return ck.moe_forward(**args)


@pytest.mark.parametrize("case,exc,match", [
    (lambda g: dict(x=g["x"].astype(np.float64)), TypeError, "x must be float32"),
    (lambda g: dict(x=g["x"][:, :128]), ValueError, "x"),
    (lambda g: dict(x=np.ones((256, 3), np.float32).T), ValueError, "contiguous"),
    (lambda g: dict(x=g["x"][0]), ValueError, "2-D"),
    (lambda g: dict(x=[[1.0] * 256]), TypeError, "x must be"),
    (lambda g: dict(expert_ids=g["expert_ids"].astype(np.float32)), TypeError, "expert_ids"),
    (lambda g: dict(expert_ids=g["expert_ids"][:2]), ValueError, "expert_ids"),
    (lambda g: dict(expert_ids=g["expert_ids"] + 3), ValueError, "out of range"),
    (lambda g: dict(expert_ids=g["expert_ids"] - 1), ValueError, "out of range"),
    (lambda g: dict(expert_weights=g["expert_weights"].astype(np.float16)), TypeError, "expert_weights"),
    (lambda g: dict(expert_weights=g["expert_weights"][:, :1]), ValueError, "expert_weights"),
    (lambda g: dict(gate=g["down"]), ValueError, "shape"),
    (lambda g: dict(down=g["gate"]), ValueError, "down shape"),
    (lambda g: dict(up="nope"), TypeError, "up must be"),
    (lambda g: dict(out=np.empty((3, 255), np.float32)), ValueError, "out"),
    (lambda g: dict(out=np.empty((3, 256), np.float64)), TypeError, "out"),
    (lambda g: dict(out=g["x"]), ValueError, "overlap"),
    (lambda g: dict(threads=0), ValueError, "threads"),
])
def test_bad_arguments(good, case, exc, match):
    over = case(good)
    if exc is None:
        _call(good, **over)  # a valid variant must work
        return
    with pytest.raises(exc, match=match):
        _call(good, **over)


def test_bad_expert_tensor():
    rng = np.random.default_rng(17)
    data = ck.random_blocks(QT.Q4_K, (2, 8, 256), rng)
    ck.ExpertTensor(data, QT.Q4_K, (2, 8, 256))
    ck.ExpertTensor(data, int(QT.Q4_K), [2, 8, 256])
    with pytest.raises(ValueError, match="bytes"):
        ck.ExpertTensor(data.reshape(-1)[:-144], QT.Q4_K, (2, 8, 256))  # byte size mismatch
    with pytest.raises(ValueError, match="bytes"):
        ck.ExpertTensor(data, QT.Q5_K, (2, 8, 256))                 # wrong type for the bytes
    with pytest.raises(ValueError, match="multiple"):
        ck.ExpertTensor(data, QT.Q4_K, (2, 9, 128))                 # cols not a block multiple
    with pytest.raises(ValueError, match="contiguous"):
        ck.ExpertTensor(np.concatenate([data, data], axis=2)[:, :, ::2], QT.Q4_K, (2, 8, 256))
    with pytest.raises(ValueError, match="not supported"):
        ck.ExpertTensor(data, QT.Q8_1, (2, 8, 256))                 # unsupported type
    with pytest.raises(ValueError, match="not supported"):
        ck.ExpertTensor(data, 999, (2, 8, 256))
    with pytest.raises(TypeError):
        ck.ExpertTensor(data, 12.0, (2, 8, 256))
    with pytest.raises(ValueError, match="shape"):
        ck.ExpertTensor(data, QT.Q4_K, (2, 8))
    with pytest.raises(ValueError, match="aligned"):
        raw = np.zeros(data.nbytes + 1, np.uint8)[1:]
        ck.ExpertTensor(raw, QT.Q4_K, (2, 8, 256))
    with pytest.raises(TypeError):
        ck.ExpertTensor(bytes(data.nbytes), QT.Q4_K, (2, 8, 256))


def test_mismatched_h_between_tensors():
    rng = np.random.default_rng(18)
    G = ck.ExpertTensor(ck.random_blocks(QT.Q8_0, (3, 64, 256), rng), QT.Q8_0, (3, 64, 256))
    U = ck.ExpertTensor(ck.random_blocks(QT.Q8_0, (3, 64, 512), rng), QT.Q8_0, (3, 64, 512))
    D = ck.ExpertTensor(ck.random_blocks(QT.Q8_0, (3, 256, 64), rng), QT.Q8_0, (3, 256, 64))
    D2 = ck.ExpertTensor(ck.random_blocks(QT.Q8_0, (4, 256, 64), rng), QT.Q8_0, (4, 256, 64))
    x = np.ones((1, 256), np.float32)
    ids = np.zeros((1, 1), np.int32)
    w = np.ones((1, 1), np.float32)
    with pytest.raises(ValueError, match="up shape"):
        ck.moe_forward(x, ids, w, G, U, D)
    with pytest.raises(ValueError, match="down shape"):
        ck.moe_forward(x, ids, w, G, G, D2)
    out = ck.moe_forward(np.empty((0, 256), np.float32), np.empty((0, 1), np.int32), np.empty((0, 1), np.float32), G, G, D)
    assert out.shape == (0, 256)


def test_out_of_range_ids_checked_before_writing(good):
    """The id range is checked in C before anything is read or written (int32), or in Python
    (int64, before the narrowing copy); out is left untouched either way."""
    out = np.full(good["x"].shape, np.nan, np.float32)
    for ids in (good["expert_ids"] + 3, (good["expert_ids"] - 1).astype(np.int64),
                good["expert_ids"].astype(np.int64) + 2**32):
        with pytest.raises(ValueError, match="out of range"):
            _call(good, expert_ids=ids, out=out)
        assert np.isnan(out).all()


def test_triple_cache_does_not_hide_bad_triples(good):
    """moe_forward caches validated (gate, up, down) triples; a new triple is still checked."""
    _call(good)
    _call(good)
    with pytest.raises(ValueError, match="down shape"):
        _call(good, down=good["gate"])
    with pytest.raises(TypeError, match="gate must be"):
        _call(good, gate=None)


# ------------------------------------------------------------------ the dense linear call

def _linear_case(t, N, K, T, rng):
    w = ck.random_blocks(t, (1, N, K), rng)
    W = ck.ExpertTensor(w, t, (1, N, K))
    wf = ck.dequantize(w, t, (1, N, K))[0]
    x = rng.standard_normal((T, K), dtype=np.float32)
    return W, wf, x


@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("T", [1, 3, 5, 70])
def test_linear_each_type(path, t, T):
    """out = x @ W.T against gguf's dequantize + float64, and against the same with the kernels'
    activation rounding emulated (tight). N is odd (a partial block of rows); K is the smallest
    legal width for T=1 and several blocks otherwise; the output is poisoned with NaN."""
    rng = np.random.default_rng(int(t) * 10 + T)
    K = _bs(t) if T == 1 else 3 * _bs(t)
    N = 77
    W, wf, x = _linear_case(t, N, K, T, rng)
    out = np.full((T, N), np.nan, dtype=np.float32)
    assert ck.linear(x, W, out=out) is out
    ref = x.astype(np.float64) @ wf.astype(np.float64).T
    scale = np.abs(ref).max()
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() / scale < TOL_EXACT[t]
    emu = _fake_quant(x, _fam(t)) @ wf.astype(np.float64).T
    assert np.abs(out - emu).max() / scale < TOL_EMU


def test_linear_fills_a_column_slice(path):
    """Several weights fill one output: each call writes exactly its columns, every row."""
    rng = np.random.default_rng(7)
    T, K = 6, 512
    parts = [_linear_case(t, n, K, T, rng)[:2] for t, n in ((QT.Q4_K, 40), (QT.Q8_0, 9), (QT.Q6_K, 33))]
    x = rng.standard_normal((T, K), dtype=np.float32)
    out = np.full((T, 82 + 5), np.nan, dtype=np.float32)  # 5 columns no call may touch
    r0 = 0
    for W, wf in parts:
        n = W.shape[1]
        ck.linear(x, W, out=out[:, r0:r0 + n])
        ref = x.astype(np.float64) @ wf.astype(np.float64).T
        assert np.abs(out[:, r0:r0 + n] - ref).max() / np.abs(ref).max() < TOL_EXACT[QT.Q4_K]
        r0 += n
    assert np.isnan(out[:, 82:]).all()


def test_linear_independent_of_thread_count(all_threads):
    rng = np.random.default_rng(3)
    W, _, x = _linear_case(QT.Q4_K, 300, 1024, 4, rng)
    one = ck.linear(x, W, threads=1)
    for n in (2, 3, 8):
        assert np.array_equal(ck.linear(x, W, threads=n), one)


@pytest.mark.parametrize("case,exc,match", [
    ("three_experts", ValueError, "one matrix"),
    ("wrong_k", ValueError, r"x must be \[T, 256\]"),
    ("f64", TypeError, "float32"),
    ("strided_x", ValueError, "C-contiguous"),
    ("out_shape", ValueError, "out must have shape"),
    ("out_column_stride", ValueError, "unit column stride"),
    ("out_readonly", ValueError, "writable"),
    ("overlap", ValueError, "overlap"),
    ("threads", ValueError, "positive integer"),
    ("not_a_tensor", TypeError, "ExpertTensor"),
])
def test_linear_bad_arguments(case, exc, match):
    rng = np.random.default_rng(1)
    W, _, x = _linear_case(QT.Q8_0, 16, 256, 2, rng)
    kw = {}
    if case == "three_experts":
        W = ck.ExpertTensor(ck.random_blocks(QT.Q8_0, (3, 16, 256), rng), QT.Q8_0, (3, 16, 256))
    elif case == "wrong_k":
        x = np.zeros((2, 128), np.float32)
    elif case == "f64":
        x = x.astype(np.float64)
    elif case == "strided_x":
        x = np.zeros((2, 512), np.float32)[:, ::2]
    elif case == "out_shape":
        kw["out"] = np.zeros((2, 15), np.float32)
    elif case == "out_column_stride":
        kw["out"] = np.zeros((2, 32), np.float32)[:, ::2]
    elif case == "out_readonly":
        o = np.zeros((2, 16), np.float32)
        o.flags.writeable = False
        kw["out"] = o
    elif case == "overlap":
        buf = np.zeros((2, 256), np.float32)
        x, kw["out"] = buf, buf[:, :16]
    elif case == "threads":
        kw["threads"] = 0
    elif case == "not_a_tensor":
        W = np.zeros((16, 256), np.float32)
    with pytest.raises(exc, match=match):
        ck.linear(x, W, **kw)


@pytest.mark.parametrize("t", [QT.Q8_0, QT.Q4_K, QT.Q6_K, QT.Q5_0, QT.F16, QT.F32], ids=lambda t: t.name)
@pytest.mark.parametrize("T", [1, 4, 17])
def test_linear_heads_each_head_its_own_matrix(path, t, T):
    """out[t, e] = W[e] x[t, e] (latent attention's per-head k_b / v_b): against float64 over
    gguf's dequantization, and bit for bit against `linear` on each head's matrix alone (so a row
    keeps its bits in any batch, as `linear` does). 5 heads of 37 rows: odd sizes."""
    rng = np.random.default_rng(int(t) + T)
    E, N, K = 5, 37, 2 * _bs(t)
    raw = ck.random_blocks(t, (E, N, K), rng)
    W = ck.ExpertTensor(raw, t, (E, N, K))
    wf = ck.dequantize(raw, t, (E, N, K)).astype(np.float64)
    x = rng.standard_normal((T, E, K), dtype=np.float32)
    out = ck.linear_heads(x, W)
    ref = np.einsum("end,ted->ten", wf, x.astype(np.float64))
    assert out.shape == (T, E, N) and np.isfinite(out).all()
    assert np.abs(out - ref).max() / np.abs(ref).max() < TOL_EXACT[t]
    for e in range(E):
        alone = ck.linear(np.ascontiguousarray(x[:, e]), ck.ExpertTensor(raw[e:e + 1], t, (1, N, K)))
        assert np.array_equal(out[:, e], alone), e
    if T > 1:
        assert np.array_equal(ck.linear_heads(x[:1], W)[0], out[0])


def test_linear_heads_independent_of_thread_count(all_threads):
    """Heads split between threads (as many heads as threads or more) or threads within a head
    (fewer heads): the same bits either way."""
    rng = np.random.default_rng(4)
    for E in (2, 7):
        W = ck.ExpertTensor(ck.random_blocks(QT.Q4_K, (E, 48, 512), rng), QT.Q4_K, (E, 48, 512))
        x = rng.standard_normal((3, E, 512), dtype=np.float32)
        one = ck.linear_heads(x, W, threads=1)
        for n in (2, 3, 8):
            assert np.array_equal(ck.linear_heads(x, W, threads=n), one), (E, n)


def test_linear_heads_bad_arguments():
    rng = np.random.default_rng(2)
    W = ck.ExpertTensor(ck.random_blocks(QT.Q8_0, (3, 8, 64), rng), QT.Q8_0, (3, 8, 64))
    with pytest.raises(ValueError, match=r"x must be \[T, 3, 64\]"):
        ck.linear_heads(np.zeros((2, 4, 64), np.float32), W)
    with pytest.raises(TypeError, match="float32"):
        ck.linear_heads(np.zeros((2, 3, 64)), W)
    with pytest.raises(TypeError, match="ExpertTensor"):
        ck.linear_heads(np.zeros((2, 3, 64), np.float32), np.zeros((3, 8, 64), np.float32))
    assert ck.linear_heads(np.zeros((0, 3, 64), np.float32), W).shape == (0, 3, 8)


FUSED_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.IQ4_NL, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS]


@pytest.mark.parametrize("t", FUSED_TYPES + [QT.Q4_1, QT.F16], ids=lambda t: t.name)
def test_linear_rows_do_not_depend_on_the_batch(path, t):
    """A row's result has the same bits alone or in a batch of 2..9 (the multi-token dots, the
    tiled path and the threads must not change a token's summation order): a verify batch's row
    must equal the plain step's, or greedy MTP can part from plain greedy."""
    rng = np.random.default_rng(int(t))
    W, _, x = _linear_case(t, 37, 2 * _bs(t) if _bs(t) > 32 else 288, 9, rng)
    W = W.repacked()
    rows = np.stack([ck.linear(x[i:i + 1], W)[0] for i in range(9)])
    for T in range(2, 10):
        assert np.array_equal(ck.linear(x[:T], W), rows[:T]), f"T={T}"


@pytest.mark.parametrize("mix", [(QT.Q4_K, QT.Q4_K, QT.Q5_0), (QT.Q6_K, QT.Q5_K, QT.Q8_0),
                                 (QT.IQ4_XS, QT.Q3_K, QT.IQ4_NL)], ids=lambda m: "-".join(t.name for t in m))
def test_moe_rows_do_not_depend_on_the_batch(path, mix):
    """The same for the MoE call, with rows that share experts (grouped and dotted together)."""
    rng = np.random.default_rng(5)
    E, I, H = 6, 256, 512
    (G, U, D), _ = _make(*mix, E, I, H, rng)
    G, U, D = G.repacked(), U.repacked(), D.repacked()
    x = rng.standard_normal((7, H), dtype=np.float32)
    ids = _routing(7, 3, E, rng)
    ids[1] = ids[0]  # two rows with the same experts
    w = rng.random(ids.shape, dtype=np.float32)
    rows = np.stack([ck.moe_forward(x[i:i + 1], ids[i:i + 1], w[i:i + 1], G, U, D)[0] for i in range(7)])
    for T in range(2, 8):
        assert np.array_equal(ck.moe_forward(x[:T], ids[:T], w[:T], G, U, D), rows[:T]), f"T={T}"


# ---- dequantize_rows -------------------------------------------------------------------------------

@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_rows_equals_gguf_bit_for_bit(path, t):
    """Every type, on every path: all rows of a 3-D tensor, and a selection with repeats, equal
    gguf's reference decoder exactly (quantized types from uniformly random bytes: any fp16
    scale, subnormal, NaN and infinity included, any code); the output is poisoned first."""
    rng = np.random.default_rng(int(t) + 100)
    E, R, C = 3, 37, 2 * _bs(t) if _bs(t) > 32 else 96
    if t in FLOAT_TYPES:
        raw = ck.random_blocks(t, (E, R, C), rng)
    else:
        raw = rng.integers(0, 256, size=(E, R, ck.row_bytes(t, C)), dtype=np.uint8)
    W = ck.ExpertTensor(raw, t, (E, R, C))
    with np.errstate(all="ignore"):  # inf * 0 in gguf's numpy: NaN, as in the kernels
        ref = ck.dequantize(raw, t, (E, R, C)).reshape(E * R, C)  # gguf.quants.dequantize
    out = np.full((E * R, C), np.nan, np.float32)
    assert ck.dequantize_rows(W, out=out) is out
    assert np.array_equal(out, ref, equal_nan=True)
    idx = np.array([5, 0, E * R - 1, 5, 40])
    assert np.array_equal(ck.dequantize_rows(W, rows=idx), ref[idx], equal_nan=True)
    assert ck.dequantize_rows(W, rows=np.array([], np.int64)).shape == (0, C)
    if W.can_repack():  # a repacked copy decodes to the same values
        assert np.array_equal(ck.dequantize_rows(W.repacked()), ref, equal_nan=True)


def test_dequantize_rows_independent_of_thread_count(all_threads):
    rng = np.random.default_rng(4)
    W = ck.ExpertTensor(ck.random_blocks(QT.Q4_K, (1, 301, 512), rng), QT.Q4_K, (1, 301, 512))
    one = ck.dequantize_rows(W, threads=1)
    for n in (2, 3, 8):
        assert np.array_equal(ck.dequantize_rows(W, threads=n), one)


@pytest.mark.parametrize("case,exc,match", [
    ("not_a_tensor", TypeError, "ExpertTensor"),
    ("rows_2d", ValueError, "1-D array of integers"),
    ("rows_float", ValueError, "1-D array of integers"),
    ("rows_negative", ValueError, "out of range"),
    ("rows_past_end", ValueError, "out of range"),
    ("out_shape", ValueError, "shape"),
    ("out_dtype", ValueError, "float32"),
    ("out_readonly", ValueError, "writable"),
    ("out_strided", ValueError, "C-contiguous"),
    ("threads", ValueError, "positive integer"),
])
def test_dequantize_rows_bad_arguments(case, exc, match):
    rng = np.random.default_rng(2)
    W = ck.ExpertTensor(ck.random_blocks(QT.Q8_0, (2, 8, 64), rng), QT.Q8_0, (2, 8, 64))
    kw = {}
    if case == "not_a_tensor":
        W = np.zeros((16, 64), np.float32)
    elif case == "rows_2d":
        kw["rows"] = np.zeros((2, 2), np.int64)
    elif case == "rows_float":
        kw["rows"] = np.array([1.0])
    elif case == "rows_negative":
        kw["rows"] = np.array([0, -1])
    elif case == "rows_past_end":
        kw["rows"] = np.array([16])
    elif case == "out_shape":
        kw["out"] = np.zeros((16, 32), np.float32)
    elif case == "out_dtype":
        kw["out"] = np.zeros((16, 64), np.float64)
    elif case == "out_readonly":
        o = np.zeros((16, 64), np.float32)
        o.flags.writeable = False
        kw["out"] = o
    elif case == "out_strided":
        kw["out"] = np.zeros((16, 128), np.float32)[:, ::2]
    elif case == "threads":
        kw["threads"] = 0
    with pytest.raises(exc, match=match):
        ck.dequantize_rows(W, **kw)


# ---- the dense linear's multi-token kernels ----------------------------------------------------------
# Q8_0 / Q4_K / Q6_K in their repacked layouts (the loader's `repack`) and F16 run through the
# multi-token kernels (cpu_kernels/linear_impl.h) on the SIMD paths for every T: a row's bits must not
# depend on T, its position in the batch, the tile of rows it falls in or the thread count.
LIN_CASES = [(QT.Q8_0, 37, 15 * 32),   # groups of 8 and of 4 and 3 loose blocks (Q8_0_R8 tails)
             (QT.Q8_0, 21, 64 * 32),
             (QT.Q4_K, 37, 3 * 256),
             # rows so wide that 4 tokens' activations overflow NX_L1_ACT: passes of 8 tokens
             (QT.Q8_0, 5, 192 * 32),
             (QT.Q4_K, 5, 24 * 256),
             (QT.Q6_K, 37, 3 * 256),
             (QT.F16, 37, 16 * 5 + 13),  # vector chunks + a tail on either path
             (QT.F16, 9, 7)]


@pytest.mark.parametrize("t,N,K", LIN_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_linear_multi_token_rows_same_bits_as_alone(path, t, N, K):
    """For T = 1..17 every row of the batched result equals (np.array_equal) that row computed
    alone, on every SIMD path; outputs start as NaN so an unwritten element fails; the batch is
    also within the per-type tolerances of gguf's dequantize + float64, and the same with 1 and 2
    threads."""
    rng = np.random.default_rng(int(t) * 100 + K)
    W, wf, x = _linear_case(t, N, K, 17, rng)
    W = W.repacked()
    x *= rng.uniform(0.1, 10.0, size=(17, 1)).astype(np.float32)   # rows of different scales
    alone = np.full((17, N), np.nan, dtype=np.float32)
    for i in range(17):
        ck.linear(x[i:i + 1], W, out=alone[i:i + 1])
    assert np.isfinite(alone).all()
    ref = x.astype(np.float64) @ wf.astype(np.float64).T
    emu = _fake_quant(x, _fam(t)) @ wf.astype(np.float64).T
    for T in range(1, 18):
        for start in (0, 17 - T):      # the rows at the start and at the end of the batch
            out = np.full((T, N), np.nan, dtype=np.float32)
            ck.linear(x[start:start + T], W, out=out)
            assert np.array_equal(out, alone[start:start + T]), f"T={T} start={start}"
    scale = np.abs(ref).max(axis=1, keepdims=True)
    assert (np.abs(alone - ref) / scale).max() < TOL_EXACT[t]
    assert (np.abs(alone - emu) / scale).max() < TOL_EMU
    for n in (1, 2):
        assert np.array_equal(ck.linear(x, W, threads=n), alone)
