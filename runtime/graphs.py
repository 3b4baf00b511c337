"""The GPU side of an MoE layer between two CPU expert calls, in a form a CUDA graph can capture.

On a GPU, the stretch of a layer between two CPU expert calls (attention norm, qkv, q/k norm, RoPE,
KV write, attention, wo, residual, post-norm, router with its bias and top-k, shared expert) is
~35 small kernels issued from Python: ~0.95 ms of host time per layer on an H200 (BENCHMARKS.md,
"GPU check"), against tens of microseconds of GPU work at decode sizes. A captured CUDA graph
issues them all with one host call. `Segment` is that stretch for one layer and one row count,
written so that capture is legal and a new position needs no new capture:

- every tensor it reads or writes is a buffer made once, at construction: the input rows
  (`x_in`), the outputs (`res`, `hn`, `ids`, `w`, `ys`) and every intermediate, each written with
  an out= or in-place op. A replay reuses the captured addresses, so a buffer made inside the
  segment would be a different tensor on every eager call and a stale one under replay.
- what changes from step to step (positions, the KV slot each row writes, the slots each row
  attends over and how many of them are valid) is data in device tensors (`StepInputs`), filled
  by one host-to-device copy per forward, never a Python int baked into a kernel argument. KV
  rows go into the pool with index_copy_ at device-side slot indices.
- attention runs over a fixed-size window of W slots per row, gathered from the paged pool by a
  device-side index (the row's sequence's slot map, padded), with the slots at or past the row's
  length masked to -inf before the softmax. Windows come in buckets (powers of two from
  WINDOW_MIN): a graph per (layer, rows, window), so a sequence of length 300 attends over 512
  slots, not over its whole context. Why buckets and not one window of the whole context: the
  gather and the masked softmax cost O(W), and at 4096+ slots that is more GPU time per layer
  than the whole segment at a short length; why not exact lengths: a new length every step would
  mean a capture every step. With WINDOW_MIN 256 a 32k context needs 8 buckets.
- the attention is written out (gather, bmm, mask, softmax in place, bmm) in float32, not
  F.scaled_dot_product_attention: SDPA has no out= form (it allocates its output and, in the math
  backend, its scores), and flash takes no mask. At decode sizes these are a few small kernels.
- nothing synchronises with the host: no .item(), .tolist(), .cpu(), nonzero or data-dependent
  shape. tests/test_graphs.py runs `run()` under `CaptureCheck` (a TorchDispatchMode) on the CPU
  and fails on any of those, and on any op that makes a tensor instead of writing one of the
  buffers.

`run()` is the code a graph captures; on CUDA `capture()` records it (warm-up on a side stream,
then torch.cuda.graph) and `replay()` re-issues it. On the CPU `replay()` is `run()`, which is how
the tests exercise it. Numerics: the eager path's rms_norm/SDPA/bmm-per-row calls round
differently from these out= forms, so outputs agree to float32 rounding, not bit for bit;
within the graph path every row is computed by the same kernels whatever the row count, on the
CPU at least (tests check it).

`GraphedLayers` wires segments into `GLM4Model._block` when the switch is on (env
NEXTN_CUDA_GRAPHS=1, read by the engine; off by default until measured on a GPU) and the gpu side
is CUDA: for an MoE block whose attention, router and shared expert run on the gpu side with
torch weights and whose routed experts run on the CPU. Everything else keeps the eager path.
"""
from __future__ import annotations

import os
from time import perf_counter

import numpy as np
import torch

WINDOW_MIN = 256
MAX_ROWS = 16  # decode steps, drafts, verify batches and small batches of sequences


def window_for(n: int) -> int:
    """The smallest bucket of at least n slots."""
    w = WINDOW_MIN
    while w < n:
        w *= 2
    return w


