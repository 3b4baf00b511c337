"""Memory estimate of a resolved placement, and the table `nextn plan` prints.

The rules (the engine allocates by the same ones; `tensor_load_bytes` is the single definition):
  router     ffn_gate_inp and exp_probs_b (the router unit) are float32 on either side.
  gpu side   every other tensor is dequantized once at load to the gpu dtype: n_elements * dtype size.
             gpu dtype: plan.gpu_dtype, or with "auto" bfloat16 on CUDA and float32 when the gpu side
             resolves to the CPU.
  cpu side   routed experts stay in GGUF form (the CPU kernels read them): nbytes as in the file;
             so do the other 2-D weights of a block-quantized, F16 or BF16 type (attention, dense
             and shared FFNs, the head, eh_proj, the embedding tables: `in_gguf_form`); other
             tensors placed on the cpu side (norms, biases, F32 weights) are float32:
             n_elements * 4.
             Where the gpu side resolves to the CPU (no CUDA), the gpu side follows the same rules
             (the MTP layer's routed experts, placed there by default, included).
  none       duplicates that are not loaded (the nextn embed/head copies of the main ones): 0.
  KV cache   per block (main layers + nextn layers), on the side of that block's attention:
             context * n_kv_heads * head_dim * 2 (k and v) * gpu dtype size (the KV dtype is the gpu
             dtype on either side).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.config import ModelConfig

from .resolve import Placement
from .schema import Plan

DTYPE_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
# Headroom a GPU needs beyond weights and KV: the CUDA context, activations, logits, allocator slack.
GPU_RESERVE_BYTES = 3 << 29  # 1.5 GiB


_FLOAT32_ALWAYS = ("ffn_gate_inp.weight", "exp_probs_b.bias")


def resolve_gpu_device(plan: Plan) -> str:
    """The torch device of the gpu side: 'cpu' or 'cuda:N' ('auto': cuda:0 when CUDA is present)."""
    g = plan.gpu
    if g == "cpu":
        return "cpu"
    if g == "cuda":
        return "cuda:0"
    if g.startswith("cuda:"):
        return g
    try:
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    except Exception:  # pragma: no cover - torch is a dependency
        return "cpu"


def resolve_gpu_dtype(plan: Plan, gpu_device: str) -> str:
    if plan.gpu_dtype != "auto":
        return plan.gpu_dtype
    return "bfloat16" if gpu_device.startswith("cuda") else "float32"


def resolve_kv_dtype(plan: Plan, gpu_device: str) -> str:
    """The KV cache's element type: the plan's kv_cache, or (auto) the gpu side's dtype."""
    return plan.kv_cache if plan.kv_cache != "auto" else resolve_gpu_dtype(plan, gpu_device)


_F32 = 0  # ggml type id


def in_gguf_form(info, side: str, role_part: str, use_kernels: bool = True, gpu_on_cpu: bool = False) -> bool:
    """Whether a tensor stays in its GGUF bytes once loaded, read by the CPU kernels: where its
    side runs on the CPU (the cpu side, or the gpu side without CUDA) and the kernels are on,
    routed experts of any type, and the 2-D weights of any type but F32 (block-quantized, F16,
    BF16): the matrices the model multiplies by and the embedding tables it looks rows up in
    (runtime/linear.py). An F32 weight gains nothing from its file form: it stays a torch tensor.
    The loader decides by this function too."""
    if not use_kernels or not (side == "cpu" or (side == "gpu" and gpu_on_cpu)):
        return False
    if role_part == "routed_experts":
        return True
    # 2-D weights, and latent attention's per-head k_b / v_b ([heads, N, K]: runtime/linear.py's HeadLinear)
    return (int(info.ggml_type) != _F32 and (len(info.shape) == 2 or info.name.endswith(_PER_HEAD))
            and info.name.endswith(".weight") and not info.name.endswith(_FLOAT32_ALWAYS))


_PER_HEAD = ("attn_k_b.weight", "attn_v_b.weight")


