"""`runtime.load()`: plan (or bare GGUF) + overrides -> a ready Engine."""

from __future__ import annotations

import os
from pathlib import Path

from placement import load_plan, resolve

from .config import read_config
from .engine import Engine
from .errors import NextnError
from .gguf_file import GGUFFile

_PKG = Path(__file__).resolve().parent
DEMO_MODEL = _PKG / "demo" / "demo.gguf"
DEMO_PLAN = _PKG.parent / "configs" / "demo.yaml"


def load(plan_or_gguf_path: str | os.PathLike | None = None, **overrides) -> Engine:
    """Load a model per a YAML plan, or a GGUF file with the default placement (routed experts on
    the CPU side, everything else on the GPU side). No path: the bundled demo model and plan.
    Overrides are plan keys (gpu, threads, repack, gpu_dtype, context, cpu_moe, n_cpu_moe, override_tensor,
    mtp, draft_max, p_min, adaptive, temperature, top_k, top_p, min_p, seed, max_tokens, repeat_penalty,
    repeat_last_n) plus
    `progress` (bool), `use_kernels` (bool, False: torch on float copies for every weight, the
    reference path; default: the C kernels run CPU-side quantized weights) and `overlap`
    (bool: CPU experts on a worker beside the shared expert; default on with CUDA)."""
    progress = overrides.pop("progress", True)
    use_kernels = overrides.pop("use_kernels", True)
    engine_kw = {"overlap": overrides.pop("overlap", None)}
    path = Path(plan_or_gguf_path) if plan_or_gguf_path is not None else None
    if path is None:
        path = DEMO_PLAN if DEMO_PLAN.exists() else DEMO_MODEL

    if path.suffix in (".yaml", ".yml"):
        plan = load_plan(path, overrides)
    else:
        plan = load_plan(None, {**overrides, "model": str(path)})
    return engine_from_plan(plan, progress=progress, use_kernels=use_kernels, **engine_kw)


def engine_from_plan(plan, *, progress=True, use_kernels=True, overlap=None, kv_slots=None) -> Engine:
    if plan.model_path is None:
        raise NextnError(f"{plan.source}: no model given (set `model:` in the plan or pass a .gguf path)")
    f = GGUFFile(plan.model_path)
    cfg = read_config(f)
    resolved = resolve(plan, f, cfg)
    threads = None if plan.threads in (None, "auto") else int(plan.threads)
    return Engine(f, side_of=resolved.side_of, gpu=plan.gpu, gpu_dtype=plan.gpu_dtype, kv_cache=plan.kv_cache,
                  threads=threads, repack=plan.repack, context=plan.context, use_kernels=use_kernels, sampling=plan.sampling,
                  speculative=plan.speculative,
                  progress=progress, plan=plan, placement=resolved, overlap=overlap, kv_slots=kv_slots)
