"""Bad arguments to the C kernels are exceptions, never an out-of-bounds access.

Two layers, each tested: the Python wrapper (cpu_kernels/__init__.py) checks shapes, dtypes,
strides, buffer sizes, expert ids, row indices and thread counts before the C call; the C entry
points (dispatch.c) check the tensor descriptors, thread counts and index ranges again and return
an error code, tested here by corrupting a descriptor behind the wrapper's back. Under
.ci/sanitize.sh (AddressSanitizer + UBSan) any access these let through would abort the run.
"""
from __future__ import annotations

import numpy as np
import pytest

ck = pytest.importorskip("cpu_kernels")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT  # noqa: E402

E, I, H = 4, 96, 64


def _tensor(t, shape, seed=0):
    data = ck.random_blocks(t, shape, np.random.default_rng(seed), method="bytes")
    return ck.ExpertTensor(data, t, shape)


@pytest.fixture(scope="module")
def experts():
    return (_tensor(QT.Q8_0, (E, I, H), 1), _tensor(QT.Q8_0, (E, I, H), 2), _tensor(QT.Q8_0, (E, H, I), 3))


def _call(experts, x=None, ids=None, w=None, **kw):
    x = np.ones((2, H), np.float32) if x is None else x
    ids = np.array([[0, 1], [2, 3]], np.int32) if ids is None else ids
    w = np.full(ids.shape, 0.5, np.float32) if w is None else w
    return ck.moe_forward(x, ids, w, *experts, **kw)


def test_good_call_works(experts):
    assert _call(experts).shape == (2, H)


@pytest.mark.parametrize("ids", [[[0, 4], [1, 2]], [[-1, 0], [1, 2]], [[0, 2**31 - 1], [1, 2]]])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_expert_id_out_of_range(experts, ids, dtype):
    with pytest.raises(ValueError, match="expert_ids out of range"):
        _call(experts, ids=np.array(ids, dtype))


@pytest.mark.parametrize("kw,exc,word", [
    (dict(x=np.ones((2, H + 1), np.float32)), ValueError, "H="),
    (dict(x=np.ones((2, H), np.float64)), TypeError, "float32"),
    (dict(x=np.ones((2, H, 1), np.float32)), ValueError, "2-D"),
    (dict(x=np.ones((H, 2), np.float32).T), ValueError, "contiguous"),
    (dict(ids=np.zeros((3, 2), np.int32)), ValueError, "expert_ids must be"),
    (dict(ids=np.zeros((2, 0), np.int32), w=np.zeros((2, 0), np.float32)), ValueError, "expert_ids must be"),
    (dict(ids=np.zeros((2, 2), np.float32)), TypeError, "int32 or int64"),
    (dict(w=np.ones((2, 3), np.float32)), ValueError, "expert_weights shape"),
    (dict(w=np.ones((2, 2), np.float16)), TypeError, "float32"),
    (dict(out=np.empty((2, H - 1), np.float32)), ValueError, "out must have shape"),
    (dict(out=np.empty((2, H), np.float64)), TypeError, "float32"),
    (dict(threads=0), ValueError, "threads"), (dict(threads=-2), ValueError, "threads"),
    (dict(threads=10**6), ValueError, "threads"), (dict(threads=True), ValueError, "threads"),
    (dict(threads=2.0), ValueError, "threads"),
])
def test_moe_forward_bad_arguments(experts, kw, exc, word):
    with pytest.raises(exc, match=word):
        _call(experts, **kw)


