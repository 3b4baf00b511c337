"""The GLM-4.x MoE model (`glm4moe`; `deepseek2` for GLM-4.7-Flash, whose attention is
`MLAttention`) and its MTP (nextn) layer, in torch.

Everything here is compute on weights that already sit where the placement put them. The model
is a list of "units" (embedding, attention of layer N, dense FFN, shared expert, routed experts,
head); each unit lives on one side ("gpu" or "cpu") and runs there. Activations are moved to a
unit's side before it runs, through `Bus`, which counts every byte that crosses between the sides
— also on a machine without CUDA, where both sides are the CPU — so "no weight moves after load"
can be checked anywhere.

Semantics (llama.cpp's glm4moe, transformers' Glm4MoeForCausalLM): x += attn(attn_norm(x));
x += ffn(post_attention_norm(x)); final output_norm and output. Attention has q/k/v bias,
optional per-head RMSNorm of q and k before RoPE, partial NEOX RoPE on the first rope_dim dims
of each head, GQA, scale head_dim^-0.5. The router is
fp32 sigmoid; the selection bias only selects; weights are the unbiased scores, normalised and
scaled. MTP: eh_proj(concat[enorm(embed(x_{p+1})), hnorm(h_p)]) -> a full MoE block ->
shared_head_norm -> head; the row sits at position p+1.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from time import perf_counter
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import ModelConfig
from .kvpool import KVPool, SeqKV, private_cache
from .linear import ROWWISE_MAX, HeadLinear, KernelLinear, QuantizedTable, linear, rowwise
from .trace import NULL_TIMELINE, Timeline


@dataclass
class RunContext:
    """What one generation measures: kept per thread, so sequences decoded concurrently
    (`Engine.generate_batch`) each count their own bytes and time."""

    timeline: Timeline = NULL_TIMELINE
    activation_bytes: int = 0
    weight_bytes: int = 0  # stays 0: no code path copies a weight after load
    cpu_expert_s: float = 0.0  # CPU-side routed-expert time, read by the draft policy's step costs
    cpu_experts_read: int = 0  # distinct (layer, expert) pairs those calls read


class Bus:
    """Moves activations between the two sides and counts the bytes that cross."""

    def __init__(self, gpu_device: torch.device, gpu_dtype: torch.dtype):
        self.devices = {"gpu": torch.device(gpu_device), "cpu": torch.device("cpu")}
        self.dtypes = {"gpu": gpu_dtype, "cpu": torch.float32}
        self._tls = threading.local()

    @property
    def ctx(self) -> RunContext:
        ctx = getattr(self._tls, "ctx", None)
        if ctx is None:
            ctx = self._tls.ctx = RunContext()
        return ctx

    def begin_run(self, timeline: Timeline) -> RunContext:
        self._tls.ctx = RunContext(timeline=timeline)
        return self._tls.ctx

    def end_run(self) -> None:
        self._tls.ctx = RunContext()

    def to(self, x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
        return x if src == dst else self.to_all((x,), src, dst)[0]

    def to_all(self, xs, src: str, dst: str) -> list[torch.Tensor]:
        """Several tensors from src to dst; a device-to-host move waits once for all of them (each
        wait is a round trip to the GPU, and an MoE layer sends its rows, ids and weights)."""
        if src == dst:
            return list(xs)
        ctx = self.ctx
        sdev, ddev = self.devices[src], self.devices[dst]
        d2h = sdev.type == "cuda" and ddev.type == "cpu"
        out = []
        for x in xs:
            ctx.activation_bytes += x.numel() * x.element_size()
            # Move in the source dtype, convert on arrival: what crosses is what we count.
            if d2h:
                # Into pinned host memory, asynchronously; the wait below is for exactly this
                # stream: the CPU side must not read the rows before they have landed.
                x = x.to(ddev, non_blocking=True)
            elif ddev.type == "cuda" and sdev.type == "cpu":
                # Host-to-device from the kernel's output: queued on the stream; later GPU work on
                # the same stream sees it, the host does not wait.
                x = x.pin_memory().to(ddev, non_blocking=True)
            elif x.device != ddev:
                x = x.to(ddev)
            out.append(x)
        if d2h:
            torch.cuda.current_stream(sdev).synchronize()
        dt = self.dtypes[dst]
        return [_as(x, dt) if x.is_floating_point() else x for x in out]


# Attention backends on CUDA, named: with torch's default choice, decode-shaped calls with a new
# KV length each time took ~37 ms each on an H200 (benchmarks/gpu_profile.py; 0.06-0.3 ms with
# this list), and decoding makes a new KV length at every step. GQA rules out the efficient
# kernel and a mask rules out flash, so 2+ query rows take the math path.
_CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def use_named_attention_backends() -> None:
    """Restrict torch's attention to _CUDA_SDPA for the process, once, when a model is built on
    CUDA. `sdpa_kernel(...)` around each call did the same but cost 16 us of host time per layer,
    and its save/restore of these process-wide flags races between threads (a thread leaving it
    restores the default under another thread's attention)."""
    with sdpa_kernel(_CUDA_SDPA):  # the flags the context would set, read back and kept
        flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                 torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())
    torch.backends.cuda.enable_flash_sdp(flags[0])
    torch.backends.cuda.enable_mem_efficient_sdp(flags[1])
    torch.backends.cuda.enable_math_sdp(flags[2])
    torch.backends.cuda.enable_cudnn_sdp(flags[3])


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype; no torch call when it already is (a call costs microseconds of host time, and the
    host is what a decode step waits on)."""
    return x if x.dtype == dtype else x.to(dtype)


def _per_head(w, x: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d] through each head's own matrix w [heads, n, d]: [T, heads, n]. A HeadLinear
    (GGUF blocks on the CPU) runs on the kernels, whose rows keep their bits in any batch; a float
    weight on the CPU takes up to ROWWISE_MAX rows one at a time (the same batched one-column
    product for every row), so a verify row gets a plain step's bits there too."""
    if isinstance(w, HeadLinear):
        return w(x)
    if x.device.type == "cpu" and x.shape[0] <= ROWWISE_MAX:
        return torch.cat([torch.bmm(w, _as(x[t], w.dtype).unsqueeze(-1)).squeeze(-1)[None] for t in range(x.shape[0])])
    return torch.einsum("hnd,thd->thn", w, _as(x, w.dtype))


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if w.dim() == 1 and w.dtype == x.dtype:
        # one call (torch computes bfloat16 in float32 inside, as below: bit-identical results on
        # the CPU in both dtypes, checked over many shapes)
        return F.rms_norm(x, w.shape, w, eps)
    if w.dim() == 2 and w.dtype == torch.float32:
        # a float32 weight per head ([heads, D], the q/k norms): each head normalised in one call
        # (in float32 inside), times the weight in float32; the result stays float32, which the
        # rotation that follows works in
        return F.rms_norm(x, (x.shape[-1],), None, eps) * w
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * _as(w, torch.float32)).to(x.dtype)