class StepInputs:
    """One forward's per-row data on the device, shared by every layer's segment of one (rows,
    window): positions, the physical slot each row writes, each row's valid length, and the W
    physical slots each row attends over. One pinned host buffer, one copy per forward."""

    def __init__(self, rows: int, window: int, device: torch.device):
        self.rows, self.window, self.device = rows, window, torch.device(device)
        n = 3 * rows + rows * window
        cuda = self.device.type == "cuda"
        self.host = torch.zeros(n, dtype=torch.int64, pin_memory=cuda)
        self.dev = self.host.clone() if not cuda else torch.zeros(n, dtype=torch.int64, device=self.device)
        meta = self.dev[:3 * rows].view(3, rows)
        self.pos, self.slot, self.length = meta[0], meta[1], meta[2].view(rows, 1)
        self.index = self.dev[3 * rows:]  # [rows * window], row-major
        self.arange = torch.arange(window, dtype=torch.int64, device=self.device)
        self._np = self.host.numpy()
        self.key = None  # the Positions object last loaded (one load per forward)
        self.copied = None  # CUDA: an event after the last copy out of `host`

    def load(self, segs) -> None:
        """Fill from a forward's segments (each row t of a segment sits at slot start+t and sees
        slots 0..start+t). The copy is asynchronous: before the pinned buffer is rewritten, wait
        for the previous copy out of it (a CPU expert call has usually synchronised the stream
        long before; a block whose experts are on the GPU, the MTP layer's, does not)."""
        if self.copied is not None:
            self.copied.synchronize()
        R, W = self.rows, self.window
        a = self._np
        meta = a[:3 * R].reshape(3, R)
        idx = a[3 * R:].reshape(R, W)
        r = 0
        for sg in segs:
            sm = sg.cache.slot_map
            for t in range(sg.n):
                s = sg.start + t
                meta[0, r], meta[1, r], meta[2, r] = sg.pos0 + t, sm[s], s + 1
                idx[r, :s + 1] = sm[:s + 1]
                idx[r, s + 1:] = 0  # padding: a valid slot index, masked out by the length
                r += 1
        self.dev.copy_(self.host, non_blocking=True)
        if self.device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record()


