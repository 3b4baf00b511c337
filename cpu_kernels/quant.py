"""GGML block layouts as the kernels see them, a generator of random but valid quantized blocks,
and the numpy reference (gguf.quants.dequantize + float64 matmul) used by tests and benchmarks."""
from __future__ import annotations

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

SUPPORTED_TYPES = (
    QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.IQ4_NL,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS,
)
_SUPPORTED = {int(t) for t in SUPPORTED_TYPES}

# fp16 fields inside each block: (byte offset, kind) kind "d" = main scale, "m" = min/dmin
_HALF_FIELDS = {
    QT.Q8_0: ((0, "d"),), QT.Q4_0: ((0, "d"),), QT.Q4_1: ((0, "d"), (2, "m")),
    QT.Q5_0: ((0, "d"),), QT.Q5_1: ((0, "d"), (2, "m")), QT.IQ4_NL: ((0, "d"),),
    QT.Q2_K: ((80, "d"), (82, "m")), QT.Q3_K: ((108, "d"),), QT.Q4_K: ((0, "d"), (2, "m")),
    QT.Q5_K: ((0, "d"), (2, "m")), QT.Q6_K: ((208, "d"),), QT.IQ4_XS: ((0, "d"),),
}
# typical |integer product| a unit of d multiplies (so that d ~ scale / this gives |w| ~ scale)
_INT_RANGE = {
    QT.Q8_0: 64, QT.Q4_0: 4, QT.Q4_1: 8, QT.Q5_0: 8, QT.Q5_1: 16, QT.IQ4_NL: 64,
    QT.Q2_K: 12, QT.Q3_K: 32, QT.Q4_K: 240, QT.Q5_K: 500, QT.Q6_K: 2048, QT.IQ4_XS: 1024,
}
_MIN_RANGE = {QT.Q4_1: 1, QT.Q5_1: 1, QT.Q2_K: 8, QT.Q4_K: 32, QT.Q5_K: 32}
# gguf 0.19 can quantize these in numpy
_GGUF_QUANTIZABLE = {QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1}


def qtype(t) -> QT:
    """Normalise an int / GGMLQuantizationType / name to a supported GGMLQuantizationType."""
    if isinstance(t, str):
        try:
            t = QT[t.upper()]
        except KeyError:
            raise ValueError(f"unknown ggml type name {t!r}") from None
    if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
        raise TypeError(f"ggml_type must be an int or gguf.GGMLQuantizationType, got {type(t).__name__}")
    if int(t) not in _SUPPORTED:
        name = QT(int(t)).name if int(t) in QT._value2member_map_ else str(int(t))
        raise ValueError(f"ggml_type {name} is not supported by cpu_kernels "
                         f"(supported: {', '.join(x.name for x in SUPPORTED_TYPES)})")
    return QT(int(t))


def block_size(t) -> tuple[int, int]:
    """(elements, bytes) of one block of type t."""
    return gguf.GGML_QUANT_SIZES[qtype(t)]


def row_bytes(t, cols: int) -> int:
    be, bb = block_size(t)
    if cols % be:
        raise ValueError(f"cols={cols} is not a multiple of {qtype(t).name}'s block size {be}")
    return cols // be * bb


def random_blocks(ggml_type, shape, rng: np.random.Generator | None = None, scale: float = 0.05,
                  method: str = "auto") -> np.ndarray:
    """Random but valid weights of `ggml_type` with logical `shape` (..., cols), as stored in a GGUF.

    Quantized types come back as uint8 [..., row_bytes], F32/F16 as float arrays, BF16 as uint8
    [..., 2*cols] (gguf's own representation).  Weights are roughly of magnitude `scale`.
    method "auto": quantize random floats with gguf where gguf can (slow for big tensors),
    else random bytes with finite, small fp16 scales; "bytes": always random bytes (fast).
    """
    t = qtype(ggml_type)
    rng = np.random.default_rng() if rng is None else rng
    shape = tuple(int(s) for s in shape)
    cols = shape[-1]
    be, bb = gguf.GGML_QUANT_SIZES[t]
    if cols % be:
        raise ValueError(f"cols={cols} is not a multiple of {t.name}'s block size {be}")
    if t == QT.F32:
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)
    if t == QT.F16:
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)
    if t == QT.BF16:
        f = (rng.standard_normal(shape, dtype=np.float32) * scale).view(np.uint32)
        return (f >> 16).astype(np.uint16).view(np.uint8).reshape(shape[:-1] + (2 * cols,))
    if method == "auto" and t in _GGUF_QUANTIZABLE:
        f = rng.standard_normal(shape, dtype=np.float32) * scale
        return gguf.quants.quantize(f, t)
    nblk = int(np.prod(shape[:-1], dtype=np.int64)) * (cols // be)
    blocks = rng.integers(0, 256, size=(nblk, bb), dtype=np.uint8)
    for off, kind in _HALF_FIELDS[t]:
        base = scale / (_INT_RANGE[t] if kind == "d" else _MIN_RANGE[t])
        vals = (base * rng.uniform(0.5, 1.5, size=nblk)).astype(np.float16)
        blocks[:, off:off + 2] = vals.view(np.uint8).reshape(nblk, 2)
    return blocks.reshape(shape[:-1] + (cols // be * bb,))


def dequantize(data: np.ndarray, ggml_type, shape) -> np.ndarray:
    """float32 array of `shape` (E, rows, cols) from the stored bytes (gguf.quants reference)."""
    t = qtype(ggml_type)
    if t == QT.F32:
        return np.asarray(data).view(np.float32).reshape(shape)
    if t == QT.F16:
        return np.asarray(data).view(np.float16).astype(np.float32).reshape(shape)
    if t == QT.BF16:
        u = np.asarray(data).view(np.uint16).astype(np.uint32) << 16
        return u.view(np.float32).reshape(shape)
    raw = np.asarray(data).view(np.uint8).reshape(shape[:-1] + (row_bytes(t, shape[-1]),))
    return gguf.quants.dequantize(raw, t).reshape(shape).astype(np.float32)


def reference_moe(x, ids, wts, gate_f, up_f, down_f) -> np.ndarray:
    """float64 reference: out[t] = sum_k w[t,k] * down[e] (silu(gate[e] x) * (up[e] x)).
    gate_f/up_f: [E, I, H] floats, down_f: [E, H, I] floats (already dequantized)."""
    x = np.asarray(x, dtype=np.float64)
    T, K = ids.shape
    out = np.zeros((T, x.shape[1]), dtype=np.float64)
    for e in np.unique(ids):
        rows, slots = np.nonzero(ids == e)
        xs = x[rows]
        g = xs @ gate_f[e].astype(np.float64).T
        u = xs @ up_f[e].astype(np.float64).T
        a = g / (1.0 + np.exp(-g)) * u
        y = a @ down_f[e].astype(np.float64).T
        np.add.at(out, rows, y * np.asarray(wts, dtype=np.float64)[rows, slots][:, None])
    return out
