"""Routed experts of one MoE layer: two interchangeable backends behind one call.

    experts(x [T, H], ids [T, K] int64, weights [T, K] float32) -> [T, H]
    out[t] = sum_k weights[t, k] * down[e](silu(gate[e] x[t]) * up[e] x[t]),  e = ids[t, k]

`TorchExperts` holds dequantized weights on a torch device (experts placed on the GPU side, and
the reference path). `KernelExperts` keeps the quantized GGUF bytes (views of the memory map) and
calls the C kernels in `cpu_kernels` (experts placed on the CPU side).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .linear import ROWWISE_MAX


# Up to this many (row, expert) pairs a call runs pair by pair (decode, drafts, short verify
# batches); more (prefill) are grouped by expert.
PAIRWISE_MAX = 32


class TorchExperts:
    side_kind = "torch"

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        # gate_up: ffn_gate_exps and ffn_up_exps stacked per expert at load [E, 2I, H] (one matmul
        # for both); down [E, H, I]
        self.gate_up, self.down = gate_up, down
        self.width = down.shape[2]
        self.device = gate_up.device

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, K = ids.shape
        # on the CPU every decode-sized call goes pair by pair, whatever K: a verify batch's rows
        # then get a plain step's bits (see runtime/linear.py); a GPU groups from 32 pairs up
        if T * K <= PAIRWISE_MAX or (T <= ROWWISE_MAX and x.device.type == "cpu"):
            return self._pairwise(x, ids, weights)
        return self._grouped(x, ids, weights)

    def _ffn(self, xs: torch.Tensor, e: int) -> torch.Tensor:
        g, u = (xs @ self.gate_up[e].T).split(self.width, dim=-1)
        return (F.silu(g) * u) @ self.down[e].T

    def _pairwise(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each (row, expert) pair on views of that expert's weights, then one weighted sum: on a
        GPU every torch call is a kernel launch the host waits to issue, and the grouped path's
        sort, count and scatter cost more launches (and a second wait) than they save at this
        size. Each row is computed on its own, so a row's output does not depend on the batch."""
        T, K = ids.shape
        ys = [self._ffn(x[t:t + 1], e) for t, row in enumerate(ids.tolist()) for e in row]
        y = torch.cat(ys).view(T, K, -1)
        w = weights.view(T, 1, K)
        # the weighted sum in float32, as the grouped path accumulates
        return torch.bmm(w if w.dtype == torch.float32 else w.float(),
                         y if y.dtype == torch.float32 else y.float()).view(T, -1).to(x.dtype)

    def _grouped(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, K = ids.shape
        out = torch.zeros(T, self.down.shape[1], dtype=torch.float32, device=x.device)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up.shape[0]).tolist()
        tok = order // K
        wflat = weights.reshape(-1)[order].to(torch.float32)
        start = 0
        for e, n in enumerate(counts):  # grouped by expert; experts with no tokens are skipped
            if n == 0:
                continue
            rows = tok[start:start + n]
            y = self._ffn(x[rows], e).to(torch.float32) * wflat[start:start + n, None]
            out.index_add_(0, rows, y)
            start += n
        return out.to(x.dtype)


class KernelExperts:
    """Quantized experts on the CPU side, run by the C kernels (the GIL is released inside)."""

    side_kind = "kernel"

    def __init__(self, gate, up, down, threads: int | None = None):
        import cpu_kernels

        self._moe = cpu_kernels.moe_forward
        self.gate, self.up, self.down = gate, up, down  # cpu_kernels.ExpertTensor
        self.threads = threads
        self.device = torch.device("cpu")
        self._out = None

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # called once per MoE layer per step: skip conversions that would be no-ops (each torch
        # op costs microseconds; int64 router ids are narrowed in numpy, which is cheaper)
        xs = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
        ws = weights if weights.dtype == torch.float32 and weights.is_contiguous() else \
            weights.to(torch.float32).contiguous()
        idn = ids.contiguous().numpy()
        if idn.dtype != np.int32:
            idn = idn.astype(np.int32)
        out = np.empty((xs.shape[0], xs.shape[1]), dtype=np.float32)
        self._moe(xs.numpy(), idn, ws.numpy(), self.gate, self.up, self.down, out=out, threads=self.threads)
        return torch.from_numpy(out)
