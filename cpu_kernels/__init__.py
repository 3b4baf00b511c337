"""nextn CPU expert kernels: one fused, quantized MoE call in C (cffi API mode, OpenMP).

    import cpu_kernels
    gate = cpu_kernels.ExpertTensor(data, ggml_type, (E, I, H))   # zero-copy view of the GGUF bytes
    out = cpu_kernels.moe_forward(x, expert_ids, expert_weights, gate, up, down)

out[t] = sum_k w[t,k] * down[e](silu(gate[e] @ x[t]) * (up[e] @ x[t])),  e = expert_ids[t,k].

    w = cpu_kernels.ExpertTensor(data, ggml_type, (1, N, K))          # one dense matrix
    y = cpu_kernels.linear(x, w)                                       # x [T, K] @ W.T -> [T, N]

The same activation quantization and dot cores for the dense weights the model multiplies by on
the CPU side (runtime/linear.py). A row's result has the same bits alone or in a batch.

    rows = cpu_kernels.dequantize_rows(w)                              # float32 [E*R, cols]
    emb = cpu_kernels.dequantize_rows(w, rows=ids)                     # selected rows

Decodes blocks to float32, the same values as gguf's reference decoder bit for bit, 6-130x
faster (benchmarks/bench_dequant.py): weights bound for a GPU at load, and embedding rows looked
up on the CPU.

Weights stay in their GGUF block format (F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 IQ4_NL Q2_K Q3_K
Q4_K Q5_K Q6_K IQ4_XS, any mix across gate/up/down); ``ExpertTensor.repacked()`` makes a one-time
copy in a layout the SIMD dots read faster where one exists (``REPACKED_TYPES``: Q4_0 -> q4_0_r8
and so on for Q5_0 Q8_0 IQ4_NL Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_XS; same size, same values).  Activations are quantized once per call to
8-bit blocks (float types use float activations).  Each distinct expert's weights are read once
per call, whatever the number of tokens routed to it.

SIMD path: chosen at import from CPUID (avx512 = AVX-512 BW/VL/DQ + VNNI, avx2 = AVX2+FMA+F16C,
ref = portable C).  ``NEXTN_KERNEL_PATH=ref|avx2|avx512`` forces one (error if the CPU lacks it).

Threads and torch: the kernels run on their own OpenMP pool (``set_threads``; default: the
``NEXTN_EXPERT_THREADS`` env var, else the number of cores).  torch ships its own OpenMP runtime
and pool (``torch.set_num_threads``).  The two pools do not know about each other, so never let
both spin on the same cores at the same time: while an expert call runs, torch CPU ops must either
not run or be limited to the cores the expert threads leave free (expert threads +
torch threads <= cores).  With a GPU, torch's CPU threads are mostly idle during decode and
``torch.set_num_threads(1)`` for the driving thread is enough; on a CPU-only machine run torch ops
and expert calls one after the other, each with all cores.  The GIL is released during the C call,
so a Python thread can keep driving the GPU meanwhile.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from .quant import SUPPORTED_TYPES, qtype, row_bytes, block_size, random_blocks, dequantize, reference_moe

def _load_extension():
    """Import cpu_kernels._moe with a short OpenMP spin-wait unless the user chose one.

    libgomp's default makes idle threads spin ~300k iterations at every barrier and between calls.
    On a shared or oversubscribed machine (other jobs, torch's own pool) a spinning thread steals
    the core the descheduled sibling needs and one call can stall for a whole scheduler slice
    (measured: 40-60 ms instead of 4 ms on the 2-core dev VM under load). A short spin keeps the
    hand-off fast when cores are free and sleeps otherwise. libgomp reads these variables once,
    when it is loaded; the environment is restored afterwards so other runtimes loaded later
    (torch bundles its own libgomp) are not affected. Set OMP_WAIT_POLICY or GOMP_SPINCOUNT
    yourself to override; NEXTN_OMP_SPINCOUNT changes the default here."""
    set_here = None
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        set_here = "GOMP_SPINCOUNT"
        os.environ[set_here] = os.environ.get("NEXTN_OMP_SPINCOUNT", "20000")
    try:
        from ._moe import ffi, lib
    finally:
        if set_here:
            del os.environ[set_here]
    return ffi, lib


try:
    _ffi, _lib = _load_extension()
except ImportError as _e:  # pragma: no cover - exercised only without a build
    _IMPORT_ERROR = _e

    def __getattr__(name):
        raise ImportError(
            "cpu_kernels: the compiled extension cpu_kernels._moe is missing or cannot be loaded "
            f"({_IMPORT_ERROR}). Build it from the repository root with `pip install -e .`"
        )

    def _missing(*a, **k):
        __getattr__("")

    moe_forward = linear = linear_heads = dequantize_rows = set_threads = get_threads = active_path = available_paths = _missing
    ExpertTensor = _missing
else:
    _IMPORT_ERROR = None

__all__ = [
    "ExpertTensor", "moe_forward", "linear", "linear_heads", "dequantize_rows", "set_threads", "get_threads", "active_path", "available_paths",
    "SUPPORTED_TYPES", "REPACKED_TYPES", "random_blocks", "dequantize", "reference_moe", "read_bandwidth", "peak_rates",
    "build_info",
]

_PATH_IDS = {"ref": 0, "avx2": 1, "avx512": 2}
MAX_THREADS = 4096  # OpenMP threads one call may ask for (dispatch.c refuses more, too)
_PATH_NAMES = {0: "ref", 1: "avx2", 2: "avx512vnni"}


if _IMPORT_ERROR is None:

    def _cpu_mask() -> int:
        return int(_lib.nx_cpu_paths())

    def available_paths() -> list[str]:
        """Paths this CPU can run, best last."""
        m = _cpu_mask()
        return [_PATH_NAMES[i] for i in range(3) if (m >> i) & 1]

    def _resolve_path(name: str | None) -> int:
        m = _cpu_mask()
        if not name:
            return 2 if m & 4 else 1 if m & 2 else 0
        key = name.strip().lower()
        key = {"avx512vnni": "avx512", "reference": "ref", "c": "ref"}.get(key, key)
        if key not in _PATH_IDS:
            raise ValueError(f"NEXTN_KERNEL_PATH={name!r}: expected one of ref, avx2, avx512")
        pid = _PATH_IDS[key]
        if not (m >> pid) & 1:
            raise RuntimeError(f"kernel path {name!r} is not supported by this CPU "
                               f"(available: {', '.join(available_paths())})")
        return pid

    _state = {"path": _resolve_path(os.environ.get("NEXTN_KERNEL_PATH")), "threads": None}

    def active_path() -> str:
        """The SIMD path moe_forward uses: 'avx512vnni', 'avx2' or 'ref'."""
        return _PATH_NAMES[_state["path"]]

    def _set_path(name: str | None) -> str:
        """Force a path (None: best available). For tests and bug reports; returns the new path."""
        _state["path"] = _resolve_path(name)
        return active_path()

    def _default_threads() -> int:
        env = os.environ.get("NEXTN_EXPERT_THREADS")
        if env:
            try:
                n = int(env)
            except ValueError:
                raise ValueError(f"NEXTN_EXPERT_THREADS={env!r} is not an integer") from None
            if n >= 1:
                return min(n, MAX_THREADS)
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover
            return max(1, os.cpu_count() or 1)

    def set_threads(n: int | None) -> None:
        """Engine-wide number of expert OpenMP threads (None: back to the default)."""
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= int(n) <= MAX_THREADS:
                raise ValueError(f"threads must be a positive integer (at most {MAX_THREADS}), got {n!r}")
            n = int(n)
        _state["threads"] = n

    def get_threads() -> int:
        return _state["threads"] or _default_threads()

    _default_threads_env = _default_threads    # reads the env / affinity (on every call)
    _default_threads_cached = _default_threads()

    def _default_threads() -> int:  # noqa: F811  (cached at import: moe_forward's hot path)
        return _default_threads_cached

    # layout name -> (ggml type it applies to, kernel type id); ggml type -> its repacked layout.
    # Kernel ids: 100 + the ggml type's (NX_Q5_0_R8 = 106 ..., moe_kernels.h)
    _LAYOUTS = {"ggml": (None, None)}
    _LAYOUTS.update({f"{t.lower()}_r8": (qtype(t), 100 + int(qtype(t)))
                     for t in ("Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")})
    _REPACK_OF = {v[0]: k for k, v in _LAYOUTS.items() if v[0] is not None}
    REPACKED_TYPES = frozenset(_REPACK_OF)  # ggml types ExpertTensor.repacked() copies into a faster layout

    class ExpertTensor:
        """One layer's stacked expert weight [E, rows, cols] as it lies in the GGUF (never copied).

        data: numpy array (any dtype) holding exactly E*rows*row_bytes bytes, C-contiguous;
        ggml_type: int / gguf.GGMLQuantizationType; shape: logical (E, rows, cols), numpy order
        (gate/up: (E, I, H), down: (E, H, I)); cols a multiple of the type's block size.
        layout: "ggml" (the GGUF's own blocks) or a repacked layout made by `repacked()`.
        """

        __slots__ = ("data", "ggml_type", "shape", "row_bytes", "nbytes", "layout", "_ptr", "_c")

        def __init__(self, data, ggml_type, shape, layout: str = "ggml"):
            t = qtype(ggml_type)
            if layout not in _LAYOUTS or (layout != "ggml" and _LAYOUTS[layout][0] != t):
                raise ValueError(f"layout {layout!r} does not apply to {t.name} "
                                 f"(layouts: ggml, {', '.join(f'{k} for {v[0].name}' for k, v in _LAYOUTS.items() if k != 'ggml')})")
            if not isinstance(shape, (tuple, list)) or len(shape) != 3:
                raise ValueError(f"shape must be (E, rows, cols), got {shape!r}")
            try:
                E, rows, cols = (int(s) for s in shape)
            except (TypeError, ValueError):
                raise ValueError(f"shape must be three integers, got {shape!r}") from None
            if E < 1 or rows < 1 or cols < 1:
                raise ValueError(f"shape must be positive, got {shape!r}")
            be, _ = block_size(t)
            if cols % be:
                raise ValueError(f"cols={cols} is not a multiple of {t.name}'s block size {be}")
            if hasattr(data, "__array_interface__") or isinstance(data, np.ndarray):
                arr = np.asarray(data)
            elif type(data).__module__.startswith("torch"):
                if data.device.type != "cpu":
                    raise ValueError("ExpertTensor data must live in CPU memory")
                arr = data.numpy()
            else:
                raise TypeError(f"ExpertTensor data must be a numpy array, got {type(data).__name__}")
            if not arr.flags.c_contiguous:
                raise ValueError("ExpertTensor data must be C-contiguous")
            rb = row_bytes(t, cols)
            want = E * rows * rb
            if arr.nbytes != want:
                raise ValueError(f"ExpertTensor data holds {arr.nbytes} bytes, but {t.name} {tuple(shape)} "
                                 f"needs {want} ({rows} rows x {rb} bytes x {E} experts)")
            align = 4 if t == SUPPORTED_TYPES[0] else 2
            if arr.ctypes.data % align:
                raise ValueError(f"ExpertTensor data must be {align}-byte aligned (address {arr.ctypes.data:#x})")
            self.data = arr
            self.ggml_type = t
            self.shape = (E, rows, cols)
            self.row_bytes = rb
            self.nbytes = want
            self.layout = layout
            self._ptr = _ffi.from_buffer("uint8_t[]", arr.reshape(-1).view(np.uint8), require_writable=False)
            c = _ffi.new("nx_tensor *")
            c.data = self._ptr
            c.type = _LAYOUTS[layout][1] if layout != "ggml" else int(t)
            c.n_expert, c.rows, c.cols, c.row_bytes = E, rows, cols, rb
            self._c = c

        def __repr__(self):
            lay = "" if self.layout == "ggml" else f", layout={self.layout}"
            return f"ExpertTensor({self.ggml_type.name}, shape={self.shape}{lay})"

        def can_repack(self) -> bool:
            """Whether `repacked()` would make a faster copy (a repacked layout exists for this
            type and the active SIMD path dots it fused)."""
            return self.layout == "ggml" and self.ggml_type in _REPACK_OF and active_path() != "ref"

        def repacked(self, threads: int | None = None) -> "ExpertTensor":
            """A copy in the layout the SIMD dots read fastest, made once at load: same bytes per
            row and the same values, only the order inside blocks or groups of blocks changes
            (Q5_0 -> q5_0_r8, Q4_K -> q4_k_r8, ..., see moe_kernels.h). Returns self when no
            repacked layout applies. The copy lives in ordinary memory: the GGUF's pages are no
            longer read by the kernels."""
            if self.layout != "ggml" or self.ggml_type not in _REPACK_OF:
                return self
            layout = _REPACK_OF[self.ggml_type]
            E, rows, cols = self.shape
            dst = np.empty(self.nbytes, dtype=np.uint8)
            nb = cols // block_size(self.ggml_type)[0]
            rc = _lib.nx_repack(_LAYOUTS[layout][1], self._ptr, _ffi.from_buffer("uint8_t[]", dst), E * rows, nb,
                                _call_threads(threads))
            if rc:  # _LAYOUTS and dispatch.c must list the same layouts
                raise RuntimeError(f"cpu_kernels build has no {layout} layout (nx_repack returned {rc})")
            return ExpertTensor(dst, self.ggml_type, self.shape, layout=layout)

        def expert_bytes(self) -> int:
            """Bytes of one expert's matrix."""
            return self.shape[1] * self.row_bytes

    def _as_f32_2d(name, a):
        if type(a).__module__.startswith("torch"):
            if a.device.type != "cpu":
                raise ValueError(f"{name} must be a CPU tensor (got device {a.device})")
            if a.requires_grad:
                a = a.detach()
            a = a.numpy()
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy array or CPU torch tensor, got {type(a).__name__}")
        return a

    _F32 = np.dtype(np.float32)
    _I32 = np.dtype(np.int32)
    _I64 = np.dtype(np.int64)
    _ND = np.ndarray
    _from_buffer = _ffi.from_buffer
    _c_forward = _lib.nx_moe_forward
    _checked = {}   # (id(gate), id(up), id(down)) -> (gate, up, down): triples already validated

    def _check_triple(gate, up, down):
        for nm, t in (("gate", gate), ("up", up), ("down", down)):
            if not isinstance(t, ExpertTensor):
                raise TypeError(f"{nm} must be a cpu_kernels.ExpertTensor, got {type(t).__name__}")
        E, I, H = gate.shape
        if up.shape != gate.shape:
            raise ValueError(f"up shape {up.shape} != gate shape {gate.shape}")
        if down.shape != (E, H, I):
            raise ValueError(f"down shape {down.shape} must be (E, H, I) = {(E, H, I)} given gate {gate.shape}")
        if len(_checked) > 4096:
            _checked.clear()
        # the tensors are kept alive by the cache entry, so their ids cannot be reused while cached
        _checked[(id(gate), id(up), id(down))] = (gate, up, down)

    def forget_checked() -> None:
        """Drop the cache of validated expert triples (it keeps its tensors alive): called by
        Engine.close() so a closed engine's weights are freed."""
        _checked.clear()

    def _call_threads(threads) -> int:
        """A call's thread count: `threads`, else the engine-wide setting, else the default."""
        if threads is None:
            return _state["threads"] or _default_threads()
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= int(threads) <= MAX_THREADS:
            raise ValueError(f"threads must be a positive integer (at most {MAX_THREADS}), got {threads!r}")
        return int(threads)

    def _check_rc(rc: int, name: str) -> None:
        """A C entry point's status: 0 ok, -1 scratch allocation failed, -3 an index out of range,
        -4 arguments the C side refused (dispatch.c re-checks what this wrapper checks), else the
        path is missing."""
        if rc == -1:
            raise MemoryError(f"cpu_kernels.{name}: scratch allocation failed")
        if rc == -3:
            raise ValueError(f"cpu_kernels.{name}: an index is out of range (rc=-3)")
        if rc == -4:
            raise ValueError(f"cpu_kernels.{name}: the C kernel refused its arguments (shapes, row bytes, "
                             f"type or thread count; rc=-4)")
        if rc != 0:
            raise RuntimeError(f"cpu_kernels.{name}: kernel path {active_path()} unavailable (rc={rc})")

    def _span(a):
        p = a.__array_interface__["data"][0]
        return p, p + a.nbytes

    def moe_forward(x, expert_ids, expert_weights, gate, up, down, out=None, threads=None):
        """Fused routed-expert MoE for T tokens; returns `out` float32 [T, H].

        Argument checks are cheap on purpose (the demo model calls this once per MoE layer per
        token): ExpertTensor triples are validated once and cached, the expert-id range is checked
        in C before anything is read or written."""
        if type(x) is not _ND:
            x = _as_f32_2d("x", x)
        if x.dtype is not _F32 and x.dtype != _F32:
            raise TypeError(f"x must be float32, got {x.dtype}")
        if x.ndim != 2:
            raise ValueError(f"x must be 2-D [T, H], got shape {x.shape}")
        if not x.flags.c_contiguous:
            raise ValueError("x must be C-contiguous")
        key = (id(gate), id(up), id(down))
        if key not in _checked:
            _check_triple(gate, up, down)
        E, I, H = gate.shape
        T = x.shape[0]
        if x.shape[1] != H:
            raise ValueError(f"x has H={x.shape[1]} but the expert tensors have H={H}")
        ids = expert_ids if type(expert_ids) is _ND else _as_f32_2d("expert_ids", expert_ids)
        idt = ids.dtype
        if idt is not _I32 and idt != _I32:
            if idt != _I64:
                raise TypeError(f"expert_ids must be int32 or int64, got {idt}")
            if ids.size and (ids.min() < 0 or ids.max() >= E):
                raise ValueError(f"expert_ids out of range [0, {E}): min {int(ids.min())}, max {int(ids.max())}")
            ids = ids.astype(_I32)
        if ids.ndim != 2 or ids.shape[0] != T or ids.shape[1] < 1:
            raise ValueError(f"expert_ids must be [T, K] = [{T}, K>=1], got shape {ids.shape}")
        K = ids.shape[1]
        w = expert_weights if type(expert_weights) is _ND else _as_f32_2d("expert_weights", expert_weights)
        if w.dtype is not _F32 and w.dtype != _F32:
            raise TypeError(f"expert_weights must be float32, got {w.dtype}")
        if w.shape != ids.shape:
            raise ValueError(f"expert_weights shape {w.shape} != expert_ids shape {ids.shape}")
        if out is None:
            out = out_np = np.empty((T, H), dtype=_F32)
        else:
            o = out if type(out) is _ND else _as_f32_2d("out", out)
            if o.dtype is not _F32 and o.dtype != _F32:
                raise TypeError(f"out must be float32, got {o.dtype}")
            if o.shape != (T, H):
                raise ValueError(f"out must have shape {(T, H)}, got {o.shape}")
            if not o.flags.c_contiguous or not o.flags.writeable:
                raise ValueError("out must be C-contiguous and writable")
            if T:
                (a0, a1), (b0, b1) = _span(o), _span(x)   # both contiguous: byte ranges decide
                if a0 < b1 and b0 < a1:
                    raise ValueError("out must not overlap x")
            out_np = o
        nth = _call_threads(threads)
        if T == 0:
            return out
        if not ids.flags.c_contiguous:
            ids = np.ascontiguousarray(ids)
        if not w.flags.c_contiguous:
            w = np.ascontiguousarray(w)
        rc = _c_forward(
            _state["path"], _from_buffer("float[]", x), T, _from_buffer("int32_t[]", ids),
            _from_buffer("float[]", w), K, gate._c, up._c, down._c,
            _from_buffer("float[]", out_np), nth)
        if rc == -3:
            raise ValueError(f"expert_ids out of range [0, {E}): min {int(ids.min())}, max {int(ids.max())}")
        _check_rc(rc, "moe_forward")
        return out

    _c_linear = _lib.nx_linear
    _cast = _ffi.cast

    def linear(x, w, out=None, threads=None):
        """Dense quantized matmul: `out` float32 [T, N] = x [T, K] @ W.T, W [N, K] in its GGUF
        blocks, given as an ExpertTensor of one expert, shape (1, N, K). Activations are quantized
        as in moe_forward (same per-type tolerances). `out` may be a column slice of a wider
        float32 array (unit column stride, any row stride), so several weights fill one output."""
        if not isinstance(w, ExpertTensor):
            raise TypeError(f"w must be a cpu_kernels.ExpertTensor, got {type(w).__name__}")
        E, N, K = w.shape
        if E != 1:
            raise ValueError(f"w must hold one matrix, shape (1, N, K); got {w.shape}")
        if type(x) is not _ND:
            x = _as_f32_2d("x", x)
        if x.dtype is not _F32 and x.dtype != _F32:
            raise TypeError(f"x must be float32, got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != K:
            raise ValueError(f"x must be [T, {K}] for a weight of {K} columns, got shape {x.shape}")
        if not x.flags.c_contiguous:
            raise ValueError("x must be C-contiguous")
        T = x.shape[0]
        if out is None:
            out = np.empty((T, N), dtype=_F32)
        else:
            if type(out) is not _ND:
                out = _as_f32_2d("out", out)
            if out.dtype is not _F32 and out.dtype != _F32:
                raise TypeError(f"out must be float32, got {out.dtype}")
            if out.shape != (T, N):
                raise ValueError(f"out must have shape {(T, N)}, got {out.shape}")
            if not out.flags.writeable:
                raise ValueError("out must be writable")
            if T and (out.strides[1] != 4 or out.strides[0] < 4 * N or out.strides[0] % 4):
                raise ValueError(f"out must have unit column stride and rows at least {N} floats apart "
                                 f"(strides {out.strides})")
        nth = _call_threads(threads)
        if T == 0:
            return out
        ld = out.strides[0] // 4
        o0 = out.__array_interface__["data"][0]
        o1 = o0 + ((T - 1) * ld + N) * 4
        x0, x1 = _span(x)
        if o0 < x1 and x0 < o1:
            raise ValueError("out must not overlap x")
        rc = _c_linear(_state["path"], _from_buffer("float[]", x), T, w._c, _cast("float *", o0), ld, nth)
        _check_rc(rc, "linear")
        return out

    _c_heads = _lib.nx_linear_heads

    def linear_heads(x, w, threads=None):
        """Per-head matmuls: float32 [T, E, N], head e of x [T, E, K] times matrix e of W [E, N, K]
        (an ExpertTensor of E matrices, in its GGUF blocks), each head as `linear` computes it
        (latent attention's k_b and v_b: one small matrix a head)."""
        if not isinstance(w, ExpertTensor):
            raise TypeError(f"w must be a cpu_kernels.ExpertTensor, got {type(w).__name__}")
        E, N, K = w.shape
        x = np.asarray(x)
        if x.dtype != _F32:
            raise TypeError(f"x must be float32, got {x.dtype}")
        if x.ndim != 3 or x.shape[1:] != (E, K):
            raise ValueError(f"x must be [T, {E}, {K}] for {E} matrices of {K} columns, got shape {x.shape}")
        x = np.ascontiguousarray(x)
        T = x.shape[0]
        out = np.empty((T, E, N), dtype=_F32)
        if T:
            rc = _c_heads(_state["path"], _from_buffer("float[]", x), T, w._c, _from_buffer("float[]", out),
                          _call_threads(threads))
            _check_rc(rc, "linear_heads")
        return out

    _c_dequant = _lib.nx_dequant_rows

    def dequantize_rows(w, rows=None, out=None, threads=None):
        """float32 [n, cols]: matrix rows of an ExpertTensor (E, R, cols) decoded from its blocks,
        the same values as gguf's reference decoder (bit for bit). `rows`: None for all E*R rows in
        order (a [E*R, cols] array; reshape as needed), or integer indices into them (an embedding
        lookup). `out`: an optional C-contiguous float32 [n, cols] array to fill. Threads split
        the rows (`threads` as for the other calls)."""
        if not isinstance(w, ExpertTensor):
            raise TypeError(f"w must be a cpu_kernels.ExpertTensor, got {type(w).__name__}")
        E, R, C = w.shape
        total = E * R
        if rows is None:
            n, rp = total, _ffi.NULL
        else:
            idx = np.asarray(rows)
            if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
                raise ValueError(f"rows must be a 1-D array of integers, got {idx.dtype} with shape {idx.shape}")
            idx = np.ascontiguousarray(idx, dtype=np.int64)
            if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= total):
                raise ValueError(f"rows out of range: {int(idx.min())}..{int(idx.max())} for {total} rows")
            n, rp = idx.size, (_from_buffer("int64_t[]", idx) if idx.size else _ffi.NULL)
        if out is None:
            out = np.empty((n, C), dtype=_F32)
        else:
            if type(out) is not _ND:
                out = _as_f32_2d("out", out)
            if out.dtype != _F32 or out.shape != (n, C) or not out.flags.c_contiguous or not out.flags.writeable:
                raise ValueError(f"out must be a writable C-contiguous float32 array of shape {(n, C)}, "
                                 f"got {out.dtype} {out.shape}")
            o0, o1 = _span(out)
            w0 = int(_ffi.cast("uintptr_t", w._ptr))
            if n and o0 < w0 + w.nbytes and w0 < o1:
                raise ValueError("out must not overlap the weight's bytes")
        nth = _call_threads(threads)
        if n == 0:
            return out
        rc = _c_dequant(_state["path"], w._c, rp, n, _from_buffer("float[]", out), nth)
        _check_rc(rc, "dequantize_rows")
        return out

    def _set_min_work_per_thread(nbytes: int) -> int:
        """Calls with less than `nbytes` of work per thread use fewer threads (default 16 KiB; 0 =
        always use every thread given). For tests and experiments; returns the previous value."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or not 0 <= nbytes < 1 << 62:
            raise ValueError(f"min work per thread must be a byte count >= 0, got {nbytes!r}")
        return int(_lib.nx_set_min_work(int(nbytes)))

    def read_bandwidth(nbytes: int = 1 << 30, threads: int | None = None, repeats: int = 5) -> float:
        """Measured read bandwidth in GB/s (best of `repeats`) of a STREAM-like sum over `nbytes`
        with the expert OpenMP threads."""
        import time
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes < 8:
            raise ValueError(f"nbytes must be an integer >= 8, got {nbytes!r}")
        if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
        n = int(nbytes) // 8
        buf = np.ones(n, dtype=np.int64)
        nth = _call_threads(threads)
        p = _ffi.from_buffer("int64_t[]", buf)
        if _lib.nx_read_bw(p, n, nth) != n:  # a sum of n ones; NX_EINVAL for arguments C refused
            raise RuntimeError("cpu_kernels.read_bandwidth: the read probe returned a wrong sum")
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            _lib.nx_read_bw(p, n, nth)
            best = min(best, time.perf_counter() - t0)
        return n * 8 / best / 1e9

    def peak_rates(threads: int | None = None, steps: int = 1 << 20) -> dict:
        """The multiply units' rate with the expert threads, for benchmarks' floors: int8
        multiply-adds a second through the dense kernels' integer dot ("int8_macs") and float32
        FMA lanes a second ("f32_fmas"), best of 3. 0.0 on the reference path (no SIMD rate)."""
        nth = _call_threads(threads)
        out = {}
        for kind, name in ((0, "int8_macs"), (1, "f32_fmas")):
            rs = [_lib.nx_peak_rate(_state["path"], kind, steps, nth) for _ in range(3)]
            if min(rs) < 0:
                raise RuntimeError("cpu_kernels.peak_rates: the multiply probe failed its check")
            out[name] = max(rs)
        return out

    def build_info() -> dict:
        return {
            "active_path": active_path(),
            "available_paths": available_paths(),
            "threads": get_threads(),
            "omp_max_threads": int(_lib.nx_omp_max_threads()),
            "omp_num_procs": int(_lib.nx_omp_num_procs()),
            "build_flags": _ffi.string(_lib.nx_build_flags()).decode(),
        }
