"""Placement plans: which side ("gpu" or "cpu") every tensor of a GLM-4.x model lives on.

    plan = load_plan("configs/glm45-air-24gb.yaml", {"n_cpu_moe": 30})
    placement = resolve(plan, gguf_file, cfg)
    est = estimate_memory(placement, gguf_file, cfg, plan)
    print(format_report(plan, placement, est, gpu_free_bytes))

The format is documented in placement/PLAN_FORMAT.md.
"""

from .memory import (DTYPE_SIZE, GPU_RESERVE_BYTES, MemoryEstimate, estimate_memory, fmt_bytes, format_report,
                     kv_bytes_per_block, resolve_gpu_device, resolve_gpu_dtype, resolve_kv_dtype, tensor_load_bytes)
from .resolve import Placement, Row, TensorRole, classify, resolve, same_bytes
from .schema import (DEFAULT_CONTEXT, OVERRIDE_KEYS, Groups, LayerGroup, LayerRange, MtpGroup, Override, Plan,
                     PlanError, Sampling, Speculative, apply_overrides, load_plan, parse_plan_text)
from .synthetic import GLM_SHAPES, SyntheticModel, synthetic_model, synthetic_tensor_table

__all__ = [
    "load_plan", "parse_plan_text", "apply_overrides", "Plan", "Groups", "LayerGroup", "LayerRange", "MtpGroup",
    "Override", "Speculative", "Sampling", "PlanError", "OVERRIDE_KEYS", "DEFAULT_CONTEXT",
    "resolve", "Placement", "Row", "TensorRole", "classify", "same_bytes",
    "estimate_memory", "MemoryEstimate", "format_report", "tensor_load_bytes", "kv_bytes_per_block",
    "resolve_gpu_device", "resolve_gpu_dtype", "resolve_kv_dtype", "fmt_bytes", "DTYPE_SIZE", "GPU_RESERVE_BYTES",
    "synthetic_model", "synthetic_tensor_table", "SyntheticModel", "GLM_SHAPES",
]
