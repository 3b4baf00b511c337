"""Whole decoder blocks in one C call (cpu_kernels/block.h, block_impl.h).

    stack = BlockStack(dims, [BlockWeights(...), ...])
    kv = stack.cache(k_tensors, v_tensors)          # once per KV cache
    stack.forward(x, kv, pos0, start)               # x [T, H] float32, updated in place
    stack.forward_rows(x, kv, pos, lslot, maps)     # rows of several sequences (a batched step)

The descriptors hold pointers into arrays the caller keeps (the model's own weights and caches):
nothing is copied. Everything is validated here, once, when a stack or a cache view is made; a
forward checks only its row range (and C checks the descriptors again before it reads anything).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ExpertTensor, _call_threads, _check_rc, _ffi, _lib, _state

MAX_PARTS = 4  # NX_MAX_PARTS in block.h


@dataclass
class Dims:
    H: int
    n_heads: int
    n_kv: int
    head_dim: int
    eps: float
    rope_cos: np.ndarray  # [positions, head_dim] float32: C = [c, c, 1...]
    rope_sin: np.ndarray  # [positions, head_dim] float32: S = [-s, s, 0...]
    rope_half: int        # rope_dim / 2
    # latent attention (kv_rank > 0, GLM-4.7-Flash): n_kv 1, head_dim = kv_rank + rope dims (the
    # cache row), rope tables [positions, rope dims] in adjacent pairs, softmax scale attn_scale
    q_rank: int = 0
    kv_rank: int = 0
    nope: int = 0
    v_dim: int = 0
    attn_scale: float | None = None  # default head_dim^-0.5


@dataclass
class BlockWeights:
    """One block's weights: float32 arrays [n] for norms, biases and the router; dense weights as
    lists of single-matrix ExpertTensor parts (shape (1, N_i, K)) stacked by rows."""

    attn_norm: np.ndarray
    qkv: list
    wo: list
    post_norm: np.ndarray
    qkv_bias: np.ndarray | None = None
    qk_norm: np.ndarray | None = None      # [n_heads + n_kv, head_dim]
    ffn_gate_up: list | None = None        # dense FFN or shared expert [2F, H]
    ffn_down: list | None = None
    router_w: np.ndarray | None = None     # [E, H]: None for a dense block
    router_b: np.ndarray | None = None     # [E]
    top_k: int = 0
    norm_topk: bool = True
    scale: float = 1.0
    experts: tuple | None = None           # (gate, up, down) ExpertTensor
    # latent attention: qkv is then q_a's parts and kv_a's, stacked by rows
    q_a_norm: np.ndarray | None = None     # [q_rank]
    kv_a_norm: np.ndarray | None = None    # [kv_rank]
    q_b: list | None = None                # [heads (nope + rope), q_rank]
    k_b: object | None = None              # ExpertTensor (heads, kv_rank, nope)
    v_b: object | None = None              # ExpertTensor (heads, v_dim, kv_rank)


def _f32(name: str, a, shape: tuple) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous float32 array")
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")
    return a


# the KV cache element types C reads (kv_type in block.h): float32, or float16 (half the memory
# and half the bytes attention streams; rows rounded to nearest even when written)
KV_TYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}


class KVView:
    """Pointer arrays to one KV pool's per-layer K and V ([length, n_kv, head_dim], all float32 or
    all float16)."""

    def __init__(self, k: list, v: list, n_kv: int, head_dim: int, latent: bool = False):
        if len(k) != len(v) or not k:
            raise ValueError("a KV view needs one K and one V array per layer")
        self.length = int(k[0].shape[0])
        want = (self.length, n_kv, head_dim)
        if latent:  # latent attention keeps no V: C reads the K rows for both
            v = k
        arrays = [np.asarray(a) for a in list(k) + list(v)]
        dt = arrays[0].dtype
        if dt not in KV_TYPES:
            raise ValueError(f"kv[0]: a KV cache of {dt}, expected float32 or float16")
        for i, a in enumerate(arrays):
            if a.dtype != dt or not a.flags.c_contiguous or a.shape != want:
                raise ValueError(f"kv[{i}]: expected a C-contiguous {dt} array of shape {want}, "
                                 f"got {a.dtype} {a.shape}")
        self.arrays, self.kv_type = arrays, KV_TYPES[dt]
        self.n_layers = len(k)
        self.k = _ffi.new("void *[]", [_ffi.cast("void *", a.ctypes.data) for a in arrays[:len(k)]])
        self.v = _ffi.new("void *[]", [_ffi.cast("void *", a.ctypes.data) for a in arrays[len(k):]])
        self._identity = None

    def identity(self) -> np.ndarray:
        """The slot map of a cache that is the whole pool, in order (`BlockStack.forward`)."""
        if self._identity is None:
            self._identity = np.arange(self.length, dtype=np.int32)
        return self._identity


class BlockStack:
    """`final_norm` (float32 [H], optional): an rms_norm weight applied after the last block."""

    def __init__(self, dims: Dims, blocks: list[BlockWeights], final_norm: np.ndarray | None = None):
        if not blocks:
            raise ValueError("a block stack needs at least one block")
        H, nh, nkv, hd = dims.H, dims.n_heads, dims.n_kv, dims.head_dim
        mla, rope = dims.kv_rank > 0, 2 * dims.rope_half
        if min(H, nh, nkv, hd) < 1 or nh % nkv or not 0 <= rope <= hd:
            raise ValueError(f"bad dimensions {dims}")
        if mla and (nkv != 1 or hd != dims.kv_rank + rope or min(dims.q_rank, dims.nope, dims.v_dim) < 1
                    or nh > 64 or hd > 4096):
            raise ValueError(f"bad latent attention dimensions {dims}")
        keep = []  # every array a descriptor points into, kept alive with the stack
        cos = _f32("rope_cos", dims.rope_cos, (dims.rope_cos.shape[0], rope if mla else hd))
        sin = _f32("rope_sin", dims.rope_sin, cos.shape)
        keep += [cos, sin]
        d = _ffi.new("nx_dims *")
        d.H, d.n_heads, d.n_kv, d.head_dim = H, nh, nkv, hd
        d.eps = float(dims.eps)
        d.attn_scale = float(hd) ** -0.5 if dims.attn_scale is None else float(dims.attn_scale)
        d.rope_cos, d.rope_sin = self._ptr(cos), self._ptr(sin)
        d.rope_len, d.rope_half = cos.shape[0], int(dims.rope_half)
        d.q_rank, d.kv_rank, d.nope, d.v_dim = dims.q_rank, dims.kv_rank, dims.nope, dims.v_dim
        arr = _ffi.new("nx_block[]", len(blocks))
        nq, nkvd = nh * hd, nkv * hd
        for i, b in enumerate(blocks):
            c = arr[i]
            c.attn_norm = self._vec(f"block {i} attn_norm", b.attn_norm, H, keep)
            if mla:
                self._lin(f"block {i} q_a + kv_a", c.qkv, b.qkv, dims.q_rank + hd, H, None, keep)
                c.q_a_norm = self._vec(f"block {i} q_a_norm", b.q_a_norm, dims.q_rank, keep)
                c.kv_a_norm = self._vec(f"block {i} kv_a_norm", b.kv_a_norm, dims.kv_rank, keep)
                self._lin(f"block {i} q_b", c.q_b, b.q_b, nh * (dims.nope + rope), dims.q_rank, None, keep)
                for nm, t, shape in (("k_b", b.k_b, (nh, dims.kv_rank, dims.nope)),
                                     ("v_b", b.v_b, (nh, dims.v_dim, dims.kv_rank))):
                    if not isinstance(t, ExpertTensor) or tuple(t.shape) != shape:
                        raise ValueError(f"block {i} {nm}: expected an ExpertTensor {shape}, got {t!r}")
                    keep.append(t)
                c.k_b, c.v_b = b.k_b._c[0], b.v_b._c[0]
                self._lin(f"block {i} wo", c.wo, b.wo, H, nh * dims.v_dim, None, keep)
            else:
                self._lin(f"block {i} qkv", c.qkv, b.qkv, nq + 2 * nkvd, H, b.qkv_bias, keep)
                if b.qk_norm is not None:
                    keep.append(_f32(f"block {i} qk_norm", b.qk_norm, (nh + nkv, hd)))
                    c.qk_norm = self._ptr(b.qk_norm)
                self._lin(f"block {i} wo", c.wo, b.wo, H, nq, None, keep)
            c.post_norm = self._vec(f"block {i} post_norm", b.post_norm, H, keep)
            if b.ffn_gate_up is not None:
                f2 = sum(p.shape[1] for p in b.ffn_gate_up)
                if f2 % 2:
                    raise ValueError(f"block {i} ffn_gate_up: {f2} rows, expected gate and up of equal size")
                self._lin(f"block {i} ffn_gate_up", c.ffn_gate_up, b.ffn_gate_up, f2, H, None, keep)
                self._lin(f"block {i} ffn_down", c.ffn_down, b.ffn_down, H, f2 // 2, None, keep)
            if b.router_w is None:
                if b.ffn_gate_up is None:
                    raise ValueError(f"block {i}: a dense block needs its FFN")
                continue
            E = b.router_w.shape[0] if isinstance(b.router_w, np.ndarray) else 0
            keep.append(_f32(f"block {i} router", b.router_w, (E, H)))
            c.router_w = self._ptr(b.router_w)
            c.router_b = self._vec(f"block {i} router bias", b.router_b, E, keep)
            if not 1 <= int(b.top_k) <= E:
                raise ValueError(f"block {i}: top_k {b.top_k} outside 1..{E}")
            c.n_expert, c.top_k, c.norm_topk, c.scale = E, int(b.top_k), int(bool(b.norm_topk)), float(b.scale)
            gate, up, down = b.experts
            for nm, t in (("gate", gate), ("up", up), ("down", down)):
                if not isinstance(t, ExpertTensor):
                    raise ValueError(f"block {i} experts {nm}: expected an ExpertTensor")
            I = gate.shape[1]
            if gate.shape != (E, I, H) or up.shape != gate.shape or down.shape != (E, H, I):
                raise ValueError(f"block {i} experts: shapes {gate.shape} {up.shape} {down.shape} "
                                 f"do not make {E} experts of [{I}, {H}]")
            keep += [gate, up, down]
            c.exp_gate, c.exp_up, c.exp_down = gate._c[0], up._c[0], down._c[0]
        self._final = _ffi.NULL if final_norm is None else self._vec("final_norm", final_norm, H, keep)
        self.dims, self._d, self._blocks, self._keep = dims, d, arr, keep
        self.n_blocks = len(blocks)
        self._stats = _ffi.new("double[2]")
        self._fn = _lib.nx_blocks_forward

    @staticmethod
    def _ptr(a: np.ndarray):
        return _ffi.cast("float *", a.ctypes.data)

    def _vec(self, name, a, n, keep):
        keep.append(_f32(name, a, (n,)))
        return self._ptr(a)

    def _lin(self, name, c, parts, rows, cols, bias, keep):
        if not parts or len(parts) > MAX_PARTS:
            raise ValueError(f"{name}: 1..{MAX_PARTS} parts expected, got {len(parts or [])}")
        total = 0
        for j, p in enumerate(parts):
            if not isinstance(p, ExpertTensor) or p.shape[0] != 1 or p.shape[2] != cols:
                raise ValueError(f"{name} part {j}: expected an ExpertTensor (1, N, {cols}), got {p!r}")
            c.parts[j] = p._c[0]
            keep.append(p)
            total += p.shape[1]
        if total != rows:
            raise ValueError(f"{name}: parts have {total} rows, expected {rows}")
        c.n_parts = len(parts)
        if bias is not None:
            c.bias = self._vec(f"{name} bias", bias, rows, keep)

    def cache(self, k: list, v: list) -> KVView:
        if len(k) != self.n_blocks:
            raise ValueError(f"a KV cache of {len(k)} layers for {self.n_blocks} blocks")
        return KVView(k, v, self.dims.n_kv, self.dims.head_dim, latent=self.dims.kv_rank > 0)

    def forward(self, x, kv: KVView, pos0: int, start: int, threads: int | None = None) -> tuple[float, int]:
        """Rows x [T, H] of one sequence whose cache is the whole of `kv`, in order: positions pos0..
        and cache slots start.. (`forward_rows` with the identity slot map)."""
        T = x.shape[0] if getattr(x, "ndim", 0) == 2 else 0
        if not 1 <= T or start < 0 or start + T > kv.length or pos0 < 0 or pos0 + T > self._d.rope_len:
            raise ValueError(f"rows {T} at slots {start}.. and positions {pos0}.. exceed the cache "
                             f"({kv.length}) or the rotary table ({self._d.rope_len})")
        pos = np.arange(pos0, pos0 + T, dtype=np.int64)
        lslot = np.arange(start, start + T, dtype=np.int64)
        ident = kv.identity()
        return self.forward_rows(x, kv, pos, lslot, [ident] * T, threads)

    def forward_rows(self, x, kv: KVView, pos: np.ndarray, lslot: np.ndarray, maps: list,
                     threads: int | None = None) -> tuple[float, int]:
        """Rows x [T, H] (float32, C-contiguous; a numpy array or CPU torch tensor), each of its own
        sequence: row t at rotary position pos[t] and logical slot lslot[t] of its sequence, whose
        logical slot j is physical slot maps[t][j] of the pool `kv` (an int32 array per row; rows
        of one sequence pass the same array). Runs every block in place (then the stack's final
        norm, if it has one). Returns (seconds in the routed experts, distinct experts read
        summed over the blocks)."""
        if type(x) is not np.ndarray:
            x = x.numpy()
        T = x.shape[0] if x.ndim == 2 else 0
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != self.dims.H or not x.flags.c_contiguous \
                or not x.flags.writeable:
            raise ValueError(f"x must be a writable C-contiguous float32 [T, {self.dims.H}] array, "
                             f"got {x.dtype} {x.shape}")
        if kv.n_layers != self.n_blocks:
            raise ValueError(f"a KV cache of {kv.n_layers} layers for {self.n_blocks} blocks")
        if T < 1 or len(pos) != T or len(lslot) != T or len(maps) != T:
            raise ValueError(f"{T} rows need {T} positions, slots and slot maps "
                             f"(got {len(pos)}, {len(lslot)}, {len(maps)})")
        pos = np.ascontiguousarray(pos, dtype=np.int64)
        lslot = np.ascontiguousarray(lslot, dtype=np.int64)
        # a slot map is checked and its pointer taken once per call (a sequence's rows share it);
        # cffi's from_buffer, not numpy's ctypes attribute (~2 us each): this runs every step
        seen: dict = {}
        ptrs = []
        for t, (m, ls) in enumerate(zip(maps, lslot.tolist())):
            got = seen.get(id(m))
            if got is None:
                if not isinstance(m, np.ndarray) or m.dtype != np.int32 or not m.flags.c_contiguous:
                    got = (None, 0)
                else:
                    got = (_ffi.cast("int32_t *", _ffi.from_buffer(m)), m.shape[0])
                seen[id(m)] = got
            if not 0 <= ls < got[1]:
                raise ValueError(f"row {t}: slot {ls} needs a C-contiguous int32 slot map longer than that")
            ptrs.append(got[0])
        cmaps = _ffi.new("int32_t *[]", ptrs)
        st = self._stats
        st[0] = st[1] = 0.0
        rc = self._fn(_state["path"], self._d, self._blocks, self.n_blocks, kv.k, kv.v, kv.length, kv.kv_type,
                      _ffi.cast("float *", _ffi.from_buffer(x)), T, _ffi.cast("int64_t *", _ffi.from_buffer(pos)),
                      _ffi.cast("int64_t *", _ffi.from_buffer(lslot)), cmaps, self._final, st,
                      _call_threads(threads))
        if rc == -4:
            raise ValueError("cpu_kernels.blocks_forward: a block descriptor is inconsistent, or a position or slot is out of range")
        _check_rc(rc, "blocks_forward")
        return st[0], int(st[1])


def to_f16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 as the F16 KV cache rounds it (the active path's C conversion)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.float16)
    rc = _lib.nx_to_f16(_state["path"], _ffi.cast("float *", _ffi.from_buffer(x)),
                        _ffi.cast("uint16_t *", _ffi.from_buffer(out)), x.size)
    _check_rc(rc, "to_f16")
    return out
