"""Dense weights on the CPU in their GGUF blocks: `KernelLinear(x)` = x @ W.T by the C kernels,
and `QuantizedTable[ids]`, an embedding lookup that dequantizes only the rows it reads.

A weight the model multiplies by (attention, dense and shared FFNs, the head, the MTP layer's
eh_proj) is a torch tensor [N, K] where its side is a GPU, or where its type is F32; on the CPU a
block-quantized, F16 or BF16 weight stays in the file's bytes (a view of the memory map) and runs
on `cpu_kernels.linear`, which reads 2-8x fewer bytes than a float32 copy, reads them once for all
the rows of a call, and keeps that copy out of memory. Several tensors stacked by rows (q/k/v,
gate/up) are parts of one KernelLinear: each part fills its columns of one output.
`linear(x, w)` takes either kind.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT


class KernelLinear:
    """Parts stacked by rows: cpu_kernels.ExpertTensor (1, N_i, K), or a float32 torch tensor
    [N_i, K] for a part of a float type (a unit may mix them: q in Q8_0, v in F16)."""

    def __init__(self, parts: list, threads: int | None = None):
        import cpu_kernels

        self._linear = cpu_kernels.linear
        self.parts = parts
        self.threads = threads
        dims = [tuple(p.shape[-2:]) for p in parts]
        self.in_features = dims[0][1]
        if any(k != self.in_features for _, k in dims):
            raise ValueError(f"stacked weights have different widths: {dims}")
        self.out_features = sum(n for n, _ in dims)
        self.shape = (self.out_features, self.in_features)  # as a torch weight's
        self.nbytes = sum(p.nbytes if not isinstance(p, torch.Tensor) else p.numel() * p.element_size()
                          for p in parts)

    def __repr__(self):
        kinds = [p.ggml_type.name if not isinstance(p, torch.Tensor) else str(p.dtype) for p in self.parts]
        return f"KernelLinear({', '.join(kinds)}, shape={self.shape})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xs = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
        flat = xs.dim() == 2  # the model's calls: [T, K] in, [T, N] out, no reshapes (3 us each)
        if not flat:
            xs = xs.reshape(-1, self.in_features)
        xn = xs.numpy()
        out = np.empty((xn.shape[0], self.out_features), dtype=np.float32)
        r0 = 0
        many = xn.shape[0] >= FLOAT_GEMM_MIN_ROWS
        for p in self.parts:
            n = p.shape[-2]
            o = out if n == self.out_features else out[:, r0:r0 + n]
            if isinstance(p, torch.Tensor):  # batch-invariant as any float weight (`linear`)
                torch.from_numpy(o).copy_(linear(xs, p))
            elif many and p.ggml_type in _HALF_TYPES:
                _half_gemm(xs, p, torch.from_numpy(o))
            else:
                self._linear(xn, p, out=o, threads=self.threads)
            r0 += n
        y = torch.from_numpy(out)
        if not flat:
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


class HeadLinear:
    """One small matrix a head in its GGUF blocks (latent attention's k_b [heads, R, nope] and
    v_b [heads, v, R]): `w(x)` = [T, heads, N] from x [T, heads, K], head e by matrix e, all heads
    in one kernel call (`cpu_kernels.linear_heads`; a float32 copy would read 2-4x the bytes,
    18 MB a layer at GLM-4.7-Flash's sizes)."""

    def __init__(self, tensor, threads: int | None = None):
        import cpu_kernels

        self._heads = cpu_kernels.linear_heads
        self.tensor = tensor  # cpu_kernels.ExpertTensor (heads, N, K)
        self.threads = threads
        self.shape = tuple(tensor.shape)
        self.nbytes = tensor.nbytes
        self.dtype = torch.float32

    def __repr__(self):
        return f"HeadLinear({self.tensor.ggml_type.name}, shape={self.shape})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xs = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
        return torch.from_numpy(self._heads(xs.numpy(), self.tensor, threads=self.threads))


# F16/BF16 weights meet calls of at least this many rows (prefill chunks) as torch float32 GEMMs
# over row chunks converted on the fly: the kernels' float path dots each row with each token in
# turn, 3x slower than torch's GEMM at 512 rows, while at a few rows it is 1.5-3.7x faster than
# the GEMM on a float32 copy (it reads half the bytes, once for all rows). Measured crossover
# between 32 and 64 rows on a GLM-4.5-Air attention weight (`benchmarks/bench_linear.py --types f16`).
FLOAT_GEMM_MIN_ROWS = 48
_GEMM_CHUNK_ROWS = 512  # rows converted at a time: 4-8 MB of float32 at GLM widths, cache-sized


_HALF_TYPES = (QT.F16, QT.BF16)


def _half_gemm(x: torch.Tensor, p, out: torch.Tensor) -> None:
    """out [T, N] = x [T, K] @ W.T for an F16/BF16 weight, decoded to float32 chunk by chunk."""
    import cpu_kernels

    N = p.shape[-2]
    for r0 in range(0, N, _GEMM_CHUNK_ROWS):
        r1 = min(N, r0 + _GEMM_CHUNK_ROWS)
        out[:, r0:r1] = x @ torch.from_numpy(cpu_kernels.dequantize_rows(p, rows=np.arange(r0, r1))).T


# Calls of up to this many rows (decode steps, drafts, verify batches: draft_max <= 16 in
# placement/schema.py, plus the pending token) compute each row as a one-row call on the CPU,
# here and in the attention (model.py); prefill chunks of more rows stay batched.
ROWWISE_MAX = 17


class QuantizedTable:
    """An embedding table on the CPU in its GGUF blocks: a lookup dequantizes only the rows it
    reads (`TensorInfo.dequantize`: the values of the float copy, bit for bit), instead of a
    float32 copy of the whole table (GLM-4.5-Air's: 2.3 GiB against 0.33 GiB in Q4_K)."""

    def __init__(self, info, dtype: torch.dtype = torch.float32):
        self.info = info  # runtime.gguf_file.TensorInfo [V, H]
        self.shape = tuple(info.shape)
        self.dtype = dtype  # of the rows returned: the side's
        self.device = torch.device("cpu")

    def __repr__(self):
        return f"QuantizedTable({self.info.type_name}, shape={self.shape})"

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.info.dequantize(rows=ids.reshape(-1).numpy())
        out = torch.from_numpy(rows).reshape(*ids.shape, self.shape[1])
        return out if self.dtype == torch.float32 else out.to(self.dtype)


def rowwise(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) for an elementwise transcendental (sigmoid, silu), row by row on the CPU for calls of
    up to ROWWISE_MAX rows: torch runs a row's elements through its vector or its scalar code
    depending on where they fall in the whole tensor (a row of 8 router scores alone takes the
    tail path, the same row in a 3-row batch the vector one), and the two differ in the last bit.
    Rows of a multiple of 64 elements (contiguous, or a column slice such as gate/up's halves,
    which torch loops over row by row) in a call small enough for one thread (torch splits larger
    ones between threads at arbitrary points) start on a vector-step boundary whatever the batch,
    so they go in one call (the demo's FFN widths 128 and 384; GLM's router's 128 and 160 too)."""
    if x.dim() == 2 and 1 < x.shape[0] <= ROWWISE_MAX and x.device.type == "cpu" and not (
            x.shape[1] % 64 == 0 and x.numel() <= _ONE_THREAD_ELEMENTS and x.stride(1) == 1):
        return torch.cat([fn(x[t:t + 1]) for t in range(x.shape[0])])
    return fn(x)


# torch's CPU elementwise kernels run a call of up to this many elements on one thread (its
# GRAIN_SIZE); vector steps are 2 x 8 (AVX2) or 2 x 16 (AVX-512) floats, so 64 divides both
_ONE_THREAD_ELEMENTS = 32768


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) for a torch weight [N, K]; a KernelLinear computes the same from its GGUF
    blocks.

    On the CPU a float weight meets a few rows (1 included) as a batch of one-row products
    (`bmm` over the rows, the weight broadcast): a 2-row GEMM and a 1-row GEMV round differently
    (MKL picks other kernels), and a verify batch's row must get the bits a plain step gets for
    it, or greedy MTP can part from plain greedy at a near-tie (the C kernels' 8-bit activation
    rounding turns a 1e-7 difference into a 1e-3 one now and then). The batched one-row products
    give each row the same bits whatever the batch (tests/test_mtp.py checks it), and read the
    weight once: 2 rows of a [14336, 4096] weight in 11.7 ms against 22.5 ms for the GEMM on the
    2-core machine (`benchmarks/bench_linear.py --float-path`). On a GPU the batch stays one
    matmul."""
    if not isinstance(w, torch.Tensor):
        return w(x) if bias is None else w(x) + bias
    if x.dim() == 2 and x.shape[0] <= ROWWISE_MAX and x.device.type == "cpu":
        y = torch.bmm(x[:, None, :], w.T.expand(x.shape[0], *w.T.shape))[:, 0]
        return y if bias is None else y + bias
    return x @ w.T if bias is None else torch.addmm(bias, x, w.T)