def test_out_overlapping_x(experts):
    buf = np.ones((2, H), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        _call(experts, x=buf, out=buf)


def test_mismatched_triple():
    g, u = _tensor(QT.Q8_0, (E, I, H)), _tensor(QT.Q8_0, (E, I, H))
    with pytest.raises(ValueError, match="down shape"):
        ck.moe_forward(np.ones((1, H), np.float32), np.zeros((1, 1), np.int32), np.ones((1, 1), np.float32),
                       g, u, _tensor(QT.Q8_0, (E, I, H)))
    with pytest.raises(ValueError, match="up shape"):
        ck.moe_forward(np.ones((1, H), np.float32), np.zeros((1, 1), np.int32), np.ones((1, 1), np.float32),
                       g, _tensor(QT.Q8_0, (E + 1, I, H)), _tensor(QT.Q8_0, (E, H, I)))


@pytest.mark.parametrize("t", [QT.Q8_0, QT.Q4_K, QT.F16, QT.F32])
def test_expert_tensor_wrong_buffer_size(t):
    good = ck.random_blocks(t, (2, 8, 256), np.random.default_rng(0), method="bytes")
    raw = np.ascontiguousarray(good).view(np.uint8).reshape(-1)
    for bad in (raw[:-1], np.concatenate([raw, raw[:1]]), raw[:0]):
        with pytest.raises(ValueError, match="holds|bytes"):
            ck.ExpertTensor(bad, t, (2, 8, 256))
    with pytest.raises(ValueError):
        ck.ExpertTensor(raw, t, (2, 8, 255))  # a partial block, or a size mismatch
    for shape in [(0, 8, 256), (2, -8, 256), (2, 8), ("a", 8, 256)]:
        with pytest.raises(ValueError):
            ck.ExpertTensor(raw, t, shape)
    with pytest.raises((TypeError, ValueError)):
        ck.ExpertTensor(raw, 1000, (2, 8, 256))  # not a ggml type


def test_linear_bad_arguments():
    w = _tensor(QT.Q8_0, (1, 32, 64))
    with pytest.raises(ValueError, match="one matrix"):
        ck.linear(np.ones((1, 64), np.float32), _tensor(QT.Q8_0, (2, 32, 64)))
    with pytest.raises(ValueError, match="x must be"):
        ck.linear(np.ones((1, 63), np.float32), w)
    wide = np.empty((3, 40), np.float32)
    with pytest.raises(ValueError, match="out must have shape"):
        ck.linear(np.ones((3, 64), np.float32), w, out=wide)
    with pytest.raises(ValueError, match="unit column stride"):  # rows closer than N floats
        ck.linear(np.ones((3, 64), np.float32), w, out=np.lib.stride_tricks.as_strided(
            wide, shape=(3, 32), strides=(16 * 4, 4)))
    with pytest.raises(ValueError, match="threads"):
        ck.linear(np.ones((1, 64), np.float32), w, threads=0)


def test_dequantize_rows_bad_arguments():
    w = _tensor(QT.Q4_K, (2, 8, 256))
    for rows in ([16], [-1], [0, 3, 10**12]):
        with pytest.raises(ValueError, match="out of range"):
            ck.dequantize_rows(w, rows=np.array(rows))
    with pytest.raises(ValueError, match="integers"):
        ck.dequantize_rows(w, rows=np.array([0.5]))
    with pytest.raises(ValueError, match="out must be"):
        ck.dequantize_rows(w, rows=np.array([0, 1]), out=np.empty((3, 256), np.float32))
    with pytest.raises(ValueError, match="overlap"):
        ck.dequantize_rows(w, rows=np.array([0]), out=w.data.reshape(-1)[:1024].view(np.float32).reshape(1, 256))


def test_set_threads_bounds():
    old = ck.get_threads()
    for bad in (0, -1, 10**7, 1.5, "4", True):
        with pytest.raises(ValueError):
            ck.set_threads(bad)
    assert ck.get_threads() == old


# ---- the C side's own checks: descriptors corrupted behind the wrapper's back

def _corrupted(t: "ck.ExpertTensor", **fields):
    """A copy of `t` whose C descriptor lies (the wrapper's checks already passed for `t`)."""
    c = ck.ExpertTensor(t.data, t.ggml_type, t.shape, layout=t.layout)
    for k, v in fields.items():
        setattr(c._c, k, v)
    return c


@pytest.mark.parametrize("fields", [dict(rows=I * 4), dict(rows=I - 32), dict(cols=H * 2), dict(row_bytes=1), dict(type=99),
                                    dict(type=4), dict(n_expert=0), dict(n_expert=-1), dict(cols=H + 1),
                                    dict(type=int(QT.Q4_0) + 100 - 100 + 1000)])
def test_c_refuses_a_lying_descriptor(experts, fields):
    g, u, d = experts
    bad = _corrupted(g, **fields)
    ck._check_triple(bad, u, d)  # the cached Python check sees honest shapes; only C sees the lie
    with pytest.raises(ValueError, match="rc=-4"):
        ck.moe_forward(np.ones((1, H), np.float32), np.zeros((1, 1), np.int32), np.ones((1, 1), np.float32),
                       bad, u, d)


def test_c_refuses_lying_linear_and_dequant():
    w = _tensor(QT.Q8_0, (1, 32, 64))
    with pytest.raises(ValueError, match="rc=-4"):
        ck.linear(np.ones((1, 64), np.float32), _corrupted(w, row_bytes=w.row_bytes + 2))
    # rows within the Python-side count but past the descriptor's rows: C's own range check
    small = _corrupted(_tensor(QT.Q8_0, (1, 32, 64)), rows=4)
    with pytest.raises(ValueError, match="rc=-3"):
        ck.dequantize_rows(small, rows=np.array([10]))


def test_c_row_bytes_table_matches_gguf():
    lib = ck._lib
    for t in ck.SUPPORTED_TYPES:
        block, size = GGML_QUANT_SIZES[t]
        assert lib.nx_type_row_bytes(int(t), block * 3) == 3 * size, t.name
        if block > 1:
            assert lib.nx_type_row_bytes(int(t), block + 1) == -1, t.name
    for t in ck.REPACKED_TYPES:
        block, size = GGML_QUANT_SIZES[t]
        assert lib.nx_type_row_bytes(100 + int(t), block * 2) == 2 * size, t.name
    assert lib.nx_type_row_bytes(100 + int(QT.Q4_1), 32) == -1  # Q4_1 has no repacked layout
    assert lib.nx_type_row_bytes(int(QT.Q8_1), 32) == -1


def test_c_refuses_bad_threads_and_sizes(experts):
    g, u, d = experts
    ffi, lib = ck._ffi, ck._lib
    x = np.ones((1, H), np.float32)
    ids = np.zeros((1, 1), np.int32)
    w = np.ones((1, 1), np.float32)
    out = np.empty((1, H), np.float32)
    args = (ffi.from_buffer("float[]", x), 1, ffi.from_buffer("int32_t[]", ids), ffi.from_buffer("float[]", w))
    o = ffi.from_buffer("float[]", out)
    assert lib.nx_moe_forward(0, *args, 1, g._c, u._c, d._c, o, 1) == 0
    assert lib.nx_moe_forward(0, *args, 1, g._c, u._c, d._c, o, 0) == -4
    assert lib.nx_moe_forward(0, *args, 1, g._c, u._c, d._c, o, 100000) == -4
    assert lib.nx_moe_forward(0, *args, 0, g._c, u._c, d._c, o, 1) == -4  # K = 0
    assert lib.nx_moe_forward(0, args[0], -1, *args[2:], 1, g._c, u._c, d._c, o, 1) == -4  # T < 0
    assert lib.nx_moe_forward(0, *args, 1, g._c, u._c, g._c, o, 1) == -4  # down (E, I, H), not (E, H, I)
    assert lib.nx_moe_forward(7, *args, 1, g._c, u._c, d._c, o, 1) == -2  # no such path
    assert lib.nx_moe_forward(0, *args, 1, g._c, u._c, ffi.NULL, o, 1) == -4
    assert lib.nx_repack(100 + int(QT.Q8_0), ffi.NULL, ffi.NULL, 4, 2, 1) == -4
    assert lib.nx_repack(100 + int(QT.Q8_0), ffi.NULL, ffi.NULL, 0, 2, 1) == 0
    assert lib.nx_repack(int(QT.Q4_1), ffi.NULL, ffi.NULL, 0, 2, 1) == -2


def test_c_refuses_bad_probe_and_helper_arguments():
    ffi, lib = ck._ffi, ck._lib
    buf = np.ones(16, np.int64)
    p = ffi.from_buffer("int64_t[]", buf)
    assert lib.nx_read_bw(p, 16, 1) == 16
    assert lib.nx_read_bw(p, -1, 1) == -4
    assert lib.nx_read_bw(ffi.NULL, 16, 1) == -4
    assert lib.nx_read_bw(p, 16, 0) == -4
    assert lib.nx_read_bw(p, 16, 5000) == -4
    old = lib.nx_set_min_work(1 << 20)
    try:
        assert lib.nx_set_min_work(-1) == -4
        assert lib.nx_set_min_work(1 << 20) == 1 << 20  # the refused call changed nothing
    finally:
        lib.nx_set_min_work(old)
    row = np.zeros(2 * 34, np.uint8)  # two q8_0_r8 blocks (34 bytes each)
    out = np.zeros(34, np.uint8)
    r, o = ffi.from_buffer("uint8_t[]", row), ffi.from_buffer("uint8_t[]", out)
    t = 100 + int(QT.Q8_0)
    assert lib.nx_repacked_block(t, r, 2, 1, o) == 0
    for nb, i in ((2, 2), (2, -1), (0, 0)):
        assert lib.nx_repacked_block(t, r, nb, i, o) == -4
    assert lib.nx_repacked_block(int(QT.Q4_1), r, 2, 0, o) == -2


def test_python_refuses_bad_probe_arguments():
    for kw in (dict(nbytes=0), dict(nbytes=-8), dict(nbytes=1.5), dict(threads=0), dict(repeats=0)):
        with pytest.raises(ValueError):
            ck.read_bandwidth(**{"nbytes": 1 << 12, **kw})
    assert ck.read_bandwidth(1 << 12, threads=1, repeats=1) > 0
    for bad in (-1, 1.0, True, 1 << 63):
        with pytest.raises(ValueError):
            ck._set_min_work_per_thread(bad)
    g = _tensor(QT.Q8_0, (1, 8, 64))
    with pytest.raises(ValueError, match="threads"):
        g.repacked(threads=0)
