"""`nextn tune`: measure candidate placements on this machine and write the best one as a plan.

    nextn tune [MODEL.gguf] [--gpu-mem SIZE] [--ram SIZE] [--context N] [--threads N|auto]
               [--time-budget SECONDS] [--tokens N] -o PLAN.yaml

1. The machine: GPU free memory (torch.cuda; without CUDA the gpu side is the CPU), RAM
   (MemAvailable), physical cores, read bandwidth of the CPU expert threads (1..cores), the gpu
   side's matrix-vector bandwidth per dtype, its float32 matmul rate.
2. Candidates: which routed-expert blocks go to the gpu side (llama.cpp --n-cpu-moe N, from all on
   the CPU, MTP layer's included, down to all on the gpu side), the gpu dtype, CPU threads; each
   measured with MTP off and with MTP at draft bounds 1..3. Plus the shipped configs/ plans that
   apply to the model. `placement.estimate_memory` sizes each one for the context; a plan that does
   not fit --gpu-mem / --ram is rejected with the reason. Without CUDA, a placement whose float32
   KV cache does not fit --ram is tried with the F16 cache (`kv_cache: float16`, half the KV bytes).
3. A cost model predicts decode tok/s (bytes read per token / bandwidth per side + a per-layer
   overhead, calibrated by each measurement), prefill tok/s (flops / rate + weight bytes /
   bandwidth) and the MTP speedup (expected tokens per step / cost of draft + verify, a verify batch
   reading the union of its tokens' experts). Candidates predicted at under a third of the best are
   pruned.
4. Survivors are measured with short real runs (runtime.load + generate on a fixed prompt), best
   predicted first, then the shipped configs, then the rest, until the time budget (load time
   included) would be exceeded. The fastest measured plan is written as a commented YAML plan and a
   ranked table is printed. Ctrl-C writes the best plan found so far.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import NextnError
from runtime.loader import mem_available
from runtime.trace import write_atomic

from .memory import GPU_RESERVE_BYTES, estimate_memory, fmt_bytes
from .schema import PlanError, load_plan

PROMPT = ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
          "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\nclass Stack:\n    def __init__(self):\n")
PROMPT_TOKENS = 48
DRAFTS = (1, 2, 3)
PRUNE_RATIO = 1 / 3  # candidates predicted slower than this fraction of the best are not measured
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str, what: str = "size") -> int:
    """'24G', '24GB', '24GiB', '512M', '1.5g', '1048576' -> bytes (binary units, as llama.cpp and
    nvidia-smi count GPU memory)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise NextnError(f"{what} {text!r}: cannot parse a memory size (examples: 24G, 24GB, 24GiB, 512M, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class _Deadline(Exception):
    """The time budget ran out inside a load or a measurement run (which is then discarded)."""


@contextmanager
def deadline(seconds: float):
    """Raise _Deadline in the main thread after `seconds` (SIGALRM); a no-op elsewhere."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):
        raise _Deadline()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------------------- machine

@dataclass
class Machine:
    gpu_device: str  # torch device of the gpu side ("cpu" without CUDA)
    gpu_name: str
    gpu_free: int | None  # bytes free on the GPU (None: no GPU)
    ram: int  # MemAvailable
    cores: int  # physical
    cpu_bw: dict[int, float] = field(default_factory=dict)  # threads -> bytes/s (CPU expert threads)
    gpu_bw: dict[str, float] = field(default_factory=dict)  # dtype -> bytes/s of a matrix-vector product
    # the same on the CPU, for candidates whose "gpu side" is the CPU (gpu: cpu) on a CUDA machine
    host_bw: dict[str, float] = field(default_factory=dict)
    flops: float = 1e10  # gpu-side float matmul rate
    seconds: float = 0.0

    def matvec_bw(self, device: str, dtype: str) -> float:
        """bytes/s of the gpu side's matrix-vector products for a plan whose gpu side is `device`."""
        bw = self.gpu_bw if device.startswith("cuda") else self.host_bw
        return bw.get(dtype) or min(bw.values())

    def describe(self) -> str:
        bw = ", ".join(f"{t} thr {b / 1e9:.1f} GB/s" for t, b in sorted(self.cpu_bw.items()))
        g = ", ".join(f"{d} {b / 1e9:.1f} GB/s" for d, b in self.gpu_bw.items())
        gpu = (f"GPU {self.gpu_name}, {fmt_bytes(self.gpu_free)} free" if self.gpu_free is not None
               else "no GPU (the gpu side runs on the CPU)")
        return (f"{gpu}; RAM available {fmt_bytes(self.ram)}; {self.cores} physical cores; CPU read bandwidth "
                f"{bw}; gpu-side matvec {g}; matmul {self.flops / 1e9:.0f} GFLOP/s")



def physical_cores() -> int:
    try:
        pairs = set()
        phys = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                core = line.split(":")[1].strip()
            elif not line.strip() and core is not None:
                pairs.add((phys, core))
                phys = core = None
        if core is not None:
            pairs.add((phys, core))
        n = len(pairs)
    except OSError:
        n = 0
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n or avail, avail))