def tensor_load_bytes(info, side: str, role_part: str, gpu_dtype: str, use_kernels: bool = True,
                      gpu_on_cpu: bool = False) -> int:
    """Bytes a tensor occupies once loaded on `side` (see the module docstring). Without the CPU
    kernels (`use_kernels=False`, the torch paths) cpu-side tensors are float32 copies.
    `gpu_on_cpu`: the gpu side runs on the CPU."""
    if side == "none":
        return 0
    if info.name.endswith(_FLOAT32_ALWAYS):  # the router runs in float32 on either side
        return info.n_elements * 4
    if in_gguf_form(info, side, role_part, use_kernels, gpu_on_cpu):
        return int(info.nbytes)
    if side == "gpu":
        return info.n_elements * DTYPE_SIZE[gpu_dtype]
    return info.n_elements * 4


def kv_bytes_per_block(cfg: ModelConfig, context: int, dtype: str) -> int:
    # latent attention (GLM-4.7-Flash) keeps one latent row a position and no V
    return context * cfg.n_kv_heads * (cfg.head_dim + cfg.cache_v_dim) * DTYPE_SIZE[dtype]


@dataclass
class MemoryEstimate:
    gpu_device: str
    gpu_dtype: str
    context: int
    gpu_weight_bytes: int
    cpu_weight_bytes: int
    gpu_kv_bytes: int
    cpu_kv_bytes: int
    skipped_bytes: int  # file bytes of tensors not loaded (duplicates)
    file_bytes: int
    row_bytes: list[int] = field(default_factory=list)  # loaded bytes per placement row
    kv_dtype: str = "float32"  # the KV cache's element type (resolve_kv_dtype)
    tensor_bytes: dict[str, int] = field(default_factory=dict)  # loaded bytes per tensor
    reserve_bytes: int = GPU_RESERVE_BYTES

    @property
    def kv_bytes(self) -> int:
        return self.gpu_kv_bytes + self.cpu_kv_bytes

    @property
    def gpu_bytes(self) -> int:
        return self.gpu_weight_bytes + self.gpu_kv_bytes

    @property
    def cpu_bytes(self) -> int:
        return self.cpu_weight_bytes + self.cpu_kv_bytes

    def fits(self, gpu_free_bytes: int) -> bool:
        if self.gpu_bytes == 0 or not self.gpu_device.startswith("cuda"):
            return True
        return self.gpu_bytes + self.reserve_bytes <= gpu_free_bytes


def estimate_memory(placement: Placement, gguf_file, cfg: ModelConfig, plan: Plan, *,
                    gpu_device: str | None = None, use_kernels: bool = True) -> MemoryEstimate:
    """Bytes per side after load. `gpu_device`: what the gpu side runs on ('cpu', 'cuda:0'); by
    default resolved from plan.gpu on this machine (pass 'cuda:0' to size a plan for a GPU elsewhere).
    `use_kernels=False`: the engine's torch expert path (cpu-side experts dequantized to float32)."""
    device = "cpu" if plan.gpu == "cpu" else (gpu_device or resolve_gpu_device(plan))
    dtype = resolve_gpu_dtype(plan, device)
    context = plan.context_for(cfg.context_length)
    per_tensor: dict[str, int] = {}
    totals = {"gpu": 0, "cpu": 0, "none": 0}
    skipped = 0
    for name, info in gguf_file.tensors.items():
        side = placement.tensors[name]
        b = tensor_load_bytes(info, side, placement.roles[name].part, dtype, use_kernels, device == "cpu")
        per_tensor[name] = b
        totals[side] += b
        if side == "none":
            skipped += int(info.nbytes)
    kv = {"gpu": 0, "cpu": 0}
    kv_dtype = resolve_kv_dtype(plan, device)
    for b in range(cfg.n_blocks):
        side = placement.units.get(f"blk.{b}.attention", "gpu")
        kv[side] += kv_bytes_per_block(cfg, context, kv_dtype)
    rows = [sum(per_tensor[n] for n in r.names) for r in placement.rows]
    return MemoryEstimate(gpu_device=device, gpu_dtype=dtype, context=context, gpu_weight_bytes=totals["gpu"],
                          cpu_weight_bytes=totals["cpu"], gpu_kv_bytes=kv["gpu"], cpu_kv_bytes=kv["cpu"],
                          skipped_bytes=skipped, file_bytes=sum(int(t.nbytes) for t in gguf_file.tensors.values()),
                          row_bytes=rows, tensor_bytes=per_tensor, kv_dtype=kv_dtype)


def fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << k:
            return f"{n / (1 << k):.2f} {unit}"
    return f"{n} B"  # pragma: no cover


def format_report(plan: Plan, placement: Placement, est: MemoryEstimate, gpu_free_bytes: int | None = None) -> str:
    """The resolved placement as `nextn plan PLAN.yaml` prints it."""
    cfg = placement.cfg
    out = [f"plan:  {plan.source}" + (f"  ({plan.description})" if plan.description else ""),
           f"model: {placement.model}  ({cfg.n_layers} layers + {cfg.n_nextn} nextn, hidden {cfg.hidden}, "
           f"{cfg.n_experts} experts x {cfg.expert_ffn}, top-{cfg.n_experts_used})",
           f"gpu side: {est.gpu_device} ({est.gpu_dtype})   cpu side: routed experts in GGUF form, "
           f"threads {plan.threads}, repack {str(plan.repack).lower()}   context {est.context}",
           ""]
    head = ("group", "layers", "side", "types", "tensors", "file", "loaded")
    table = [head]
    for r, b in zip(placement.rows, est.row_bytes):
        table.append((r.group, r.layers, r.side, "+".join(r.types), str(r.n_tensors), fmt_bytes(r.file_bytes),
                      fmt_bytes(b)))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        out.append("  ".join(c.rjust(w) if j >= 4 else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    kv_blk = kv_bytes_per_block(cfg, est.context, est.kv_dtype)
    out += ["",
            f"KV cache for context {est.context}: {fmt_bytes(est.kv_bytes)} "
            f"({cfg.n_blocks} blocks x {est.context} x {cfg.n_kv_heads} kv heads x "
            f"{f'{cfg.head_dim} latent' if cfg.mla else f'{cfg.head_dim} x 2'}; "
            f"{fmt_bytes(kv_blk)} per block at {est.kv_dtype})",
            f"total gpu side: {fmt_bytes(est.gpu_bytes)} = weights {fmt_bytes(est.gpu_weight_bytes)} "
            f"+ KV {fmt_bytes(est.gpu_kv_bytes)}",
            f"total cpu side: {fmt_bytes(est.cpu_bytes)} = weights {fmt_bytes(est.cpu_weight_bytes)} "
            f"+ KV {fmt_bytes(est.cpu_kv_bytes)}"]
    if est.skipped_bytes:
        out.append(f"not loaded (duplicates of the main embedding/head): {fmt_bytes(est.skipped_bytes)}")
    mtp = "no nextn layer"
    if cfg.n_nextn:
        mtp = (f"{'on' if placement.mtp_enabled else 'off'}; embedding {placement.mtp_embed_name}"
               f"{' (shared)' if placement.mtp_shares_embed else ''}, head {placement.mtp_head_name}"
               f"{' (shared)' if placement.mtp_shares_head else ''}")
    out.append(f"MTP: {mtp}")
    if gpu_free_bytes is not None and est.gpu_device.startswith("cuda"):
        need = est.gpu_bytes + est.reserve_bytes
        verdict = "fits" if est.fits(gpu_free_bytes) else "DOES NOT FIT"
        out.append(f"GPU free {fmt_bytes(gpu_free_bytes)}: {verdict} (needs {fmt_bytes(need)} incl. "
                   f"{fmt_bytes(est.reserve_bytes)} headroom)")
    for w in placement.warnings:
        out.append(f"warning: {w}")
    return "\n".join(out)
