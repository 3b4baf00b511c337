"""Decode-sized forwards as one C call for all blocks, when every unit runs on the CPU.

A decode step of the demo model was ~1,400 torch operations (~20 torch calls a block, a few
microseconds of host time each) around ~10 us of arithmetic per block; llama.cpp spends ~80 us a
block in all. When the placement puts every unit of the model on the CPU (a CPU-only plan, or the
"gpu" side running on the CPU because there is no CUDA), `FusedLayers` describes the blocks once,
as pointers into the weights the model already holds (cpu_kernels/blocks.py), and a forward of up
to ROWWISE_MAX rows (a decode step, a draft, a verify batch) runs every block in one call to
`nx_blocks_forward` (cpu_kernels/block_impl.h). Prefill-sized chunks keep the torch path, which
is also the reference the fused path is tested against (tests/test_fused.py).

Why hand-written C and not torch.compile (inductor's C++ backend): the blocks must call the
quantized expert and linear kernels, which are opaque to inductor (graph breaks around each, so
the host calls come back); a new KV length every step means dynamic shapes or recompiles; and a
verify row must get exactly the bits of a plain step's row, which a compiled graph's fusion and
vectorisation choices per shape do not promise. The C path computes every row on its own with
the same code whatever the row count, so it does (tests/test_fused.py checks it bit for bit).

Accounting is kept as the torch path keeps it: the bytes that would cross between the "gpu" and
"cpu" sides are counted per row (measured once from the torch path at build, so the two agree),
and the routed experts' time and distinct experts come back from C for the draft policy's cost
model.
"""
from __future__ import annotations

from time import perf_counter

import numpy as np
import torch

from .linear import ROWWISE_MAX, HeadLinear, KernelLinear
from .model import MoE, GLM4Model, MLAttention, RunContext, Seg
from .trace import NULL_TIMELINE


class NotFusable(Exception):
    """Why a model's blocks cannot run as one C call (the torch path is used instead)."""


def _parts(w) -> list:
    """A dense weight as single-matrix ExpertTensor parts stacked by rows."""
    from cpu_kernels import ExpertTensor

    parts = w.parts if isinstance(w, KernelLinear) else [w]
    out = []
    for p in parts:
        if isinstance(p, torch.Tensor):
            if p.device.type != "cpu" or p.dtype != torch.float32 or p.dim() != 2:
                raise NotFusable(f"a {p.dtype} weight on {p.device}")
            a = p.detach().contiguous().numpy()
            out.append(ExpertTensor(a, "F32", (1, *a.shape)))
        elif getattr(p, "shape", (0,))[0] == 1:
            out.append(p)
        else:
            raise NotFusable(f"a weight part {p!r}")
    return out


def _f32(t: torch.Tensor | None, what: str) -> np.ndarray | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.dtype != torch.float32:
        raise NotFusable(f"{what} is not a float32 CPU tensor")
    return t.detach().contiguous().numpy()


def _heads(w):
    """k_b / v_b as an ExpertTensor of one matrix a head."""
    from cpu_kernels import ExpertTensor

    if isinstance(w, HeadLinear):
        return w.tensor
    if w.device.type != "cpu" or w.dtype != torch.float32 or w.dim() != 3:
        raise NotFusable(f"a {w.dtype} per-head weight on {w.device}")
    a = w.detach().contiguous().numpy()
    return ExpertTensor(a, "F32", a.shape)


def _weights(b, cfg):
    from cpu_kernels.blocks import BlockWeights

    a = b.attn
    if isinstance(a, MLAttention):
        w = BlockWeights(attn_norm=_f32(a.norm, "attn_norm"), qkv=_parts(a.wq_a) + _parts(a.wkv_a),
                         wo=_parts(a.wo), post_norm=_f32(a.post_norm, "ffn_norm"),
                         q_a_norm=_f32(a.q_a_norm, "q_a_norm"), kv_a_norm=_f32(a.kv_a_norm, "kv_a_norm"),
                         q_b=_parts(a.wq_b), k_b=_heads(a.k_b), v_b=_heads(a.v_b))
        if len(w.qkv) > 4:
            raise NotFusable("q_a and kv_a in more than 4 parts")
        return _ffn_weights(b, w)
    qkn = _f32(a.qk_norm, "qk_norm")
    if qkn is not None and qkn.shape != (cfg.n_heads + cfg.n_kv_heads, cfg.head_dim):
        raise NotFusable(f"qk_norm of shape {qkn.shape}")
    w = BlockWeights(attn_norm=_f32(a.norm, "attn_norm"), qkv=_parts(a.wqkv), wo=_parts(a.wo),
                     post_norm=_f32(a.post_norm, "post_attention_norm"), qkv_bias=_f32(a.bqkv, "qkv bias"),
                     qk_norm=qkn)
    return _ffn_weights(b, w)


def _ffn_weights(b, w):
    ffn = b.ffn
    if isinstance(ffn, MoE):
        ex = ffn.routed.experts
        if getattr(ex, "side_kind", None) != "kernel":
            raise NotFusable("routed experts are not on the CPU kernels")
        r = ffn.router
        w.router_w, w.router_b = _f32(r.weight, "router"), _f32(r.bias, "router bias")
        w.top_k, w.norm_topk, w.scale = r.top_k, r.norm, r.scale
        w.experts = (ex.gate, ex.up, ex.down)
        ffn = ffn.shared
    if ffn is not None:
        w.ffn_gate_up, w.ffn_down = _parts(ffn.gate_up), _parts(ffn.down)
    return w