def read_machine(thread_options: list[int]) -> Machine:
    import torch

    t0 = time.perf_counter()
    dev = "cuda:0" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(0)
        name = torch.cuda.get_device_name(0)
    else:
        free, name = None, "none"
    m = Machine(dev, name, free, mem_available(), physical_cores())
    try:
        import cpu_kernels

        for t in thread_options:
            m.cpu_bw[t] = cpu_kernels.read_bandwidth(nbytes=1 << 27, threads=t, repeats=3) * 1e9
    except Exception:  # no kernels: numpy sum as the CPU read bandwidth
        import numpy as np

        a = np.ones(1 << 24)
        best = min(_timed(lambda: a.sum()) for _ in range(3))
        for t in thread_options:
            m.cpu_bw[t] = a.nbytes / best
    on_cuda = dev.startswith("cuda")
    for d in ("bfloat16", "float16") if on_cuda else ("float32", "bfloat16"):
        m.gpu_bw[d] = _matvec_bw(dev, d)
    m.host_bw = {d: _matvec_bw("cpu", d) for d in ("float32", "bfloat16")} if on_cuda else m.gpu_bw
    a = torch.ones(256, 1024, dtype=torch.float32, device=dev)
    b = torch.ones(1024, 1024, dtype=torch.float32, device=dev)
    _sync(dev, a @ b)
    best = min(_timed(lambda: _sync(dev, a @ b)) for _ in range(3))
    m.flops = 2 * 256 * 1024 * 1024 / best
    m.seconds = time.perf_counter() - t0
    return m


def _matvec_bw(dev: str, dtype: str) -> float:
    import torch

    w = torch.ones(8192, 4096, dtype=getattr(torch, dtype), device=dev)  # 128 MiB f32: past the caches
    x = torch.ones(4096, dtype=w.dtype, device=dev)
    _sync(dev, w @ x)
    best = min(_timed(lambda: _sync(dev, w @ x)) for _ in range(5))
    return w.numel() * w.element_size() / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _sync(dev, x):
    if str(dev).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return x


# --------------------------------------------------------------------------------------- candidates

@dataclass
class Candidate:
    label: str
    plan: object  # placement.Plan
    kind: str  # "tuned" | "shipped"
    threads: int
    n_cpu: int | None = None
    source: Path | None = None  # the shipped config file
    est: object = None  # MemoryEstimate
    placement: object = None
    reject: str | None = None
    load_key: tuple = ()
    # predictions
    p_prefill: float = 0.0
    p_decode: float = 0.0
    p_mtp: float = 1.0  # predicted speedup of the best draft bound
    bytes_token: dict = field(default_factory=dict)
    # measurements
    m_prefill: float | None = None
    m_decode: float | None = None
    m_mtp: dict = field(default_factory=dict)  # draft bound -> decode tok/s
    m_accept: dict = field(default_factory=dict)
    m_mtp_shared: dict = field(default_factory=dict)  # draft -> speedup measured with another thread count
    p_at_measure: float | None = None  # the prediction when it was measured (after calibration)
    loaded: dict | None = None  # engine.load_report.bytes_by_side
    load_s: float | None = None

    @property
    def measured(self) -> bool:
        return self.m_decode is not None

    @property
    def best(self) -> tuple[float, int]:
        """(decode tok/s, draft bound; 0 = MTP off) of the fastest measured setting."""
        best = (self.m_decode or 0.0, 0)
        mtp = dict(self.m_mtp) or {k: r * (self.m_decode or 0.0) for k, r in self.m_mtp_shared.items()}
        for k, v in mtp.items():
            if v > best[0]:
                best = (v, k)
        return best