class RoPE:
    """Partial NEOX rotary embedding: rotate the first `dim` dims of each head (of `head_dim`),
    half-split order; the rest pass through. `interleaved` (GLM-4.7-Flash's latent attention, as
    llama.cpp's deepseek2 and transformers' rope_interleave): pairs of adjacent dims (x0, x1),
    (x2, x3), ..., pair i rotated by frequency i, over the whole head."""

    def __init__(self, dim: int, base: float, max_pos: int, device, head_dim: int | None = None,
                 interleaved: bool = False):
        head_dim = dim if head_dim is None else head_dim
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        t = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
        c, s = t.cos().float(), t.sin().float()  # [max_pos, dim/2]
        rest = head_dim - dim
        # Per position, over the whole head: C = [c, c, 1...] and S = [-s, s, 0...], and the order
        # that swaps the rotated halves, so (x1, x2, x3) -> (x1 c - x2 s, x2 c + x1 s, x3) is
        # x * C + x[perm] * S: three calls per layer (two concatenations fewer, and no split of
        # the head), with the tables made once here
        if interleaved:
            if rest:
                raise ValueError("interleaved RoPE covers the whole head")
            # (x0, x1) -> (x0 c - x1 s, x1 c + x0 s): C = [c0, c0, c1, c1, ...], S = [-s0, s0, ...],
            # and the order that swaps each pair
            self.cos = c.repeat_interleave(2, dim=-1).to(device)
            self.sin = torch.stack([-s, s], dim=-1).reshape(max_pos, dim).to(device)
            self.perm = torch.arange(dim).view(-1, 2).flip(-1).reshape(-1).to(device)
        else:
            self.cos = torch.cat([c, c, torch.ones(max_pos, rest)], dim=-1).to(device)  # [max_pos, head_dim]
            self.sin = torch.cat([-s, s, torch.zeros(max_pos, rest)], dim=-1).to(device)
            half = dim // 2
            self.perm = torch.cat([torch.arange(half, dim), torch.arange(half), torch.arange(dim, head_dim)]).to(device)
        self.dim, self.head_dim = dim, head_dim
        # A plan may put some layers' attention on the CPU while others are on the GPU: one copy of
        # the (small) tables per device, made on first use there.
        self._tables = {self.cos.device: (self.cos, self.sin, self.perm)}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self._tables.get(device)
        if t is None:
            t = self._tables[device] = (self.cos.to(device), self.sin.to(device), self.perm.to(device))
        return t

    def __call__(self, x: torch.Tensor, cs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # x [T, heads, head_dim]; cs: Positions.cos_sin(x.device): C and S [T, 1, head_dim], perm
        c, s, perm = cs
        xf = _as(x, torch.float32)
        return _as(torch.addcmul(xf * c, xf.index_select(-1, perm), s), x.dtype)


class Positions:
    """One forward's rows: their positions, rotary cos/sin rows and causal mask, made once per
    device that runs the forward's attention, not once per layer (each is a kernel launch on a
    GPU). The rows are `segs`, one per sequence, in order; the mask is for a forward of one
    sequence whose rows sit at cache slots start..start+T-1."""

    def __init__(self, rope: RoPE, pos: torch.Tensor, start: int, segs: list | None = None):
        self.rope, self.pos, self.start = rope, pos, start
        self.segs = segs
        self._cs: dict = {}
        self._mask: dict = {}

    def mask(self, device: torch.device) -> torch.Tensor:
        """Row t (slot start+t) sees slots 0..start+t (for calls of more than ROWWISE_MAX rows;
        fewer run row by row, unmasked: GLM4Model._attention)."""
        m = self._mask.get(device)
        if m is None:
            T = self.pos.shape[0]
            end = self.start + T
            m = self._mask[device] = torch.ones(T, end, dtype=torch.bool, device=device).tril(diagonal=self.start)
        return m

    def cos_sin(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cs = self._cs.get(device)
        if cs is None:
            cos, sin, perm = self.rope.tables(device)
            p = self.pos.to(device)
            cs = self._cs[device] = (cos[p][:, None, :], sin[p][:, None, :], perm)
        return cs


# A sequence's KV cache is its slots in a pool (runtime/kvpool.py): `SeqKV` keeps the old cache's
# surface (length, max_len, truncate, reset) and reads/writes by logical slot.
KVCache = SeqKV


@dataclass
class Seg:
    """One sequence's rows in a forward: `n` rows at cache slots start.. and positions pos0.."""

    cache: SeqKV
    start: int
    n: int
    pos0: int


@dataclass
class Attention:
    side: str
    norm: torch.Tensor
    # attn_q, attn_k, attn_v stacked at load: one matmul per step, not three. A weight is a torch
    # tensor [N, K], or a KernelLinear (GGUF blocks on the CPU: runtime/linear.py)
    wqkv: torch.Tensor | KernelLinear
    wo: torch.Tensor | KernelLinear
    bqkv: torch.Tensor | None = None
    # attn_q_norm for each query head, then attn_k_norm for each KV head: [n_heads + n_kv_heads,
    # head_dim], so one RMSNorm (and one rotation) covers q and k, which lie side by side in qkv
    qk_norm: torch.Tensor | None = None
    post_norm: torch.Tensor | None = None  # post_attention_norm: prepares the FFN input on this side


@dataclass
class MLAttention:
    """Multi-head latent attention (GLM-4.7-Flash; llama.cpp's deepseek2, transformers'
    Glm4MoeLiteAttention), computed in the latent ("absorbed") form llama.cpp uses:

      q = q_b(rms_norm(q_a(h)))                  per head: q_nope [nope], q_rope [rope]
      c, k_rope = kv_a(h)                        latent [R], one rope key shared by the heads
      cache row = [rms_norm(c), rope(k_rope)]    R + rope floats a position, no values
      score_j = (k_b q_nope) . c_j + rope(q_rope) . k_rope_j     (k_b: [R, nope] a head)
      o = v_b (softmax(score * scale) . c)                       (v_b: [v, R] a head)
      out = wo(o)

    equal to expanding every position's keys and values (k_nope = k_b^T c, v = v_b c) by
    associativity, at a cache of R + rope floats a position instead of heads * (nope + rope + v)."""

    side: str
    norm: torch.Tensor
    wq_a: torch.Tensor | KernelLinear  # [q_lora_rank, H]
    q_a_norm: torch.Tensor
    wq_b: torch.Tensor | KernelLinear  # [heads * (nope + rope), q_lora_rank]
    wkv_a: torch.Tensor | KernelLinear  # [R + rope, H]
    kv_a_norm: torch.Tensor
    k_b: torch.Tensor | HeadLinear  # [heads, R, nope]
    v_b: torch.Tensor | HeadLinear  # [heads, v, R]
    wo: torch.Tensor | KernelLinear  # [H, heads * v]
    post_norm: torch.Tensor | None = None  # ffn_norm: the FFN input, on this side


@dataclass
class DenseFFN:
    side: str
    gate_up: torch.Tensor | KernelLinear  # ffn_gate and ffn_up stacked at load [2F, H]
    down: torch.Tensor | KernelLinear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g, u = linear(x, self.gate_up).chunk(2, dim=-1)
        return linear(rowwise(F.silu, g) * u, self.down)


@dataclass
class Router:
    """Sigmoid router (fp32). It runs on its own side: with the attention (ids and weights then
    cross to the experts) or with the routed experts (the normed input crosses once)."""

    side: str
    weight: torch.Tensor  # ffn_gate_inp [E, H] fp32
    bias: torch.Tensor  # exp_probs_b [E] fp32: selection only
    top_k: int
    norm: bool
    scale: float

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = rowwise(torch.sigmoid, linear(_as(x, torch.float32), self.weight))
        ids = torch.topk(scores + self.bias, self.top_k, dim=-1).indices
        w = scores.gather(-1, ids)
        if self.norm:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        # int64 ids as topk makes them: the kernels' wrapper narrows them on the host, cheaper
        # than a conversion launched on a GPU
        return ids, (w * self.scale if self.scale != 1.0 else w)


@dataclass
class RoutedExperts:
    side: str
    experts: object  # TorchExperts | KernelExperts

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.experts(x, ids, w)


@dataclass
class MoE:
    router: Router
    routed: RoutedExperts
    shared: DenseFFN | None


@dataclass
class Block:
    attn: Attention
    ffn: DenseFFN | MoE


@dataclass
class NextnHead:
    """The MTP layer's own parts (its decoder block is a regular Block)."""

    side: str
    eh_proj: torch.Tensor | KernelLinear  # [H, 2H]
    enorm: torch.Tensor
    hnorm: torch.Tensor
    shared_head_norm: torch.Tensor
    embed: "Embedding"
    head: "Head"
    block: Block


@dataclass
class Embedding:
    side: str
    table: torch.Tensor | QuantizedTable  # [V, H]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids.to(self.table.device)]


@dataclass
class Head:
    side: str
    weight: torch.Tensor | KernelLinear  # [V, H]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return linear(h, self.weight).float()


@dataclass
class GLM4Model:
    cfg: ModelConfig
    bus: Bus
    embed: Embedding
    blocks: list[Block]
    output_norm: torch.Tensor
    output_norm_side: str
    head: Head
    rope: RoPE
    nextn: NextnHead | None = None
    overlap: bool = False  # run CPU experts on a worker thread beside the shared expert
    _executor: ThreadPoolExecutor | None = None
    # One CPU expert call at a time: the cores are one resource, and concurrent sequences should
    # take turns on them while their GPU-side work proceeds.
    _cpu_lock: threading.Lock = field(default_factory=threading.Lock)
    _last_moe: int | None = None  # index of the last MoE block (-1: none), found on first use
    # every block as one C call for decode-sized forwards when all units run on the CPU
    # (runtime/fused.py; set by the engine after load, None: the torch path only)
    fused: object | None = None
    # MoE blocks' gpu-side segments as captured CUDA graphs (runtime/graphs.py; set by the engine
    # with NEXTN_CUDA_GRAPHS=1 on CUDA, None: the eager path)
    graphs: object | None = None

    def __post_init__(self):
        if self.bus.devices["gpu"].type == "cuda":
            use_named_attention_backends()

    @property
    def timeline(self) -> Timeline:
        return self.bus.ctx.timeline

    # ---- building blocks -------------------------------------------------------------------

    def _attention(self, a: Attention | MLAttention, x: torch.Tensor, layer: int, pos: Positions) -> torch.Tensor:
        if isinstance(a, MLAttention):
            return self._mla(a, x, layer, pos)
        cfg = self.cfg
        T = x.shape[0]
        h = rms_norm(x, a.norm, cfg.rms_eps)
        qkv = linear(h, a.wqkv, a.bqkv)
        nh, nq, nkv = cfg.n_heads, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        v = qkv[:, nq + nkv:].view(T, cfg.n_kv_heads, cfg.head_dim)
        qk = qkv[:, :nq + nkv].view(T, nh + cfg.n_kv_heads, cfg.head_dim)  # q's heads, then k's
        if a.qk_norm is not None:
            qk = rms_norm(qk, a.qk_norm, cfg.rms_eps)
        qk = self.rope(qk, pos.cos_sin(x.device))
        q, k = qk[:, :nh], qk[:, nh:]
        segs = pos.segs
        if len(segs) == 1:
            o = self._attend(q, k, v, layer, segs[0], pos)
        else:  # a batched step: each sequence's rows over its own cache
            outs, r = [], 0
            for sg in segs:
                outs.append(self._attend(q[r:r + sg.n], k[r:r + sg.n], v[r:r + sg.n], layer, sg, pos))
                r += sg.n
            o = torch.cat(outs)
        o = _as(o.reshape(T, cfg.n_heads * cfg.head_dim), x.dtype)
        return linear(o, a.wo)

    def _mla(self, a: MLAttention, x: torch.Tensor, layer: int, pos: Positions) -> torch.Tensor:
        cfg = self.cfg
        T, nh, R, rope, nope = x.shape[0], cfg.n_heads, cfg.kv_lora_rank, cfg.rope_dim, cfg.nope_dim
        eps = cfg.rms_eps
        h = rms_norm(x, a.norm, eps)
        q = linear(rms_norm(linear(h, a.wq_a), a.q_a_norm, eps), a.wq_b).view(T, nh, nope + rope)
        kv = linear(h, a.wkv_a)  # [T, R + rope]
        cs = pos.cos_sin(x.device)
        k_row = torch.cat([rms_norm(kv[:, :R], a.kv_a_norm, eps), self.rope(kv[:, None, R:], cs)[:, 0]], dim=-1)
        q_lat = _per_head(a.k_b, q[..., :nope])  # the query in latent form [T, heads, R]
        Q = torch.cat([_as(q_lat, k_row.dtype), self.rope(q[..., nope:], cs)], dim=-1)  # [T, heads, R + rope]
        segs = pos.segs
        if len(segs) == 1:
            o = self._attend(Q, k_row[:, None], None, layer, segs[0], pos)
        else:
            outs, r = [], 0
            for sg in segs:
                outs.append(self._attend(Q[r:r + sg.n], k_row[r:r + sg.n, None], None, layer, sg, pos))
                r += sg.n
            o = torch.cat(outs)
        o = _per_head(a.v_b, _as(o, a.v_b.dtype))  # [T, heads, R] -> [T, heads, v]
        return linear(_as(o.reshape(T, nh * cfg.v_dim), x.dtype), a.wo)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, layer: int, sg: Seg,
                pos: Positions) -> torch.Tensor:
        """One sequence's rows: K/V written at its slots start..start+T-1, then attention of row t
        over slots 0..start+t; returns [T, heads, head_dim]."""
        cfg = self.cfg
        T, start = q.shape[0], sg.start
        end = start + T
        sg.cache.write(layer, start, k, v)  # converts to the cache dtype in the same call
        ck, cv = sg.cache.read(layer, end)
        if v is None:  # latent attention: the values are the first kv_lora_rank dims of the keys
            cv = ck[..., :cfg.kv_lora_rank]
        if ck.dtype == torch.float16 and q.dtype != torch.float16:
            # an F16 cache on the CPU is storage only: attention computes in the side's dtype
            # (float32: as the fused path does, on the same rounded values)
            ck, cv = ck.to(q.dtype), cv.to(q.dtype)
        scale = cfg.attn_scale
        if v is None and T <= ROWWISE_MAX:
            # latent attention's decode rows: every head against the one latent "head", as two
            # matmuls a row (SDPA's GQA path broadcast the 576-wide keys to every head: 0.6 ms a
            # call on the CPU at 3 layers of GLM-4.7-Flash, most of a layer's attention)
            k2, v2, qv = ck[:, 0], cv[:, 0], _as(q, ck.dtype)  # [S, R + rope], [S, R], [T, heads, D]
            return torch.stack([torch.softmax((qv[t] @ k2[:start + t + 1].T) * scale, dim=-1) @ v2[:start + t + 1]
                                for t in range(T)])
        K = ck.transpose(0, 1)[None]  # [1, kv, S, D]
        V = cv.transpose(0, 1)[None]
        Q = _as(q.transpose(0, 1)[None], K.dtype)  # [1, heads, T, D]
        if T == 1:  # a decode step: the one-row call itself (no list, no concatenation)
            o = F.scaled_dot_product_attention(Q, K, V, scale=scale, enable_gqa=True)
        elif T <= ROWWISE_MAX:
            # drafts and verify batches: each row as its own one-row call over the slots it sees,
            # exactly the call a plain step makes for that position, so a verified row gets a
            # plain step's bits (greedy MTP then equals plain greedy). No mask: on CUDA flash
            # takes it (0.06-0.13 ms a call against the masked math path's 0.3-0.5 ms).
            o = torch.cat([F.scaled_dot_product_attention(Q[:, :, t:t + 1], K[:, :, :start + t + 1],
                                                          V[:, :, :start + t + 1], scale=scale, enable_gqa=True)
                           for t in range(T)], dim=2)
        else:
            o = F.scaled_dot_product_attention(Q, K, V, attn_mask=pos.mask(q.device), scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)

    def _block(self, b: Block, x: torch.Tensor, x_side: str, layer: int, pos: Positions, tag: str = "",
               beside_experts: Callable[[], None] | None = None) -> tuple[torch.Tensor, str]:
        """One block. `beside_experts` (only given for an MoE block) runs on this thread while the
        block's CPU experts run on the worker when overlapping, else right after them."""
        if self.graphs is not None:
            done = self.graphs.block(self, b, x, x_side, layer, pos, tag, beside_experts)
            if done is not None:
                return done
        bus = self.bus
        ctx = bus.ctx  # this thread's run: the expert worker below reports into it
        tl = ctx.timeline
        a = b.attn
        t0 = perf_counter()
        x = bus.to(x, x_side, a.side)
        x = x + self._attention(a, x, layer, pos)
        h = rms_norm(x, a.post_norm, self.cfg.rms_eps)
        if isinstance(b.ffn, DenseFFN):
            y = bus.to(b.ffn(bus.to(h, a.side, b.ffn.side)), b.ffn.side, a.side)
            tl.add("gpu", f"{tag}layer {layer}", t0, perf_counter())
            return x + y, a.side
        moe, r = b.ffn, b.ffn.routed
        rs = moe.router.side
        hr = bus.to(h, a.side, rs)
        ids, w = moe.router(hr)
        if rs != r.side and a.side == rs:  # rows, ids and weights cross together: one wait
            he, ids, w = bus.to_all((h, ids, w), rs, r.side)
        else:
            he = hr if rs == r.side else bus.to(h, a.side, r.side)
            ids, w = bus.to_all((ids, w), rs, r.side)
        tl.add("gpu", f"{tag}attention+router {layer}", t0, perf_counter())

        def routed() -> torch.Tensor:
            return self._run_routed(r, he, ids, w, ctx, f"{tag}experts {layer}")

        shared = moe.shared
        gpu_shared = shared is not None and shared.side != "cpu"
        if self.overlap and r.side == "cpu" and (gpu_shared or beside_experts is not None):
            # CPU experts on the worker (the C kernels release the GIL) while this thread runs
            # the shared expert on the GPU side; the sum below keeps the plain order.
            fut = self._pool().submit(routed)
            ys = None
            if gpu_shared:
                t = perf_counter()
                ys = bus.to(shared(bus.to(h, a.side, shared.side)), shared.side, a.side)
                tl.add("gpu", f"{tag}shared expert {layer}", t, perf_counter())
            if beside_experts is not None:
                beside_experts()
            yr = fut.result()
        else:
            yr = routed()
            if beside_experts is not None:
                beside_experts()
            ys = None
            if shared is not None:
                t = perf_counter()
                ys = bus.to(shared(bus.to(h, a.side, shared.side)), shared.side, a.side)
                tl.add("gpu", f"{tag}shared expert {layer}", t, perf_counter())
        t = perf_counter()
        y = bus.to(yr, r.side, a.side)
        if ys is not None:
            y = y + ys
        out = x + y
        tl.add("gpu", f"{tag}combine {layer}", t, perf_counter())
        return out, a.side

    def _run_routed(self, r, he: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, ctx: RunContext,
                    label: str) -> torch.Tensor:
        """The routed experts of a block on their side, in the rows' dtype; on the CPU, timed and
        counted into `ctx` (the caller's run: this may run on the expert worker thread)."""
        if r.side != "cpu":
            y = r(he, ids, w)
            return y if y.dtype == he.dtype else y.to(he.dtype)
        # the kernels return float32 when the gpu side is the CPU
        with self._cpu_lock:  # the CPU track: what the cost model and overlap figures measure
            t = perf_counter()
            y = r(he, ids, w)
            t1 = perf_counter()
            # counted under the lock: with draft-ahead, the MTP block's CPU experts (main
            # thread) and these (worker) report into the same run
            ctx.cpu_expert_s += t1 - t
            ctx.cpu_experts_read += len(set(ids.reshape(-1).tolist()))  # 2 us; torch.unique: 19
        ctx.timeline.add("cpu", label, t, t1, {"rows": int(ids.shape[0])})
        return y

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nextn-cpu-experts")
        return self._executor

    # ---- the main model ----------------------------------------------------------------------

    def new_pools(self, n_slots: int, dtype) -> tuple[KVPool, KVPool | None]:
        """The KV pools every sequence of an engine takes its slots from (runtime/kvpool.py): one
        for the main model's layers and one for the MTP layer (None without one), each of
        `n_slots` positions, allocated once."""
        cfg = self.cfg
        main = KVPool([self.bus.devices[b.attn.side] for b in self.blocks], n_slots, cfg.n_kv_heads,
                      cfg.head_dim, dtype, v_dim=cfg.cache_v_dim)
        mtp = None if self.nextn is None else KVPool([self.bus.devices[self.nextn.block.attn.side]], n_slots,
                                                     cfg.n_kv_heads, cfg.head_dim, dtype, v_dim=cfg.cache_v_dim)
        return main, mtp

    def new_cache(self, max_len: int, dtype) -> KVCache:
        """A main-model cache with a pool of its own (one-off forwards, tools, tests)."""
        devs = [self.bus.devices[b.attn.side] for b in self.blocks]
        return private_cache(devs, max_len, self.cfg.n_kv_heads, self.cfg.head_dim, dtype, self.cfg.cache_v_dim)

    def new_mtp_cache(self, max_len: int, dtype) -> KVCache:
        dev = self.bus.devices[self.nextn.block.attn.side]
        return private_cache([dev], max_len, self.cfg.n_kv_heads, self.cfg.head_dim, dtype, self.cfg.cache_v_dim)

    @staticmethod
    def _segs(items, what: str, shift: int) -> list[Seg]:
        """The forward's segments, with their caches holding the slots the rows write."""
        segs = []
        for rows, cache, start in items:
            T = rows.shape[0]
            if start < 0 or start + T > cache.max_len:
                raise ValueError(f"{what} {start}..{start + T - 1} exceed the context of {cache.max_len}")
            cache.reserve(start + T)
            segs.append(Seg(cache, start, T, start + shift))
        return segs

    @staticmethod
    def _split(x: torch.Tensor, segs: list[Seg]) -> list[torch.Tensor]:
        return [x] if len(segs) == 1 else list(x.split([sg.n for sg in segs]))

    def forward(self, tokens: torch.Tensor, cache: KVCache, start: int,
                beside_last_experts: Callable[[], None] | None = None) -> torch.Tensor:
        """Run tokens [T] at slots/positions start..start+T-1; returns h after output_norm [T, H]
        on the head's side. The cache's valid length becomes start+T. `beside_last_experts` runs
        once, beside the last MoE block's routed experts (draft-ahead uses it: the GPU is otherwise
        idle while they run on the CPU), or at the end when there is no MoE block."""
        return self.forward_batch([(tokens, cache, start)], beside_last_experts)[0]

    def forward_batch(self, items, beside_last_experts: Callable[[], None] | None = None) -> list[torch.Tensor]:
        """Several sequences' rows in one forward: `items` are (tokens [T_i], cache, start), one per
        sequence; returns h after output_norm per item. Every matrix is read once for all rows
        (one router call, one routed-expert call per layer); attention runs per sequence over its
        own cache. On the CPU in float32 each row gets the bits it gets alone (the fused path's
        kernels are batch-invariant; runtime/runner.py keeps other CPU paths to one sequence a
        call)."""
        segs = self._segs(items, "positions", 0)
        tokens = items[0][0] if len(items) == 1 else torch.cat([it[0] for it in items])
        t0 = perf_counter()
        x, side = self.embed(tokens), self.embed.side
        self.timeline.add("gpu", "embed", t0, perf_counter())
        if self.fused is not None and self.fused.accepts(segs):
            x = self.fused.run(x, segs, mtp=False)  # through output_norm
            for sg in segs:
                sg.cache.length = sg.start + sg.n
            if beside_last_experts is not None:
                beside_last_experts()
            return self._split(x, segs)
        pos = self._positions(segs)
        if self._last_moe is None:
            self._last_moe = max((i for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoE)), default=-1)
        last_moe = self._last_moe
        for layer, b in enumerate(self.blocks):
            hook = beside_last_experts if layer == last_moe else None
            x, side = self._block(b, x, side, layer, pos, beside_experts=hook)
        if last_moe < 0 and beside_last_experts is not None:
            beside_last_experts()
        for sg in segs:
            sg.cache.length = sg.start + sg.n
        t0 = perf_counter()
        x = self.bus.to(x, side, self.output_norm_side)
        x = rms_norm(x, self.output_norm, self.cfg.rms_eps)
        self.timeline.add("gpu", "output norm", t0, perf_counter())
        return self._split(x, segs)

    def _positions(self, segs: list[Seg]) -> Positions:
        if len(segs) == 1:
            pos = torch.arange(segs[0].pos0, segs[0].pos0 + segs[0].n)
        else:
            pos = torch.cat([torch.arange(sg.pos0, sg.pos0 + sg.n) for sg in segs])
        return Positions(self.rope, pos, segs[0].start, segs)

    def logits(self, h: torch.Tensor, side: str | None = None) -> torch.Tensor:
        t0 = perf_counter()
        h = self.bus.to(h, side or self.output_norm_side, self.head.side)
        out = self.head(h)
        self.timeline.add("gpu", "head", t0, perf_counter())
        return out

    # ---- the MTP layer -------------------------------------------------------------------------

    def mtp_forward(self, h_prev: torch.Tensor, next_tokens: torch.Tensor, cache: KVCache,
                    start: int, h_side: str | None = None) -> torch.Tensor:
        """MTP rows: (h_p after output_norm, x_{p+1}) for p = start..start+T-1, at positions p+1,
        cache slots p. `h_prev` lies on `h_side` (default: where output_norm runs). Returns the output
        AFTER shared_head_norm [T, H] on the MTP side (fed back as h_prev to draft more)."""
        return self.mtp_forward_batch([(h_prev, next_tokens, cache, start, h_side)])[0]

    def mtp_forward_batch(self, items) -> list[torch.Tensor]:
        """Several sequences' MTP rows in one forward: `items` are (h_prev, next_tokens, cache,
        start, h_side) as `mtp_forward` takes them; returns one output per item."""
        n = self.nextn
        segs = self._segs([(it[1], it[2], it[3]) for it in items], "MTP slots", 1)
        if len(items) == 1:
            z = self._mtp_pre(items[0][0], items[0][1], items[0][4])
        else:
            hs = [self.bus.to(h, side or self.output_norm_side, n.side) for h, _, _, _, side in items]
            z = self._mtp_pre(torch.cat(hs), torch.cat([it[1] for it in items]), n.side)
        if self.fused is not None and self.fused.accepts(segs):
            z = self.fused.run(z, segs, mtp=True)  # through shared_head_norm
            for sg in segs:
                sg.cache.length = sg.start + sg.n
            return self._split(z, segs)
        z, side = self._block(n.block, z, n.side, 0, self._positions(segs), tag="mtp ")
        for sg in segs:
            sg.cache.length = sg.start + sg.n
        z = self.bus.to(z, side, n.side)
        return self._split(rms_norm(z, n.shared_head_norm, self.cfg.rms_eps), segs)

    def _mtp_pre(self, h_prev: torch.Tensor, next_tokens: torch.Tensor, h_side: str | None) -> torch.Tensor:
        """eh_proj(concat[enorm(embed(x_{p+1})), hnorm(h_p)]): the MTP block's input rows."""
        n, bus = self.nextn, self.bus
        t0 = perf_counter()
        e = bus.to(n.embed(next_tokens), n.embed.side, n.side)
        h = bus.to(h_prev, h_side or self.output_norm_side, n.side)
        eps = self.cfg.rms_eps
        z = linear(torch.cat([rms_norm(e, n.enorm, eps), rms_norm(h, n.hnorm, eps)], dim=-1), n.eh_proj)
        self.timeline.add("gpu", "mtp eh_proj", t0, perf_counter())
        return z

    def mtp_logits(self, z: torch.Tensor) -> torch.Tensor:
        n = self.nextn
        t0 = perf_counter()
        out = n.head(self.bus.to(z, n.side, n.head.side))
        self.timeline.add("gpu", "mtp head", t0, perf_counter())
        return out
