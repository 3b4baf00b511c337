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


class TorchExperts:
    side_kind = "torch"

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        self.gate, self.up, self.down = gate, up, down  # [E, I, H], [E, I, H], [E, H, I]
        self.device = gate.device

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, K = ids.shape
        out = torch.zeros(T, self.down.shape[1], dtype=torch.float32, device=x.device)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.gate.shape[0]).tolist()
        tok = order // K
        wflat = weights.reshape(-1)[order].to(torch.float32)
        start = 0
        for e, n in enumerate(counts):  # grouped by expert; experts with no tokens are skipped
            if n == 0:
                continue
            rows = tok[start:start + n]
            xs = x[rows]
            h = F.silu(xs @ self.gate[e].T) * (xs @ self.up[e].T)
            y = (h @ self.down[e].T).to(torch.float32) * wflat[start:start + n, None]
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
