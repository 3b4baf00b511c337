"""Building a GLM4Model from a GGUF file and a placement: the one place where weights are read.

GPU-side weights are dequantized once, here, to the GPU dtype on the GPU device; CPU-side routed
experts stay in GGUF form (views of the memory map) behind the C kernels. After this returns no
weight is read or copied again. `LoadReport` says how many bytes each side actually holds, which
`placement.estimate_memory` must predict.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from placement.memory import in_gguf_form

from .config import ModelConfig
from .errors import ModelFileError
from .experts import KernelExperts, TorchExperts
from .gguf_file import GGUFFile, TensorInfo
from .linear import HeadLinear, KernelLinear, QuantizedTable
from .model import (Attention, Block, Bus, DenseFFN, Embedding, GLM4Model, Head, MLAttention, MoE, NextnHead,
                    RoPE, RoutedExperts, Router)

SideOf = Callable[[str], str]


def default_side_of(name: str) -> str:
    """Routed experts on the CPU side, everything else (the router too) on the GPU side."""
    return "cpu" if "_exps." in name else "gpu"


# `repack: auto` leaves this much memory free after each repacked copy (the copies are ordinary
# memory; the GGUF's pages they replace become reclaimable page cache, not free memory)
REPACK_RESERVE_BYTES = 2 << 30


def mem_available() -> int:
    """Bytes of memory available to new allocations (MemAvailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover
        return 8 << 30


@dataclass
class LoadReport:
    bytes_by_side: dict = field(default_factory=lambda: {"gpu": 0, "cpu": 0})
    kernel_expert_layers: int = 0
    torch_expert_layers: int = 0
    kernel_weights: int = 0  # dense weights kept in GGUF form on the CPU (runtime/linear.py)
    repacked_bytes: int = 0  # CPU expert bytes copied into a faster layout at load
    repack_skipped: str = ""  # why `repack: auto` stopped repacking, if it did
    mtp_shares_embed: bool = True
    mtp_shares_head: bool = True
    cuda_graphs: str = ""  # whether MoE blocks' gpu-side segments replay CUDA graphs (runtime/graphs.py)
    fused_blocks: str = ""  # whether decode-sized forwards run as one C call (runtime/fused.py), or why not


def same_tensor(a: TensorInfo, b: TensorInfo) -> bool:
    return a.ggml_type == b.ggml_type and a.shape == b.shape and np.array_equal(a.raw(), b.raw())


class _Builder:
    def __init__(self, f: GGUFFile, cfg: ModelConfig, side_of: SideOf, gpu_device, gpu_dtype,
                 use_kernels: bool, threads: int | None, progress: bool, repack: bool | str = "auto"):
        self.f, self.cfg, self.side_of = f, cfg, side_of
        if repack not in (True, False, "auto"):
            raise ValueError(f"repack must be True, False or 'auto', got {repack!r}")
        self.repack = repack
        self.devices = {"gpu": torch.device(gpu_device), "cpu": torch.device("cpu")}
        self.dtypes = {"gpu": gpu_dtype, "cpu": torch.float32}
        self.use_kernels, self.threads = use_kernels, threads
        self.report = LoadReport()
        self.bar = None
        if progress:
            from tqdm import tqdm

            total = f.total_bytes()
            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading", file=sys.stderr,
                            disable=not sys.stderr.isatty(), leave=False)

    def _tick(self, info: TensorInfo):
        if self.bar is not None:
            self.bar.update(info.nbytes)

    def unit_side(self, names: list[str]) -> str:
        """All tensors of one op unit must sit on one side (the plan validator enforces it too)."""
        sides = {self.side_of(n) for n in names if n in self.f.tensors}
        if len(sides) > 1:
            raise ModelFileError(f"tensors {names} are split across sides {sorted(sides)}; keep an op unit together")
        return sides.pop() if sides else "gpu"

    def tensor(self, name: str, side: str, dtype=None) -> torch.Tensor:
        info = self.f.tensors[name]
        arr = info.dequantize()
        t = torch.from_numpy(arr).to(device=self.devices[side], dtype=dtype or self.dtypes[side])
        self.report.bytes_by_side[side] += t.numel() * t.element_size()
        self._tick(info)
        return t

    def opt(self, name: str, side: str, dtype=None):
        return self.tensor(name, side, dtype) if name in self.f.tensors else None

    def mla_attention(self, p: str) -> MLAttention:
        names = [p + s for s in ("attn_norm.weight", "attn_q_a.weight", "attn_q_a_norm.weight", "attn_q_b.weight",
                                 "attn_kv_a_mqa.weight", "attn_kv_a_norm.weight", "attn_k_b.weight",
                                 "attn_v_b.weight", "attn_output.weight", "ffn_norm.weight")]
        side = self.unit_side(names)
        m = lambda i: self.matrix([names[i]], side)  # noqa: E731
        t = lambda i: self.tensor(names[i], side)  # noqa: E731
        return MLAttention(side, t(0), m(1), t(2), m(3), m(4), t(5), self.heads(names[6], side),
                           self.heads(names[7], side), m(8), t(9))

    def heads(self, name: str, side: str):
        """k_b / v_b, one small matrix a head (GLM-4.7-Flash: 20 x 512 x 192, 20 x 256 x 512): in
        GGUF form on the kernels (a HeadLinear) where in_gguf_form says so, else a float tensor
        [heads, N, K] in the side's dtype."""
        info = self.f.tensors[name]
        if not in_gguf_form(info, side, "attention", self.use_kernels, self.devices["gpu"].type == "cpu"):
            return self.tensor(name, side)
        import cpu_kernels

        self.report.bytes_by_side[side] += info.nbytes
        self.report.kernel_weights += 1
        self._tick(info)
        return HeadLinear(cpu_kernels.ExpertTensor(info.raw(), int(info.ggml_type), info.shape), threads=self.threads)

    def attention(self, p: str) -> Attention | MLAttention:
        if self.cfg.mla:
            return self.mla_attention(p)
        names = [p + s for s in ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                                 "attn_output.weight", "attn_q.bias", "attn_k.bias", "attn_v.bias",
                                 "attn_q_norm.weight", "attn_k_norm.weight", "post_attention_norm.weight")]
        side = self.unit_side(names)
        # norms and biases here; the q/k/v and output matrices through `matrix` below
        t = [None if n.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight")) else self.opt(n, side)
             for n in names]
        qk_norm = None
        if (t[8] is None) != (t[9] is None):
            raise ModelFileError(f"{self.f.path.name}: {p}attn_q_norm.weight and {p}attn_k_norm.weight: "
                                 f"one is present without the other")
        if t[8] is not None:
            cfg = self.cfg
            # float32 whatever the side's dtype (a few KiB): RMSNorm multiplies in float32 anyway
            qk_norm = torch.cat([t[8].expand(cfg.n_heads, -1), t[9].expand(cfg.n_kv_heads, -1)]).float()
        return Attention(side, t[0], self.matrix(names[1:4], side), self.matrix(names[4:5], side),
                         self.stack(t[5:8]) if t[5] is not None else None,
                         qk_norm, t[10])

    def stacked(self, names: list[str], side: str, dim: int) -> torch.Tensor:
        """Several tensors concatenated along `dim`, filled one at a time into the result, so the
        side holds the result and at most one dequantized part on the host, not all parts twice
        (the MTP layer's routed experts are GiBs on a GPU with little to spare)."""
        infos = [self.f.tensors[n] for n in names]
        shapes = [torch.Size(i.shape) for i in infos]
        total = list(shapes[0])
        total[dim] = sum(s[dim] for s in shapes)
        out = torch.empty(total, device=self.devices[side], dtype=self.dtypes[side])
        at = 0
        for i, shp in zip(infos, shapes):
            n = shp[dim]
            out.narrow(dim, at, n).copy_(torch.from_numpy(i.dequantize()))
            at += n
            self._tick(i)
        self.report.bytes_by_side[side] += out.numel() * out.element_size()
        return out

    def matrix(self, names: list[str], side: str, counted: bool = False):
        """A weight the model multiplies by, several tensors stacked by rows (one call serves them
        all): a torch tensor on the side's device, or, where the tensors stay in GGUF form
        (placement.memory.in_gguf_form: block-quantized on a side that runs on the CPU), a
        KernelLinear over views of the file (runtime/linear.py). `counted`: the bytes are already
        in the report (a tied head over the embedding's GGUF bytes)."""
        infos = [self.f.tensors[n] for n in names]
        gpu_on_cpu = self.devices["gpu"].type == "cpu"
        gguf = [in_gguf_form(i, side, "weight", self.use_kernels, gpu_on_cpu) for i in infos]
        if not any(gguf):
            ts = [self.tensor(n, side) for n in names]
            return ts[0] if len(ts) == 1 else self.stack(ts)
        import cpu_kernels

        parts = []
        for i, keep in zip(infos, gguf):
            if not keep:  # a float-typed part of a mixed unit: float32 rows (the estimate's rule)
                parts.append(self.tensor(i.name, side, torch.float32))
                continue
            t = cpu_kernels.ExpertTensor(i.raw(), int(i.ggml_type), (1, *i.shape))
            parts.append(self._maybe_repack(t, i))
            if not counted:
                self.report.bytes_by_side[side] += i.nbytes
                self._tick(i)
        self.report.kernel_weights += len(infos)
        return KernelLinear(parts, threads=self.threads)

    def table(self, name: str, side: str):
        """An embedding table: in GGUF form on the CPU (a QuantizedTable over the file's bytes)
        where in_gguf_form says so, else a torch tensor on the side's device."""
        info = self.f.tensors[name]
        if not in_gguf_form(info, side, "weight", self.use_kernels, self.devices["gpu"].type == "cpu"):
            return self.tensor(name, side)
        self.report.bytes_by_side[side] += info.nbytes
        self._tick(info)
        return QuantizedTable(info, self.dtypes[side])

    def stack(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Rows of several weights in one tensor (same bytes: the parts are freed), so one matmul
        serves them all."""
        return torch.cat(parts, dim=0)

    def ffn(self, p: str, suffix: str) -> DenseFFN:
        names = [f"{p}ffn_{w}{suffix}.weight" for w in ("gate", "up", "down")]
        side = self.unit_side(names)
        return DenseFFN(side, self.matrix(names[:2], side), self.matrix(names[2:], side))

    def router(self, p: str) -> Router:
        cfg = self.cfg
        names = [p + "ffn_gate_inp.weight", p + "exp_probs_b.bias"]
        side = self.unit_side(names)
        return Router(side, self.tensor(p + "ffn_gate_inp.weight", side, torch.float32),
                      self.tensor(p + "exp_probs_b.bias", side, torch.float32),
                      cfg.n_experts_used, cfg.weights_norm, cfg.weights_scale)

    def routed(self, p: str) -> RoutedExperts:
        names = [f"{p}ffn_{w}_exps.weight" for w in ("gate", "up", "down")]
        side = self.unit_side(names)
        infos = [self.f.tensors[n] for n in names]
        # Experts on the gpu side where that side is the CPU (no CUDA; the MTP layer's, by
        # default) run on the same kernels: a float copy would only be larger and slower.
        if self.use_kernels and (side == "cpu" or self.devices["gpu"].type == "cpu"):
            import cpu_kernels

            ets = [self._maybe_repack(cpu_kernels.ExpertTensor(i.raw(), int(i.ggml_type), i.shape), i)
                   for i in infos]
            experts = KernelExperts(*ets, threads=self.threads)
            for i in infos:
                self.report.bytes_by_side[side] += i.nbytes
                self._tick(i)
            self.report.kernel_expert_layers += 1
        else:
            experts = TorchExperts(self.stacked(names[:2], side, dim=1), self.tensor(names[2], side))
            self.report.torch_expert_layers += 1
        return RoutedExperts(side, experts)

    def _maybe_repack(self, t, info):
        """The plan's `repack`: true copies every tensor that has a faster layout; auto does so
        while the SIMD kernels are active and the copy leaves REPACK_RESERVE_BYTES free; false
        keeps every tensor in the GGUF's own bytes. A copied tensor's file pages are released."""
        name = info.name
        if self.repack is False:
            return t
        if self.repack == "auto":
            if not t.can_repack() or self.report.repack_skipped:
                return t
            free = mem_available()
            if free - t.nbytes < REPACK_RESERVE_BYTES:
                self.report.repack_skipped = (f"stopped before {name}: {free / 2**30:.1f} GiB available, the copy "
                                              f"needs {t.nbytes / 2**30:.2f} GiB and {REPACK_RESERVE_BYTES >> 30} GiB "
                                              f"stays free")
                warnings.warn(f"repack: auto {self.report.repack_skipped}; the remaining CPU experts are read "
                              f"from the GGUF as they are (set repack: false to silence, or free memory)")
                return t
        r = t.repacked(self.threads)
        if r is not t:
            self.report.repacked_bytes += r.nbytes
            info.release_pages()
        return r

    def block(self, layer: int) -> Block:
        p = f"blk.{layer}."
        attn = self.attention(p)
        if not self.cfg.is_moe(layer):
            return Block(attn, self.ffn(p, ""))
        shared = self.ffn(p, "_shexp") if self.cfg.n_shared else None
        return Block(attn, MoE(self.router(p), self.routed(p), shared))


def build_model(f: GGUFFile, cfg: ModelConfig, *, side_of: SideOf = default_side_of,
                gpu_device="cpu", gpu_dtype=torch.float32, use_kernels: bool = True,
                threads: int | None = None, load_mtp: bool = True, max_context: int = 4096,
                progress: bool = True, repack: bool | str = "auto") -> tuple[GLM4Model, LoadReport]:
    if use_kernels:
        try:
            import cpu_kernels  # noqa: F401
        except ImportError as e:
            warnings.warn(f"CPU expert kernels unavailable ({e}); routed experts use the torch path")
            use_kernels = False
    b = _Builder(f, cfg, side_of, gpu_device, gpu_dtype, use_kernels, threads, progress, repack)
    bus = Bus(b.devices["gpu"], gpu_dtype)
    t = f.tensors
    embed_side = side_of("token_embd.weight")
    embed = Embedding(embed_side, b.table("token_embd.weight", embed_side))
    head_name = "output.weight" if "output.weight" in t else "token_embd.weight"  # tied when absent
    head_side = side_of(head_name)
    # tied (no output.weight): the head multiplies by the embedding's own float table, or by the
    # same GGUF bytes through the kernels where the table stays in GGUF form
    head = embed.table if (head_name == "token_embd.weight" and head_side == embed_side
                           and isinstance(embed.table, torch.Tensor)) else None
    tied_gguf = head_name == "token_embd.weight" and head_side == embed_side and head is None
    head = Head(head_side, head if head is not None else b.matrix([head_name], head_side, counted=tied_gguf))
    norm_side = side_of("output_norm.weight")
    output_norm = b.tensor("output_norm.weight", norm_side)
    blocks = [b.block(layer) for layer in range(cfg.n_layers)]
    if cfg.mla:  # rotates the rope part of q and the shared rope key, each on its own
        rope = RoPE(cfg.rope_dim, cfg.rope_base, max_context + 2, b.devices["gpu"], interleaved=True)
    else:
        rope = RoPE(cfg.rope_dim, cfg.rope_base, max_context + 2, b.devices["gpu"], head_dim=cfg.head_dim)

    nextn = None
    if load_mtp and cfg.n_nextn > 0:
        L = cfg.n_layers
        p = f"blk.{L}.nextn."
        side = b.unit_side([p + s for s in ("eh_proj.weight", "enorm.weight", "hnorm.weight",
                                            "shared_head_norm.weight")])
        own_embed, own_head = t.get(p + "embed_tokens.weight"), t.get(p + "shared_head_head.weight")
        n_embed = embed
        if own_embed is not None and not same_tensor(own_embed, t["token_embd.weight"]):
            b.report.mtp_shares_embed = False
            s = side_of(own_embed.name)
            n_embed = Embedding(s, b.table(own_embed.name, s))
        n_head = head
        if own_head is not None and not same_tensor(own_head, t[head_name]):
            b.report.mtp_shares_head = False
            s = side_of(own_head.name)
            n_head = Head(s, b.matrix([own_head.name], s))
        nextn = NextnHead(side, b.matrix([p + "eh_proj.weight"], side), b.tensor(p + "enorm.weight", side),
                          b.tensor(p + "hnorm.weight", side), b.tensor(p + "shared_head_norm.weight", side),
                          n_embed, n_head, b.block(L))
    if b.bar is not None:
        b.bar.close()
    model = GLM4Model(cfg, bus, embed, blocks, output_norm, norm_side, head, rope, nextn)
    return model, b.report