class CostModel:
    """Predicted speeds from bytes per token and the machine's measured rates, with a per-layer
    overhead and an acceptance estimate that each measurement recalibrates."""

    def __init__(self, machine: Machine, cfg):
        self.m, self.cfg = machine, cfg
        self.overhead = 3e-3  # seconds per layer per forward pass (Python + op launch), calibrated
        self.prefill_scale = 1.0
        self.accept = [0.6, 0.5, 0.4]  # per draft position, updated from measurements

    def split_bytes(self, c: Candidate) -> dict:
        """Bytes each side reads per decoded token: main model and MTP layer separately."""
        cfg, est, pl = self.cfg, c.est, c.placement
        frac = min(cfg.n_experts_used, cfg.n_experts) / max(cfg.n_experts, 1)
        out = {"main": {"gpu": 0.0, "cpu": 0.0}, "mtp": {"gpu": 0.0, "cpu": 0.0},
               "experts": {"gpu": 0.0, "cpu": 0.0}, "mtp_experts": {"gpu": 0.0, "cpu": 0.0}}
        L = cfg.n_layers
        for name, b in est.tensor_bytes.items():
            side = pl.tensors[name]
            if side == "none" or not b:
                continue
            in_mtp = name.startswith(f"blk.{L}.") if cfg.n_nextn else False
            if name == "token_embd.weight" or name.endswith("embed_tokens.weight"):
                b = b / max(cfg.n_vocab, 1)
            if "_exps." in name:
                out["mtp_experts" if in_mtp else "experts"][side] += b * frac
                b = b * frac
            out["mtp" if in_mtp else "main"][side] += b
        if cfg.n_nextn:  # the MTP layer reads the head it shares with the main model
            head = "output.weight" if "output.weight" in est.tensor_bytes else "token_embd.weight"
            out["mtp"][pl.tensors[head]] += est.tensor_bytes[head]
        return out

    def _time(self, by_side: dict, c: Candidate, layers: int) -> float:
        return (by_side["cpu"] / self.m.cpu_bw[c.threads] + by_side["gpu"] / self.m.matvec_bw(c.est.gpu_device, c.est.gpu_dtype)
                + self.overhead * layers)

    def decode(self, c: Candidate) -> float:
        b = self.split_bytes(c)
        c.bytes_token = {s: b["main"][s] for s in ("gpu", "cpu")}
        return 1.0 / self._time(b["main"], c, self.cfg.n_layers)

    def mtp_speed(self, c: Candidate, k: int) -> float:
        cfg = self.cfg
        b = self.split_bytes(c)
        draft = self._time(b["mtp"], c, 1)
        E, K = cfg.n_experts, cfg.n_experts_used
        distinct = E * (1 - (1 - K / E) ** (k + 1)) / K  # experts read by a k+1 batch vs one token
        verify = {s: b["main"][s] + b["experts"][s] * (distinct - 1) for s in ("gpu", "cpu")}
        t_verify = self._time(verify, c, cfg.n_layers) * (1 + 0.1 * k)
        tokens = 1 + sum(math.prod(self.accept[:i + 1]) for i in range(k))
        return tokens / (k * draft + t_verify)

    def prefill(self, c: Candidate, n_tokens: int = PROMPT_TOKENS) -> float:
        b = self.split_bytes(c)["main"]
        bytes_w = sum(c.est.tensor_bytes.values())
        active = (b["gpu"] + b["cpu"]) / 2  # ~elements per token (bytes -> a rough element count)
        t = n_tokens * 2 * active / self.m.flops + bytes_w / max(self.m.cpu_bw.values()) \
            + self.overhead * self.cfg.n_layers
        return n_tokens / t * self.prefill_scale

    def predict(self, c: Candidate, has_mtp: bool) -> None:
        c.p_decode = self.decode(c)
        c.p_prefill = self.prefill(c)
        c.p_mtp = max([self.mtp_speed(c, k) / c.p_decode for k in DRAFTS]) if has_mtp else 1.0

    def calibrate(self, c: Candidate) -> None:
        b = self.split_bytes(c)["main"]
        bytes_t = b["cpu"] / self.m.cpu_bw[c.threads] + b["gpu"] / self.m.matvec_bw(c.est.gpu_device, c.est.gpu_dtype)
        if c.m_decode:
            self.overhead = max(0.0, (1.0 / c.m_decode - bytes_t) / max(self.cfg.n_layers, 1))
        if c.m_prefill:
            self.prefill_scale *= c.m_prefill / max(self.prefill(c), 1e-9)
        acc = c.m_accept.get(max(c.m_accept)) if c.m_accept else None
        if acc:
            for i, a in enumerate(acc[:len(self.accept)]):
                self.accept[i] = max(0.0, min(1.0, a))


# --------------------------------------------------------------------------------------- the tuner