class FusedLayers:
    """The main model's blocks and the MTP block as C block stacks (see the module docstring)."""

    def __init__(self, model: GLM4Model):
        from cpu_kernels.blocks import BlockStack, Dims

        bus, cfg = model.bus, model.cfg
        if any(d.type != "cpu" for d in bus.devices.values()) or bus.dtypes["gpu"] != torch.float32:
            raise NotFusable("a side is not the CPU in float32")
        rope = model.rope
        cos, sin = _f32(rope.cos, "rope table"), _f32(rope.sin, "rope table")
        dims = Dims(cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rms_eps, cos, sin, rope.dim // 2,
                    q_rank=cfg.q_lora_rank, kv_rank=cfg.kv_lora_rank, nope=cfg.nope_dim, v_dim=cfg.v_dim,
                    attn_scale=cfg.attn_scale)
        self.model = model
        self.main = BlockStack(dims, [_weights(b, cfg) for b in model.blocks],
                               final_norm=_f32(model.output_norm, "output_norm"))
        n = model.nextn
        self.mtp = None if n is None else BlockStack(dims, [_weights(n.block, cfg)],
                                                     final_norm=_f32(n.shared_head_norm, "shared_head_norm"))
        self.main_bytes_per_row = self._bytes_per_row(mtp=False)
        self.mtp_bytes_per_row = self._bytes_per_row(mtp=True) if self.mtp is not None else 0

    @classmethod
    def build(cls, model: GLM4Model) -> tuple["FusedLayers | None", str]:
        """(FusedLayers, "") or (None, why not)."""
        try:
            import cpu_kernels.blocks  # noqa: F401
        except ImportError as e:
            return None, f"the CPU kernels are not built ({e})"
        try:
            return cls(model), ""
        except NotFusable as e:
            return None, str(e)

    def _bytes_per_row(self, mtp: bool) -> int:
        """Activation bytes the torch path's Bus counts for one row: measured on a scratch cache,
        in a context of its own, so the fused path reports what the torch path would."""
        m = self.model
        bus = m.bus
        saved = getattr(bus._tls, "ctx", None)
        ctx = bus.begin_run(NULL_TIMELINE)
        try:
            with torch.inference_mode():
                if mtp:
                    cache = m.new_mtp_cache(1, torch.float32)
                    h = torch.zeros(1, m.cfg.hidden)
                    z = m._mtp_pre(h, torch.zeros(1, dtype=torch.long), None)
                    e1 = ctx.activation_bytes
                    m._block(m.nextn.block, z, m.nextn.side, 0, m._positions([Seg(cache, 0, 1, 1)]))
                    return ctx.activation_bytes - e1
                cache = m.new_cache(1, torch.float32)
                x, side = m.embed(torch.zeros(1, dtype=torch.long)), m.embed.side
                e0 = ctx.activation_bytes
                for layer, b in enumerate(m.blocks):
                    x, side = m._block(b, x, side, layer, m._positions([Seg(cache, 0, 1, 0)]))
                m.bus.to(x, side, m.output_norm_side)
                return ctx.activation_bytes - e0
        finally:
            bus._tls.ctx = saved if saved is not None else RunContext()

    @staticmethod
    def accepts(segs: list[Seg]) -> bool:
        """Decode-shaped rows (each sequence's at most ROWWISE_MAX: a step, a draft, a verify
        batch) in float32 CPU caches of one pool; prefill chunks keep the torch path."""
        pool = segs[0].cache.pool
        return pool.fusable and all(sg.n <= ROWWISE_MAX and sg.cache.pool is pool for sg in segs)

    def _view(self, stack, pool):
        v = pool.fused_view
        if v is None or v[0] is not stack:
            pool.fused_view = v = (stack, stack.cache(pool.k, pool.v))
        return v[1]

    def run(self, x: torch.Tensor, segs: list[Seg], mtp: bool) -> torch.Tensor:
        """x [T, H] float32 (a fresh tensor: updated in place), the rows of `segs` in order, through
        every block, then the final norm (output_norm, or the MTP layer's shared_head_norm)."""
        m = self.model
        ctx = m.bus.ctx
        stack = self.mtp if mtp else self.main
        if not x.is_contiguous():
            x = x.contiguous()
        if len(segs) == 1:
            sg = segs[0]
            pos = np.arange(sg.pos0, sg.pos0 + sg.n, dtype=np.int64)
            lslot = np.arange(sg.start, sg.start + sg.n, dtype=np.int64)
            maps = [sg.cache.slot_map] * sg.n
        else:
            pos = np.concatenate([np.arange(sg.pos0, sg.pos0 + sg.n, dtype=np.int64) for sg in segs])
            lslot = np.concatenate([np.arange(sg.start, sg.start + sg.n, dtype=np.int64) for sg in segs])
            maps = [sg.cache.slot_map for sg in segs for _ in range(sg.n)]
        t0 = perf_counter()
        exp_s, distinct = stack.forward_rows(x, self._view(stack, segs[0].cache.pool), pos, lslot, maps)
        t1 = perf_counter()
        ctx.cpu_expert_s += exp_s
        ctx.cpu_experts_read += distinct
        ctx.activation_bytes += x.shape[0] * (self.mtp_bytes_per_row if mtp else self.main_bytes_per_row)
        # one call does both sides' work in turn: its expert time is drawn as one span at its end
        tl = ctx.timeline
        tag = "mtp " if mtp else ""
        tl.add("gpu", f"{tag}blocks (fused)", t0, t1 - exp_s)
        tl.add("cpu", f"{tag}experts (fused)", t1 - exp_s, t1, {"rows": int(x.shape[0])})
        return x