class Segment:
    """One layer's gpu-side segment for `rows` rows over a `window`-slot attention window."""

    def __init__(self, model, block, k_pool: torch.Tensor, v_pool: torch.Tensor, steps: StepInputs):
        cfg = model.cfg
        a, moe = block.attn, block.ffn
        dev, dt = k_pool.device, model.bus.dtypes["gpu"]
        R, W = steps.rows, steps.window
        nh, nkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        H, E, K = cfg.hidden, moe.router.weight.shape[0], moe.router.top_k
        f32 = torch.float32
        self.cfg, self.a, self.moe, self.steps = cfg, a, moe, steps
        self.k_pool, self.v_pool = k_pool, v_pool
        self.rows, self.window, self.device = R, W, dev
        self.eps, self.scale = cfg.rms_eps, D ** -0.5
        self.g = nh // nkv
        cos, sin, perm = model.rope.tables(dev)
        self.cos, self.sin, self.perm = cos, sin, perm
        # weights as the segment multiplies them (made here, once: not inside run())
        self.norm_w = a.norm.float()
        self.post_w = a.post_norm.float()
        self.qk_w = None if a.qk_norm is None else a.qk_norm.float()
        self.rw, self.rb = moe.router.weight, moe.router.bias
        sh = moe.shared
        z = lambda *shape, dtype=dt: torch.zeros(*shape, dtype=dtype, device=dev)
        # the input and the outputs (what the model reads after a replay)
        self.x_in = z(R, H)
        self.res = z(R, H)  # x + attention
        self.hn = z(R, H)  # post_attention_norm(res): the experts' input
        self.ids = z(R, K, dtype=torch.int64)
        self.w = z(R, K, dtype=f32)
        self.ys = None if sh is None else z(R, H)
        # intermediates
        self.x32, self.sq, self.ms = z(R, H, dtype=f32), z(R, H, dtype=f32), z(R, 1, dtype=f32)
        self.y32 = z(R, H, dtype=f32)
        self.h = z(R, H)
        self.qkv = z(R, (nh + 2 * nkv) * D)
        self.qkf = z(R, nh + nkv, D, dtype=f32)
        self.qsq, self.qms = z(R, nh + nkv, D, dtype=f32), z(R, nh + nkv, 1, dtype=f32)
        self.c, self.s = z(R, D, dtype=f32), z(R, D, dtype=f32)
        self.rot, self.tmp, self.qkr = (z(R, nh + nkv, D, dtype=f32) for _ in range(3))
        self.kc, self.vc = z(R, nkv, D, dtype=k_pool.dtype), z(R, nkv, D, dtype=v_pool.dtype)
        self.kg, self.vg = z(R * W, nkv, D, dtype=k_pool.dtype), z(R * W, nkv, D, dtype=v_pool.dtype)
        self.kt, self.vt = z(R, nkv, W, D, dtype=f32), z(R, nkv, W, D, dtype=f32)
        self.qb = z(R, nh, D, dtype=f32)
        self.sc = z(R * nkv, self.g, W, dtype=f32)
        self.neg = z(R, W, dtype=torch.bool)
        self.mx, self.sm = z(R * nkv, self.g, 1, dtype=f32), z(R * nkv, self.g, 1, dtype=f32)
        self.o32 = z(R * nkv, self.g, D, dtype=f32)
        self.o = z(R, nh * D)
        self.ao = z(R, H)
        self.hn32 = z(R, H, dtype=f32)
        self.rs, self.sel = z(R, E, dtype=f32), z(R, E, dtype=f32)
        self.tv, self.ws = z(R, K, dtype=f32), z(R, 1, dtype=f32)
        if sh is not None:
            F2 = sh.gate_up.shape[0]
            self.gu, self.sb = z(R, F2), z(R, F2 // 2)
        self.graph = None

    def _norm(self, x: torch.Tensor, w32: torch.Tensor, out: torch.Tensor) -> None:
        """out = RMSNorm(x) * w, computed in float32 (as F.rms_norm does inside)."""
        x32 = x if x.dtype == torch.float32 else self.x32.copy_(x)
        torch.mul(x32, x32, out=self.sq)
        torch.mean(self.sq, -1, keepdim=True, out=self.ms)
        self.ms.add_(self.eps).rsqrt_()
        y = out if out.dtype == torch.float32 else self.y32
        torch.mul(x32, self.ms, out=y)
        y.mul_(w32)
        if y is not out:
            out.copy_(y)

    def run(self) -> None:
        """x_in -> res, hn, ids, w, ys: the code a CUDA graph captures (no allocation, no sync)."""
        cfg, a, st = self.cfg, self.a, self.steps
        R, W, g = self.rows, self.window, self.g
        nh, nkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        nq = nh * D
        self._norm(self.x_in, self.norm_w, self.h)
        if a.bqkv is None:
            torch.mm(self.h, a.wqkv.T, out=self.qkv)
        else:
            torch.addmm(a.bqkv, self.h, a.wqkv.T, out=self.qkv)
        qk = self.qkv[:, :nq + nkv * D].view(R, nh + nkv, D)
        v = self.qkv[:, nq + nkv * D:].view(R, nkv, D)
        if self.qk_w is not None:  # per-head RMSNorm of q and k (float32, as the eager path)
            self.qkf.copy_(qk)
            torch.mul(self.qkf, self.qkf, out=self.qsq)
            torch.mean(self.qsq, -1, keepdim=True, out=self.qms)
            self.qms.add_(self.eps).rsqrt_()
            self.qkf.mul_(self.qms).mul_(self.qk_w)
        else:
            self.qkf.copy_(qk)
        # RoPE: x * C + x[perm] * S with C, S the rows of the rows' positions (device-side)
        torch.index_select(self.cos, 0, st.pos, out=self.c)
        torch.index_select(self.sin, 0, st.pos, out=self.s)
        torch.index_select(self.qkf, -1, self.perm, out=self.rot)
        torch.mul(self.qkf, self.c[:, None], out=self.tmp)
        torch.addcmul(self.tmp, self.rot, self.s[:, None], out=self.qkr)
        # KV rows into the pool at the rows' physical slots
        self.kc.copy_(self.qkr[:, nh:])
        self.vc.copy_(v)
        self.k_pool.index_copy_(0, st.slot, self.kc)
        self.v_pool.index_copy_(0, st.slot, self.vc)
        # attention of each row over its window: gather, [R*kv, g, W] scores, mask, softmax, @ V
        torch.index_select(self.k_pool, 0, st.index, out=self.kg)
        torch.index_select(self.v_pool, 0, st.index, out=self.vg)
        self.kt.copy_(self.kg.view(R, W, nkv, D).permute(0, 2, 1, 3))
        self.vt.copy_(self.vg.view(R, W, nkv, D).permute(0, 2, 1, 3))
        self.qb.copy_(self.qkr[:, :nh])  # query head h reads KV head h // g (GQA)
        torch.bmm(self.qb.view(R * nkv, g, D), self.kt.view(R * nkv, W, D).transpose(1, 2), out=self.sc)
        self.sc.mul_(self.scale)
        torch.ge(st.arange, st.length, out=self.neg)  # slot j of row r is valid iff j < length[r]
        self.sc.view(R, nkv, g, W).masked_fill_(self.neg[:, None, None, :], float("-inf"))
        torch.amax(self.sc, -1, keepdim=True, out=self.mx)
        self.sc.sub_(self.mx).exp_()
        torch.sum(self.sc, -1, keepdim=True, out=self.sm)
        self.sc.div_(self.sm)
        torch.bmm(self.sc, self.vt.view(R * nkv, W, D), out=self.o32)
        self.o.copy_(self.o32.view(R, nh * D))
        torch.mm(self.o, a.wo.T, out=self.ao)
        torch.add(self.x_in, self.ao, out=self.res)
        self._norm(self.res, self.post_w, self.hn)
        # router: fp32 sigmoid scores, the bias only selects, weights normalised and scaled
        r = self.moe.router
        hn32 = self.hn if self.hn.dtype == torch.float32 else self.hn32.copy_(self.hn)
        torch.mm(hn32, self.rw.T, out=self.rs)
        self.rs.sigmoid_()
        torch.add(self.rs, self.rb, out=self.sel)
        torch.topk(self.sel, r.top_k, dim=-1, out=(self.tv, self.ids))
        torch.gather(self.rs, -1, self.ids, out=self.w)
        if r.norm:
            torch.sum(self.w, -1, keepdim=True, out=self.ws)
            self.ws.add_(1e-20)
            self.w.div_(self.ws)
        if r.scale != 1.0:
            self.w.mul_(r.scale)
        sh = self.moe.shared
        if sh is not None:
            F = self.sb.shape[1]
            torch.mm(self.hn, sh.gate_up.T, out=self.gu)
            torch.ops.aten.silu.out(self.gu[:, :F], out=self.sb)
            self.sb.mul_(self.gu[:, F:])
            torch.mm(self.sb, sh.down.T, out=self.ys)

    def capture(self) -> None:
        """Record run() in a CUDA graph (CUDA only): warm-up on a side stream, as capture needs
        (lazy cuBLAS/handle setup must not happen during capture), then capture."""
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(2):
                self.run()
        torch.cuda.current_stream(self.device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        # thread_local: the CPU experts' worker thread may be running kernels meanwhile; only
        # this thread's CUDA calls must be capture-safe
        with torch.cuda.graph(g, capture_error_mode="thread_local"):
            self.run()
        self.graph = g

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.run()


class GraphedLayers:
    """Segments per (block, rows, window), made (and on CUDA captured) on first use."""

    def __init__(self, model, capture: bool):
        self.model = model
        self.capture = capture  # False: run() eagerly (the CPU tests; a debugging aid on CUDA)
        self.device = model.bus.devices["gpu"]
        self.segments: dict = {}
        self.steps: dict = {}

    @staticmethod
    def eligible(model, block) -> bool:
        from .model import MoE

        moe = block.ffn
        if not isinstance(moe, MoE):
            return False
        a, sh = block.attn, moe.shared
        torch_w = all(isinstance(w, torch.Tensor) for w in (a.wqkv, a.wo))
        if sh is not None:
            torch_w = torch_w and sh.side == "gpu" and all(isinstance(w, torch.Tensor) for w in (sh.gate_up, sh.down))
        # routed experts on the CPU (the hybrid plans), or on the GPU (the MTP layer of a GPU
        # plan: they run eagerly after the replay, as the CPU ones do)
        return (torch_w and a.side == "gpu" and moe.router.side == "gpu"
                and a.post_norm is not None and model.cfg.n_heads % model.cfg.n_kv_heads == 0)

    @classmethod
    def build(cls, model, env: str | None = None):
        """(GraphedLayers or None, why): on only with NEXTN_CUDA_GRAPHS=1 and a CUDA gpu side."""
        env = (os.environ.get("NEXTN_CUDA_GRAPHS", "0") if env is None else env).strip().lower()
        cuda = model.bus.devices["gpu"].type == "cuda"
        if env not in ("1", "on", "true", "yes"):  # nothing to say without CUDA: "" (no line)
            return None, "off (NEXTN_CUDA_GRAPHS=1 turns it on)" if cuda else ""
        if not cuda:
            return None, "off: the gpu side is not CUDA"
        if model.cfg.mla:
            return None, "off: latent attention (GLM-4.7-Flash) is not captured yet"
        blocks = list(model.blocks) + ([model.nextn.block] if model.nextn is not None else [])
        if not any(cls.eligible(model, b) for b in blocks):
            return None, "off: no MoE block with attention, router and shared expert on the GPU"
        return cls(model, capture=True), "on"

    def _steps(self, pos, tag: str, R: int, W: int) -> StepInputs:
        # per (tag, rows, window): the MTP layer's forward may run in the middle of the main
        # model's (draft-ahead, beside the last experts) and must not reload the main's inputs
        st = self.steps.get((tag, R, W))
        if st is None:
            st = self.steps[(tag, R, W)] = StepInputs(R, W, self.device)
        if st.key is not pos:  # once per forward, whatever the number of layers
            st.load(pos.segs)
            st.key = pos
        return st

    def block(self, model, b, x, x_side: str, layer: int, pos, tag: str, beside_experts):
        """GLM4Model._block for an eligible block via its segment; None: use the eager path."""
        segs = pos.segs
        R = int(x.shape[0])
        if R > MAX_ROWS or not self.eligible(model, b) or x.device.type != self.device.type:
            return None
        pool = segs[0].cache.pool
        if any(sg.cache.pool is not pool for sg in segs):
            return None
        # a pool smaller than the bucket (a short private cache) caps the window at its size
        W = min(window_for(max(sg.start + sg.n for sg in segs)), pool.n_slots)
        bus, ctx = model.bus, model.bus.ctx
        tl = ctx.timeline
        t0 = perf_counter()
        st = self._steps(pos, tag, R, W)
        key = (tag, layer, R, W)
        seg = self.segments.get(key)
        if seg is None or seg.k_pool is not pool.k[layer]:  # a new pool (a private cache): anew
            seg = Segment(model, b, pool.k[layer], pool.v[layer], st)
            seg.x_in.copy_(bus.to(x, x_side, "gpu"))
            if self.capture:  # the warm-up runs write this step's own K/V slots: harmless
                seg.capture()
            self.segments[key] = seg
        else:
            seg.x_in.copy_(bus.to(x, x_side, "gpu"))
        seg.replay()
        r = b.ffn.routed
        he, ids, w = bus.to_all((seg.hn, seg.ids, seg.w), "gpu", r.side)
        tl.add("gpu", f"{tag}attention+router {layer} (graph)", t0, perf_counter())

        def routed():
            return model._run_routed(r, he, ids, w, ctx, f"{tag}experts {layer}")

        if model.overlap and r.side == "cpu" and beside_experts is not None:
            fut = model._pool().submit(routed)
            beside_experts()
            yr = fut.result()
        else:
            yr = routed()
            if beside_experts is not None:
                beside_experts()
        t = perf_counter()
        y = bus.to(yr, r.side, "gpu")
        if seg.ys is not None:
            y = y + seg.ys
        out = seg.res + y  # a fresh tensor: the next replay overwrites seg.res
        tl.add("gpu", f"{tag}combine {layer}", t, perf_counter())
        return out, "gpu"


# ---- the capture discipline, checked without a GPU ---------------------------------------------

# ops that make the host wait for the device (a value read back) or that have data-dependent
# output shapes (which need such a wait to size the output): neither can sit inside a CUDA graph
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "nonzero_static", "masked_select", "unique",
            "_unique", "_unique2", "unique_consecutive", "unique_dim", "equal", "is_nonzero",
            "allclose", "repeat_interleave", "bincount", "histc", "_assert_async", "tolist"}


class CaptureCheck(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op run under it and what breaks capture:
    `syncs`  ops in SYNC_OPS, and copies between devices (a device-to-host copy waits);
    `allocs` ops whose outputs share storage with none of their tensor arguments: a new tensor
             (factory ops, and functional ops such as `a + b` instead of torch.add(a, b, out=c)).
    Views and in-place/out= ops write or alias an argument's storage and are not counted."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.syncs: list[str] = []
        self.allocs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        self.ops.append(str(func))
        ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if name in SYNC_OPS:
            self.syncs.append(str(func))
        elif name in ("copy_", "_to_copy", "to", "_copy_from") and len({t.device for t in ins}) > 1:
            self.syncs.append(f"{func} across devices")
        elif name == "_to_copy" and kwargs.get("device") is not None and \
                any(torch.device(kwargs["device"]) != t.device for t in ins):
            self.syncs.append(f"{func} to {kwargs['device']}")
        out = func(*args, **kwargs)
        seen = {t.untyped_storage().data_ptr() for t in ins}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.allocs.append(str(func))
                break
        return out


def check_capturable(fn, calls: int = 2) -> CaptureCheck:
    """Run fn `calls` times; the check of the last call (the first may set up caches). Under
    inference mode, as the engine runs forwards (the segments' buffers are made in it)."""
    with torch.inference_mode():
        for _ in range(calls - 1):
            fn()
        with CaptureCheck() as c:
            fn()
    return c