class Tuner:
    def __init__(self, model: Path, out: Path, *, gpu_mem: int | None, ram: int | None, context: int | None,
                 threads: str, budget: float, tokens: int, machine: Machine | None = None, log=None,
                 t_start: float | None = None):
        from runtime.config import read_config
        from runtime.gguf_file import GGUFFile

        self.t0 = t_start if t_start is not None else time.perf_counter()
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.model, self.out, self.budget, self.tokens = model, out, budget, tokens
        self.file = GGUFFile(model)
        self.cfg = read_config(self.file)
        self.context = context
        cores = physical_cores()
        if threads in (None, "auto"):
            self.thread_options = sorted({cores, max(1, cores // 2)}, reverse=True)
        else:
            try:
                n = int(threads)
                if n < 1:
                    raise ValueError
            except ValueError:
                raise NextnError(f"--threads {threads!r}: expected a positive integer or auto") from None
            self.thread_options = [n]
        self.log(f"tune: {model.name}: {self.cfg.n_layers} layers + {self.cfg.n_nextn} nextn, hidden "
                 f"{self.cfg.hidden}, {self.cfg.n_experts} experts x {self.cfg.expert_ffn}; budget {budget:.0f} s")
        self.machine = machine or read_machine(self.thread_options)
        self.log(f"machine: {self.machine.describe()}")
        m = self.machine
        self.cuda = m.gpu_device.startswith("cuda")
        self.gpu_limit = gpu_mem if gpu_mem is not None else (m.gpu_free if self.cuda else None)
        self.ram_limit = ram if ram is not None else m.ram
        self.cost = CostModel(m, self.cfg)
        self.candidates: list[Candidate] = []
        self.engine = None
        self.engine_key = None
        self.load_rate = 1e8  # loaded bytes per second (first guess; the first load measures it)
        self.load_const = 0.5
        self.gen_s: dict = {}  # (load key, threads) -> seconds of one plain generate
        self.mtp_s: dict = {}  # (load key, threads) -> (seconds, draft bound) of the last MTP run
        self.interrupted = False
        self.stopped_for_budget = False

    # ---- time
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    # ---- candidates
    def _make(self, label, plan, kind, threads, n_cpu=None, source=None) -> Candidate:
        from .resolve import resolve

        c = Candidate(label, plan, kind, threads, n_cpu=n_cpu, source=source)
        try:
            c.placement = resolve(plan, self.file, self.cfg)
        except PlanError as e:
            c.reject = f"invalid for this model: {e}"
            return c
        c.est = estimate_memory(c.placement, self.file, self.cfg, plan)
        gpu_side = frozenset(n for n, s in c.placement.tensors.items() if s == "gpu")
        c.load_key = (gpu_side, c.est.gpu_dtype, c.est.kv_dtype, c.est.context, plan.gpu)
        c.reject = self.memory_reject(c.est)
        return c

    def memory_reject(self, est) -> str | None:
        on_cuda = est.gpu_device.startswith("cuda")
        gpu_need = est.gpu_bytes + (GPU_RESERVE_BYTES if on_cuda and est.gpu_bytes else 0)
        if self.gpu_limit is not None and gpu_need > self.gpu_limit:
            return f"gpu side needs {fmt_bytes(gpu_need)} > {fmt_bytes(self.gpu_limit)}"
        ram_need = est.cpu_bytes + (0 if on_cuda else est.gpu_bytes)
        if ram_need > self.ram_limit:
            return f"RAM needs {fmt_bytes(ram_need)} > {fmt_bytes(self.ram_limit)}"
        return None

    def enumerate(self) -> None:
        cfg = self.cfg
        ctx = {"context": self.context} if self.context else {}
        dtypes = ("bfloat16", "float16") if self.cuda else ("float32", "bfloat16")
        n_cpus = [cfg.n_blocks] + list(range(cfg.n_layers, cfg.n_dense - 1, -1))
        seen = set()
        for dtype in dtypes:
            for n in n_cpus:
                keys = {"model": str(self.model), "n_cpu_moe": n, "gpu_dtype": dtype, **ctx}
                plan = load_plan(None, keys)
                base = self._make("", plan, "tuned", self.thread_options[0], n_cpu=n)
                if not self.cuda and base.reject and base.reject.startswith("RAM needs"):
                    # CPU attention: an F16 KV cache (half the KV memory) where the float32 one
                    # does not fit; on CUDA the cache takes gpu_dtype, which the dtypes cover
                    plan16 = load_plan(None, {**keys, "kv_cache": "float16"})
                    alt = self._make("", plan16, "tuned", self.thread_options[0], n_cpu=n)
                    if alt.reject is None:
                        plan, base = plan16, alt
                if base.load_key in seen:
                    continue
                seen.add(base.load_key)
                for t in self.thread_options:
                    c = base if t == self.thread_options[0] else self._make("", plan, "tuned", t, n_cpu=n)
                    moved = sum(1 for i in range(cfg.n_dense, cfg.n_blocks)
                                if c.placement and c.placement.tensors.get(f"blk.{i}.ffn_gate_exps.weight") == "gpu")
                    kv = ", kv f16" if plan.kv_cache == "float16" else ""
                    c.label = f"n_cpu_moe {n} ({moved} expert layers on gpu), {dtype}{kv}, {t} thr"
                    self.candidates.append(c)
        for path in self.shipped_configs():
            for t in self.thread_options[:1]:
                try:
                    plan = load_plan(path, {"model": str(self.model), **ctx})
                except PlanError as e:
                    c = Candidate(f"configs/{path.name}", None, "shipped", t, source=path, reject=str(e))
                    self.candidates.append(c)
                    continue
                c = self._make(f"configs/{path.name}", plan, "shipped", t, source=path)
                if plan.threads not in (None, "auto"):
                    c.threads = int(plan.threads)
                    if c.threads not in self.machine.cpu_bw:
                        self.machine.cpu_bw[c.threads] = self.machine.cpu_bw[max(self.machine.cpu_bw)]
                self.candidates.append(c)
        has_mtp = cfg.n_nextn > 0
        for c in self.candidates:
            if c.est is not None:
                self.cost.predict(c, has_mtp)
        ok = [c for c in self.candidates if c.reject is None and c.kind == "tuned"]
        if ok:
            top = max(c.p_decode * max(c.p_mtp, 1.0) for c in ok)
            for c in ok:
                if c.p_decode * max(c.p_mtp, 1.0) < PRUNE_RATIO * top:
                    c.reject = f"pruned: predicted {c.p_decode * max(c.p_mtp, 1):.2f} tok/s < 1/3 of the best"

    def shipped_configs(self) -> list[Path]:
        """The configs/ plans that apply to this model: cpu-only always; the GLM-4.5-Air / GLM-4.7
        plans when the model has their shapes; demo.yaml for models of neither real shape."""
        from .synthetic import GLM_SHAPES

        cfg = self.cfg
        key = lambda s: (s.hidden, s.n_experts, s.expert_ffn, s.n_heads)  # noqa: E731
        prefix = None
        for name, s in GLM_SHAPES.items():
            if key(s) == key(cfg):
                prefix = "glm45-air" if name == "glm45-air" else "glm47"
        out = []
        for p in sorted(CONFIGS.glob("*.yaml")):
            if p.name == "cpu-only.yaml" or (prefix and p.name.startswith(prefix + "-")) or \
                    (prefix is None and p.name == "demo.yaml"):
                out.append(p)
        return out

    # ---- measuring
    def order(self) -> list[list[Candidate]]:
        """Measurement jobs (one load each, the candidates sharing it), in the order to run them:
        the best predicted tuned plan, the shipped configs, then the rest by prediction."""
        live = [c for c in self.candidates if c.reject is None and c.est is not None]
        score = lambda c: c.p_decode * max(c.p_mtp, 1.0)  # noqa: E731
        tuned = sorted((c for c in live if c.kind == "tuned"), key=score, reverse=True)
        shipped = [c for c in live if c.kind == "shipped"]
        seq = tuned[:1] + shipped + tuned[1:]
        jobs: dict = {}
        for c in seq:
            jobs.setdefault(c.load_key, []).append(c)
        for k in jobs:
            jobs[k].sort(key=lambda c: (c.kind != "tuned", -score(c)))
        return list(jobs.values())

    @staticmethod
    def dequant_bytes(c: Candidate) -> int:
        """Bytes the loader dequantizes (everything but the cpu-side routed experts, which stay
        views of the memory map)."""
        return sum(b for n, b in c.est.tensor_bytes.items()
                   if not ("_exps." in n and c.placement.tensors[n] == "cpu"))

    def est_load(self, c: Candidate) -> float:
        return self.load_const + self.dequant_bytes(c) / self.load_rate

    def est_gen(self, c: Candidate, mtp_k: int = 0) -> float:
        """Seconds of one measurement run: from this load's earlier runs when there are any, else
        from the (calibrated) prediction, with a warm-up run on top."""
        key = (c.load_key, c.threads)
        if mtp_k and key in self.mtp_s:
            secs, k = self.mtp_s[key]
            return secs * (mtp_k + 1) / (k + 1)
        if key in self.gen_s:
            return self.gen_s[key] * (3.0 if mtp_k else 1.0)
        pre = PROMPT_TOKENS / max(c.p_prefill, 1e-6)
        dec = self.tokens / max(c.p_decode, 1e-6)
        return (pre + dec) * (1.2 + (2.0 if mtp_k else 0.0)) + 0.05

    def fits(self, seconds: float) -> bool:
        return self.elapsed() + seconds <= self.budget

    def prompt_ids(self, eng) -> list[int]:
        ids = eng.tokenize(PROMPT)
        while len(ids) < PROMPT_TOKENS:
            ids = ids + ids
        return ids[:PROMPT_TOKENS]

    def close_engine(self) -> None:
        eng, self.engine, self.engine_key = self.engine, None, None
        if eng is not None:
            eng.close()  # frees its weights and memory maps now, not at a later garbage collection

    def load(self, c: Candidate):
        from runtime.api import engine_from_plan

        if self.engine_key == c.load_key and self.engine is not None:
            return self.engine, 0.0
        self.close_engine()  # the previous candidate's memory goes before the next one loads
        t = time.perf_counter()
        self.engine = engine_from_plan(c.plan, progress=False)
        dt = time.perf_counter() - t
        est_before = self.est_load(c)
        self.load_const = min(self.load_const, dt + 0.05)
        if dt > 0.2:
            self.load_rate = max(1e6, self.dequant_bytes(c) / max(dt - self.load_const, 1e-3))
        self.log(f"  loaded in {dt:.1f} s (estimated {est_before:.1f} s): gpu side "
                 f"{fmt_bytes(self.engine.load_report.bytes_by_side['gpu'])}, cpu side "
                 f"{fmt_bytes(self.engine.load_report.bytes_by_side['cpu'])}")
        self.engine_key = c.load_key
        return self.engine, dt

    def _gen(self, eng, ids, c, **kw):
        r = eng.generate(ids, max_tokens=self.tokens, temperature=0.0, **kw)
        return r.stats

    def measure_job(self, job: list[Candidate]) -> None:
        """One load; plain decoding for every threads variant sharing it, then MTP at draft bounds
        1..3 with the fastest variant (a longer bound only while the previous one's last position was
        accepted at least half the time)."""
        import cpu_kernels

        lead = job[0]
        for c in job:
            self.cost.predict(c, self.cfg.n_nextn > 0)  # with the calibration so far
        need = self.est_load(lead) + self.est_gen(lead)
        if not self.fits(need):
            self.stopped_for_budget = True
            self.log(f"  skip {lead.label}: needs ~{need:.1f} s, {max(self.left(), 0):.1f} s left")
            return
        self.log(f"[{self.elapsed():5.1f}s] measuring {lead.label}" + (f" (+{len(job) - 1} sharing its load)"
                                                                      if len(job) > 1 else ""))
        eng, load_s = self.load(lead)
        ids = self.prompt_ids(eng)
        done = []
        for c in job:
            c.loaded = dict(eng.load_report.bytes_by_side)
            c.load_s = load_s
            self.cost.predict(c, eng.has_mtp)
            c.p_at_measure = c.p_decode
            if not self.fits(self.est_gen(c)):
                self.stopped_for_budget = True
                continue
            cpu_kernels.set_threads(c.threads)
            key = (c.load_key, c.threads)
            if key not in self.gen_s:  # warm-up (first call with this engine and thread count)
                eng.generate(ids[:8], max_tokens=2, mtp=False)
            t = time.perf_counter()
            s = self._gen(eng, ids, c, mtp=False)
            self.gen_s[key] = time.perf_counter() - t
            c.m_prefill, c.m_decode = s["prompt_tokens_per_s"], s["decode_tokens_per_s"]
            self.log(f"  {c.label}: prefill {c.m_prefill:.1f} tok/s, decode {c.m_decode:.2f} tok/s "
                     f"(predicted {c.p_prefill:.1f} / {c.p_decode:.2f})")
            self.cost.calibrate(c)
            done.append(c)
        if not done or not eng.has_mtp:
            return
        # MTP with the fastest thread count of this load; the others share its measured speedup
        c = max(done, key=lambda x: x.m_decode)
        cpu_kernels.set_threads(c.threads)
        for k in DRAFTS:
            if not self.fits(self.est_gen(c, k)):
                self.stopped_for_budget = True
                break
            t = time.perf_counter()
            s = self._gen(eng, ids, c, mtp=True, draft_max=k)
            self.mtp_s[(c.load_key, c.threads)] = (time.perf_counter() - t, k)
            c.m_mtp[k] = s["decode_tokens_per_s"]
            acc = list(s.get("acceptance_by_position") or [])
            c.m_accept[k] = acc
            self.log(f"    MTP draft_max {k}: {c.m_mtp[k]:.2f} tok/s ({c.m_mtp[k] / c.m_decode:.2f}x), acceptance "
                     + (f"{s['acceptance_rate']:.0%}" if s["acceptance_rate"] is not None else "- (no drafts)"))
            if not acc or acc[-1] < 0.5:
                break
        self.cost.calibrate(c)
        for x in done:
            if x is not c:
                x.m_mtp_shared = {k: v / c.m_decode for k, v in c.m_mtp.items()}

    def run(self) -> int:
        self.enumerate()
        jobs = self.order()
        if not jobs:
            reasons = "; ".join(sorted({c.reject for c in self.candidates if c.reject}))[:300]
            raise NextnError(f"{self.model}: no candidate plan fits ({reasons})")
        first = jobs[0][0]
        need = self.est_load(first) + self.est_gen(first)
        if self.elapsed() + need > self.budget:
            raise NextnError(f"--time-budget {self.budget:g}s is too small to measure anything: after "
                             f"{self.elapsed():.1f} s of setup, one load and run of {first.label} needs about "
                             f"{need:.1f} s more")
        reserve = min(1.0, 0.03 * self.budget)  # writing the plan and the table
        try:
            for job in jobs:
                if self.left() - reserve <= 0:
                    self.stopped_for_budget = True
                    break
                try:
                    with deadline(self.left() - reserve):
                        self.measure_job(job)
                except _Deadline:
                    self.stopped_for_budget = True
                    self.log(f"[{self.elapsed():5.1f}s] time budget reached: the run in progress is discarded")
                    break
        except KeyboardInterrupt:
            self.interrupted = True
            self.log("interrupted: writing the best plan measured so far")
        finally:
            self.close_engine()
        best = self.winner()
        if best is None:
            raise NextnError("no candidate could be measured within the time budget")
        self.write_plan(best)
        print(self.table(best))
        self.log(f"wrote {self.out} in {self.elapsed():.1f} s (budget {self.budget:g} s)")
        return 130 if self.interrupted else 0

    def winner(self) -> Candidate | None:
        measured = [c for c in self.candidates if c.measured]
        if measured:
            return max(measured, key=lambda c: c.best[0])
        live = [c for c in self.candidates if c.reject is None and c.est is not None]
        return max(live, key=lambda c: c.p_decode * max(c.p_mtp, 1.0)) if live else None

    # ---- output
    def plan_yaml(self, c: Candidate) -> str:
        from .synthetic import GLM_SHAPES  # noqa: F401  (keeps import order the same as the CLI)

        speed, k = c.best
        p = c.plan
        g = p.groups
        m = self.machine
        try:
            model = os.path.relpath(self.model.resolve(), self.out.resolve().parent)
        except ValueError:
            model = str(self.model.resolve())
        lines = [
            f"# Written by `nextn tune` ({time.strftime('%Y-%m-%d %H:%M')}) for {self.model.name}",
            f"# Machine: {m.describe()}",
            f"# Chosen: {c.label}" + (f" (settings of {c.source.name})" if c.source else ""),
        ]
        if c.measured:
            mtp = f"MTP draft_max {k}: {speed:.2f} tok/s, {speed / c.m_decode:.2f}x plain" if k else "MTP off"
            lines.append(f"# Measured: prefill {c.m_prefill:.1f} tok/s, decode {c.m_decode:.2f} tok/s without MTP; "
                         f"{mtp}")
        else:
            lines.append("# Not measured (interrupted or out of time): chosen by the cost model's prediction")
        lines.append(f"# Memory: gpu side {fmt_bytes(c.est.gpu_bytes)} (weights {fmt_bytes(c.est.gpu_weight_bytes)} + "
                     f"KV {fmt_bytes(c.est.gpu_kv_bytes)}), cpu side {fmt_bytes(c.est.cpu_bytes)} (routed experts "
                     f"in GGUF form, read from the memory map)")
        others = [x for x in self.candidates if x.kind == "shipped" and x.measured]
        for x in others:
            lines.append(f"#   shipped {x.label}: {x.best[0]:.2f} tok/s")
        lines.append("# Re-run `nextn tune` after changing hardware, context or model.")

        def side_or_group(lg):
            if lg.n_cpu is not None:
                return f"{{n_cpu: {lg.n_cpu}}}"
            if lg.ranges:
                rng = ", ".join(f"{r.first}-{r.last}: {r.side}" for r in lg.ranges)
                return f"{{default: {lg.default}, layers: {{{rng}}}}}"
            return lg.default

        mtp_group = g.mtp.side if g.mtp.routed_experts is None else \
            f"{{device: {g.mtp.side}, routed_experts: {g.mtp.routed_experts}}}"
        lines += [
            f"description: tuned by nextn tune ({c.label})",
            f"model: {model}",
            f"gpu: {p.gpu}",
            f"threads: {c.threads}",
            f"gpu_dtype: {c.est.gpu_dtype}",
            *([f"kv_cache: {p.kv_cache}"] if p.kv_cache != "auto" else []),
            f"context: {c.est.context}",
            "placement:",
            f"  token_embd: {g.token_embd}",
            f"  output: {g.output}",
            f"  attention: {side_or_group(g.attention)}",
            f"  dense_ffn: {side_or_group(g.dense_ffn)}",
            f"  shared_experts: {side_or_group(g.shared_experts)}",
            f"  routed_experts: {side_or_group(g.routed_experts)}" +
            (f"    # like --n-cpu-moe {g.routed_experts.n_cpu}" if g.routed_experts.n_cpu is not None else ""),
            f"  mtp: {mtp_group}",
        ]
        if p.overrides:
            lines.append("overrides:")
            for o in p.overrides:
                lines.append(f"  - {{pattern: '{o.pattern}', device: {o.side}}}")
        mtp_on = "true" if k else "false"
        if not self.cfg.n_nextn:
            mtp_on = "false"
        lines += ["speculative:", f"  mtp: {mtp_on}", f"  draft_max: {k or 1}", f"  p_min: {p.speculative.p_min}",
                  f"  adaptive: {'true' if p.speculative.adaptive else 'false'}"]
        return "\n".join(lines) + "\n"

    def write_plan(self, c: Candidate) -> None:
        text = self.plan_yaml(c)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out, text, "plan")  # an interrupt leaves the old plan or none, never half
        load_plan(self.out)  # the written plan must validate

    def table(self, best: Candidate) -> str:
        def f(v, fmt="{:.2f}"):
            return "-" if v is None else fmt.format(v)

        rows = []
        measured = sorted((c for c in self.candidates if c.measured), key=lambda c: -c.best[0])
        unmeasured = sorted((c for c in self.candidates if not c.measured and c.reject is None and c.est is not None),
                            key=lambda c: -c.p_decode * max(c.p_mtp, 1))
        rejected = [c for c in self.candidates if c.reject is not None]
        for c in unmeasured:  # with the final calibration
            self.cost.predict(c, self.cfg.n_nextn > 0)
        unmeasured.sort(key=lambda c: -c.p_decode * max(c.p_mtp, 1))
        for rank, c in enumerate(measured, 1):
            sp, k = c.best
            mtp = f"{max(c.m_mtp.values()) / c.m_decode:.2f}x (k={max(c.m_mtp, key=c.m_mtp.get)})" if c.m_mtp else "-"
            rows.append([f"{rank}{'*' if c is best else ''}", c.label, fmt_bytes(c.est.gpu_bytes), fmt_bytes(c.est.cpu_bytes),
                         fmt_bytes(c.loaded["gpu"]) + " / " + fmt_bytes(c.loaded["cpu"]),
                         f(c.p_prefill, "{:.1f}") + " / " + f(c.m_prefill, "{:.1f}"),
                         f(c.p_at_measure) + " / " + f(c.m_decode), f"{c.p_mtp:.2f}x / {mtp}",
                         f"{sp:.2f}" + (f" (MTP k={k})" if k else " (no MTP)"), ""])
        for c in unmeasured[:6]:
            rows.append(["-", c.label, fmt_bytes(c.est.gpu_bytes), fmt_bytes(c.est.cpu_bytes), "-",
                         f(c.p_prefill, "{:.1f}") + " / -", f(c.p_decode) + " / -", f"{c.p_mtp:.2f}x / -", "-",
                         "not measured: time budget"])
        if len(unmeasured) > 6:
            rows.append(["-", f"... {len(unmeasured) - 6} more", "", "", "", "", "", "", "", "not measured: time budget"])
        shown = 0
        for c in rejected:
            if c.kind == "tuned" and shown >= 8:
                continue
            shown += c.kind == "tuned"
            rows.append(["x", c.label, fmt_bytes(c.est.gpu_bytes) if c.est else "-",
                         fmt_bytes(c.est.cpu_bytes) if c.est else "-", "-",
                         f(c.p_prefill, "{:.1f}") + " / -" if c.est else "-",
                         f(c.p_decode) + " / -" if c.est else "-", "-", "-", c.reject])
        n_rej_hidden = sum(1 for c in rejected if c.kind == "tuned") - shown
        if n_rej_hidden > 0:
            rows.append(["x", f"... {n_rej_hidden} more rejected", "", "", "", "", "", "", "", "memory / cost model"])
        head = ["#", "plan", "gpu mem", "cpu mem", "loaded gpu / cpu", "prefill pred / meas",
                "decode pred / meas", "MTP speedup pred / meas", "best tok/s", "why rejected"]
        w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
        out = [f"model: {self.model}   context {best.est.context}   tokens per run: prompt {PROMPT_TOKENS}, "
               f"decode {self.tokens}   elapsed {self.elapsed():.1f} s of {self.budget:g} s"
               + ("   (interrupted)" if self.interrupted else ""),
               "  ".join(h.ljust(x) for h, x in zip(head, w)), "  ".join("-" * x for x in w)]
        out += ["  ".join(str(v).ljust(x) for v, x in zip(r, w)).rstrip() for r in rows]
        out.append(f"* chosen: {best.label} -> {self.out}")
        return "\n".join(out)


# --------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nextn tune", description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL.gguf", help="the model (default: the bundled demo model)")
    p.add_argument("-o", "--output", required=True, metavar="PLAN.yaml", help="where to write the chosen plan")
    p.add_argument("--gpu-mem", help="memory the gpu side may use (24G, 24GiB, 512M, bytes); default: the GPU's free "
                                     "memory, or no separate limit without a GPU")
    p.add_argument("--ram", help="RAM the plan may use (default: MemAvailable)")
    p.add_argument("--context", type=int, help="context length to size the KV cache for (default: the model's, "
                                               "capped at 4096)")
    p.add_argument("--threads", default="auto", help="CPU expert threads: N, or auto to try the physical core count "
                                                    "and half of it")
    p.add_argument("--time-budget", type=float, default=120.0, metavar="SECONDS",
                   help="wall time for the whole run, loads included (default 120)")
    p.add_argument("--tokens", type=int, default=16, help="tokens decoded per measurement (default 16)")
    return p


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    a = build_parser().parse_args(argv)
    from runtime.api import DEMO_MODEL

    model = Path(a.model) if a.model else DEMO_MODEL
    if not model.exists():
        raise NextnError(f"{model}: no such model file" + (" (the bundled demo model is not built)" if not a.model else ""))
    if model.is_dir():
        raise NextnError(f"{model}: is a directory, expected a .gguf model file")
    if model.suffix.lower() in (".yaml", ".yml"):
        raise NextnError(f"{model}: is a plan; nextn tune takes the model file (.gguf)")
    gpu_mem = parse_size(a.gpu_mem, "--gpu-mem") if a.gpu_mem is not None else None
    ram = parse_size(a.ram, "--ram") if a.ram is not None else None
    if ram is not None and ram <= 0:
        raise NextnError(f"--ram {a.ram!r}: must be more than 0")
    if a.time_budget <= 0 or not math.isfinite(a.time_budget):
        raise NextnError(f"--time-budget {a.time_budget:g}: must be a positive number of seconds")
    if a.context is not None and a.context < 2:
        raise NextnError(f"--context {a.context}: must be at least 2")
    if a.tokens < 2:
        raise NextnError(f"--tokens {a.tokens}: must be at least 2")
    with open(model, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise NextnError(f"{model}: not a GGUF model file (no GGUF magic)")
    tuner = Tuner(model, Path(a.output), gpu_mem=gpu_mem, ram=ram, context=a.context, threads=a.threads,
                  budget=a.time_budget, tokens=a.tokens, t_start=t_start)
    return tuner.run()


if __name__ == "__main__":
    sys.exit(main())
