"""The Engine: the public Python API over one loaded model.

    engine = runtime.load("plan.yaml" or "model.gguf", **overrides)
    engine.generate("def fib(n):", max_tokens=64).text

The engine owns the tokenizer, the model (built by `loader.build_model` per the placement) and
the generation loop with its stop conditions and statistics; the decoding algorithm itself
(plain and MTP speculative steps) is in `decode.py`.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from .config import ModelConfig, check_tensors, read_config
from .decode import STEP_END, Sequence, run_alone
from placement.schema import DRAFT_MAX_LIMIT, Sampling, Speculative

from .errors import NextnError, UnsupportedError
from .gguf_file import GGUFFile
from .loader import LoadReport, build_model, default_side_of
from .sampling import SamplingParams
from .draft_policy import DraftPolicy
from .tokenizer import Tokenizer, TokenizerError
from .trace import Timeline

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(gpu: str) -> torch.device:
    if gpu == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if gpu == "cpu":
        return torch.device("cpu")
    if gpu.startswith("cuda"):
        if not torch.cuda.is_available():
            raise NextnError(f"gpu: {gpu} requested but CUDA is not available (use gpu: auto or cpu)")
        dev = torch.device(gpu)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise NextnError(f"gpu: {gpu} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return dev
    raise NextnError(f"unknown gpu device {gpu!r}: expected auto, cpu or cuda:N")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise NextnError(f"unknown gpu_dtype {name!r}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    stats: dict = field(default_factory=dict)
    finish_reason: str = "length"


class Engine:
    def __init__(self, model_path, *, side_of: Callable[[str], str] = default_side_of, gpu: str = "auto",
                 gpu_dtype: str | None = "auto", threads: int | None = None, repack: bool | str = "auto",
                 context: int | None = None,
                 use_kernels: bool = True, sampling: Sampling | None = None,
                 speculative: Speculative | None = None, progress: bool = True,
                 prefill_chunk: int = 512, plan=None, placement=None, overlap: bool | None = None,
                 kv_slots: int | None = None, kv_cache: str = "auto"):
        self.file = model_path if isinstance(model_path, GGUFFile) else GGUFFile(model_path)
        self.cfg: ModelConfig = read_config(self.file)
        check_tensors(self.file, self.cfg)
        try:
            self.tokenizer = Tokenizer.from_metadata(self.file.metadata)
        except TokenizerError as e:
            raise NextnError(f"{self.file.path}: {e}") from None
        self.device = resolve_device(gpu)
        self.dtype = resolve_dtype(gpu_dtype, self.device)
        self._set_torch_threads()
        self.context = min(context or min(self.cfg.context_length, 4096), self.cfg.context_length)
        if self.context < 2:
            raise NextnError(f"context {self.context} is too small")
        self.plan, self.placement = plan, placement
        # generation defaults: the plan's sampling and speculative sections
        self.sampling = sampling or Sampling()
        self.speculative = speculative or Speculative()
        self.prefill_chunk = prefill_chunk
        if threads:
            try:
                import cpu_kernels

                cpu_kernels.set_threads(int(threads))
            except ImportError:
                pass
        self.model, self.load_report = build_model(
            self.file, self.cfg, side_of=side_of, gpu_device=self.device, gpu_dtype=self.dtype,
            use_kernels=use_kernels, threads=None, repack=repack, max_context=self.context, progress=progress)
        # CPU experts beside the shared expert: pays when the GPU side is a real GPU; on a
        # CPU-only machine both sides share the same cores, so it is off unless asked for.
        self.model.overlap = (self.device.type == "cuda") if overlap is None else bool(overlap)
        self._use_fused_blocks()
        self._use_cuda_graphs()
        # the KV pools every sequence takes its pages from (runtime/kvpool.py), allocated once:
        # `kv_slots` positions in all (default: one context), never fewer than one context
        self.kv_slots = max(int(kv_slots or self.context), self.context)
        self.kv_dtype = self._kv_dtype(kv_cache)
        self.pools = self.model.new_pools(self.kv_slots, self.kv_dtype)
        # full pages of finished sequences, shared with later prompts that start with the same
        # tokens (a system prompt, a previous turn); evicted when the pools run short
        from .kvpool import PrefixCache

        self.prefix_cache = PrefixCache(*self.pools)
        self._mtp_notice_given = False
        self.last_result: GenerationResult | None = None
        self.last_batch = None  # the last generate_batch's Batch (its stats: runtime/runner.py BatchStats)
        self._policies: dict = {}

    def _kv_dtype(self, name: str | None) -> torch.dtype:
        """The KV cache's element type. auto: the attention side's dtype (float32 on the CPU,
        gpu_dtype on CUDA). float16 on the CPU: half the KV memory and half the bytes attention
        reads per token (0.6-1.0x its time: the attention is mostly arithmetic; BENCHMARKS.md);
        rows are rounded to float16 once, when written, and attention computes in float32."""
        from placement.schema import check_kv_cache

        key = check_kv_cache("auto" if name is None else name, "kv_cache")
        if key == "auto":
            return self.dtype
        want = DTYPES[key]
        cuda = any(self.model.bus.devices[b.attn.side].type == "cuda" for b in self.model.blocks)
        if cuda and want != self.dtype:
            raise NextnError(f"kv_cache {key}: attention runs on the GPU, where the KV cache takes gpu_dtype "
                             f"({str(self.dtype).replace('torch.', '')}); set gpu_dtype: {key} for a {key} cache there")
        return want

    def _use_fused_blocks(self) -> None:
        """Decode-sized forwards as one C call for all blocks where every unit runs on the CPU
        (runtime/fused.py). NEXTN_FUSED=0 keeps the torch path (for A/B comparisons)."""
        env = os.environ.get("NEXTN_FUSED", "1").strip().lower()
        if env in ("0", "off", "false", "no"):
            self.load_report.fused_blocks = "off (NEXTN_FUSED=0)"
            return
        from .fused import FusedLayers

        self.model.fused, why = FusedLayers.build(self.model)
        self.load_report.fused_blocks = "on" if self.model.fused is not None else f"off: {why}"

    def _use_cuda_graphs(self) -> None:
        """MoE blocks' gpu-side segments as captured CUDA graphs (runtime/graphs.py): opt-in
        with NEXTN_CUDA_GRAPHS=1 until measured on a GPU; only when the gpu side is CUDA."""
        from .graphs import GraphedLayers

        self.model.graphs, why = GraphedLayers.build(self.model)
        self.load_report.cuda_graphs = why

    def _set_torch_threads(self) -> None:
        """When the "gpu" side runs on the CPU, torch's intra-op threads share the cores with the
        expert kernels' OpenMP pool. For small models (hidden <= 1024) their fork/join costs more
        than the matmuls gain (measured on the demo model: 2 threads ran 5x slower than 1 on a
        busy 2-core machine), so use one. NEXTN_TORCH_THREADS=N overrides; with CUDA nothing is
        changed."""
        env = os.environ.get("NEXTN_TORCH_THREADS")
        if env:
            try:
                torch.set_num_threads(max(1, int(env)))
            except ValueError:
                raise NextnError(f"NEXTN_TORCH_THREADS={env!r}: expected a whole number") from None
        elif self.device.type == "cpu" and self.cfg.hidden <= 1024:
            torch.set_num_threads(1)

    # ---- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Free what the engine holds: the model's weights and their memory maps of the GGUF
        file(s), repacked copies, the KV pools and prefix cache, the CPU-expert worker thread and the
        kernels' cache of checked tensors. Idempotent. Afterwards any use of the engine raises
        NextnError. A stream still being read from holds its own references and is not stopped.
        Process-wide pools (OpenMP's and torch's threads) stay: they are shared by every engine and
        made once per process."""
        d = self.__dict__
        if d.get("_closed"):
            return
        model = d.get("model")
        pool = getattr(model, "_executor", None)
        if pool is not None:
            pool.shutdown(wait=True)
            model._executor = None
        f = d.get("file")
        path = f.path if f is not None else "engine"
        # Dropping every reference frees the weights; the memory maps go with the last array that
        # views them (a mmap cannot be closed while numpy arrays over it exist).
        del model, pool, f
        d.clear()
        d["_closed"] = str(path)
        try:
            import cpu_kernels

            cpu_kernels.forget_checked()
        except (ImportError, AttributeError):
            pass
        gc.collect()  # the model's parts refer to each other: free the maps now, not at some later GC

    @property
    def closed(self) -> bool:
        return bool(self.__dict__.get("_closed"))

    def __enter__(self) -> "Engine":
        if self.closed:
            raise NextnError(f"{self.__dict__['_closed']}: the engine is closed")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name: str):
        # Only called for attributes not found normally: after close() every instance attribute
        # is gone, so any use of a closed engine ends here with one clear line.
        closed = self.__dict__.get("_closed")
        if closed:
            raise NextnError(f"{closed}: the engine is closed (Engine.close() was called); load the model again")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ---- basic surface ---------------------------------------------------------------------------

    @property
    def has_mtp(self) -> bool:
        return self.model.nextn is not None

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def _check_ids(self, ids) -> torch.Tensor:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.cfg.n_vocab]
        if bad:
            raise NextnError(f"token id {bad[0]} out of range 0..{self.cfg.n_vocab - 1}")
        if len(ids) > self.context:
            raise NextnError(f"prompt of {len(ids)} tokens is longer than the context ({self.context})")
        return torch.tensor(ids, dtype=torch.long)

    def draft_policy(self, draft_max: int, adaptive: bool, batch: int = 1) -> DraftPolicy:
        """The engine keeps one policy per setting and batch size (1, 2, ... 8, then 9-16, 17-32,
        ...), so what it learned about this machine's costs and this model's acceptance carries
        over between generations, and a sequence decoded in a batch is priced at what a step costs
        in a batch of that size (there one more row costs less than alone: the weights are read
        once). Sizes up to 8 have a policy each: a batch's step is priced per sequence, and the
        fixed part of a step spread over 3 sequences or over 4 differs by a third; one policy for
        3-4 mixed the two (the 3-sequence tail of a 4-sequence batch, demo model: plain steps
        priced 40% dear, so drafts that lost 10-20% looked like a gain)."""
        n = max(1, int(batch))
        bucket = n if n <= 8 else 1 << (n - 1).bit_length()
        key = (draft_max, adaptive) if bucket == 1 else (draft_max, adaptive, bucket)
        if key not in self._policies:
            moe_cpu = sum(1 for b in self.model.blocks
                          if getattr(b.ffn, "routed", None) is not None and b.ffn.routed.side == "cpu")
            self._policies[key] = DraftPolicy(draft_max, adaptive, moe_cpu * self.cfg.n_experts,
                                              relative_costs=bucket == 1, batch=bucket)
        return self._policies[key]

    def new_sequence(self, params: SamplingParams, use_mtp: bool, draft_ahead: bool = False,
                     reuse: Sequence | None = None, prefix: bool = False) -> Sequence:
        """A sequence ready for prefill; with `reuse`, it takes over that finished sequence's
        caches (prompt caching: Sequence.__init__)."""
        return Sequence(self.model, self.context, self.kv_dtype, use_mtp, params, self.prefill_chunk,
                        draft_ahead=draft_ahead, reuse=reuse, pools=self.pools,
                        prefix=self.prefix_cache if prefix else None)

    def resolve_draft_ahead(self, want: bool | None) -> bool:
        """Draft-ahead could pay only where the GPU idles while CPU experts run; on a CPU-only
        machine it takes the same cores as the experts. On an H200 it lost to the same draft length
        without it in 15 of 16 settings of the GPU check (BENCHMARKS.md): the MTP layer's host time
        there is longer than the last layer's experts it hides behind. So auto (None) is off."""
        return bool(want)

    @torch.inference_mode()
    def logits(self, ids) -> np.ndarray:
        """Main-model logits float32 [len(ids), n_vocab], fresh context, chunked prefill."""
        t = self._check_ids(ids)
        if len(t) == 0:
            raise NextnError("logits() needs at least one token")
        seq = self.new_sequence(SamplingParams(), use_mtp=False)
        out = []
        try:
            for s in range(0, len(t), self.prefill_chunk):
                h = self.model.forward(t[s:s + self.prefill_chunk], seq.cache, s)
                out.append(self.model.logits(h).cpu())
        finally:
            seq.release()
        return torch.cat(out).numpy()

    @torch.inference_mode()
    def mtp_logits(self, ids) -> np.ndarray:
        """MTP logits float32 [len(ids)-1, n_vocab]: row p from (h_p, ids[p+1]) at position p+1."""
        if not self.has_mtp:
            raise UnsupportedError(f"{self.file.path}: the model has no nextn (MTP) layer")
        t = self._check_ids(ids)
        if len(t) < 2:
            raise NextnError("mtp_logits() needs at least two tokens")
        seq = self.new_sequence(SamplingParams(), use_mtp=True)
        hs, out = [], []
        try:
            for s in range(0, len(t), self.prefill_chunk):
                hs.append(self.model.forward(t[s:s + self.prefill_chunk], seq.cache, s))
            h = torch.cat(hs)
            for s in range(0, len(t) - 1, self.prefill_chunk):
                e = min(s + self.prefill_chunk, len(t) - 1)
                z = self.model.mtp_forward(h[s:e], t[s + 1:e + 1], seq.mtp_cache, s)
                out.append(self.model.mtp_logits(z).cpu())
        finally:
            seq.release()
        return torch.cat(out).numpy()

    # ---- generation ------------------------------------------------------------------------------

    def _resolve_mtp(self, mtp: bool | None) -> bool:
        if mtp is True and not self.has_mtp:
            why = ("nextn_predict_layers is 0" if self.cfg.n_nextn == 0 else "its nextn layer was not loaded")
            raise UnsupportedError(f"{self.file.path}: MTP requested but the model has no nextn layer ({why})")
        want = self.speculative.mtp if mtp is None else mtp
        if want is None:
            want = True
        if want and not self.has_mtp:
            if not self._mtp_notice_given:
                print(f"note: {self.file.path.name} has no nextn (MTP) layer; decoding without MTP",
                      file=sys.stderr)
                self._mtp_notice_given = True
            return False
        return bool(want)

    def stream(self, prompt, **kw) -> Iterator[str]:
        """Yield text pieces as they are produced (never a broken UTF-8 character). The settings
        are checked here, when it is called: a bad one raises before any text (nextn run prints
        the prompt only after this)."""
        run = _Run(self, prompt, **kw)
        return self._stream(run)

    def _stream(self, run: "_Run") -> Iterator[str]:
        yield from run
        self.last_result = run.result

    def generate_batch(self, prompts, settings: list[dict] | None = None, max_batch: int | None = None,
                       **kw) -> list[GenerationResult]:
        """One result per prompt, decoded together: each step runs one forward over every active
        sequence's rows (runtime/batch.py). `settings`: per-prompt keyword arguments (sampling,
        MTP, max_tokens...) over the shared `kw`. Each result equals what `generate` gives for
        that prompt alone (bit for bit on the CPU in float32)."""
        from .batch import Batch

        prompts = list(prompts)
        if settings is not None and len(settings) != len(prompts):
            raise NextnError(f"{len(settings)} settings for {len(prompts)} prompts")
        runs = [_Run(self, p, **{**kw, **(settings[i] if settings else {})}) for i, p in enumerate(prompts)]
        batch = self.last_batch = Batch(self, max_batch=max_batch)
        for r in runs:  # everything validated before anything starts
            batch.add(r)
        batch.run_to_end()
        figures = batch.stats.figures()
        for r in runs:
            r.result.stats["batch"] = figures
        return [r.result for r in runs]

    def batch(self, max_batch: int | None = None):
        """A step-level batch (runtime/batch.py) for a caller that interleaves requests:
        `r = b.submit(prompt, **kw)`, then `for run, text in b.round(): ...` until `r.done`,
        `b.cancel(r)` to end one early; `r.result` as `generate` returns it."""
        from .batch import Batch

        return Batch(self, max_batch=max_batch)

    def generate(self, prompt, **kw) -> GenerationResult:
        res = self.generate_batch([prompt], **kw)[0]
        self.last_result = res
        return res


class _Run:
    """One generation: iterate for text pieces; `.result` holds text, tokens and stats after.

    The generation is also a step machine, for a caller that interleaves several (the server's
    worker, runtime/serve/slots.py): `begin()`, then `step()` until `done` (each call runs one
    model step: a prefill chunk, a plain step or a speculative step, and returns the new text),
    then `close()`. Iterating does exactly that on one thread."""

    def __init__(self, engine: Engine, prompt, *, max_tokens=None, temperature=None, top_k=None,
                 top_p=None, min_p=None, seed=None, mtp=None, draft_max=None, p_min=None,
                 adaptive=None, draft_ahead=None, stop=None, chat: bool = False, trace=None, oracle=None,
                 repeat_penalty=None, repeat_last_n=None, reuse: Sequence | None = None,
                 cache_prompt: bool = False):
        d, sp = engine.sampling, engine.speculative
        pick = lambda v, dv: dv if v is None else v  # noqa: E731
        self.engine = engine
        self.params = SamplingParams(float(pick(temperature, d.temperature)), pick(top_k, d.top_k),
                                     pick(top_p, d.top_p), pick(min_p, d.min_p), pick(seed, d.seed),
                                     pick(repeat_penalty, d.repeat_penalty), pick(repeat_last_n, d.repeat_last_n))
        self.max_tokens = pick(max_tokens, d.max_tokens)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise NextnError(f"invalid max_tokens={self.max_tokens!r}: expected an integer >= 0")
        self.draft_max = pick(draft_max, sp.draft_max)
        if not isinstance(self.draft_max, int) or not 0 <= self.draft_max <= DRAFT_MAX_LIMIT:
            raise NextnError(f"invalid draft_max={self.draft_max!r}: expected an integer in 0..{DRAFT_MAX_LIMIT}")
        self.p_min = float(pick(p_min, sp.p_min))
        if not 0 <= self.p_min <= 1:
            raise NextnError(f"invalid p_min={self.p_min!r}: expected a number in [0, 1]")
        self.adaptive = bool(pick(adaptive, sp.adaptive))
        self.draft_ahead = engine.resolve_draft_ahead(pick(draft_ahead, sp.draft_ahead))
        self.use_mtp = engine._resolve_mtp(mtp) and self.draft_max > 0
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise NextnError(f"invalid stop={stop!r}: expected non-empty strings")
        self.stop = stop
        self.trace = trace
        self.oracle = oracle  # draft_policy.Oracle (benchmarks only)
        # a finished sequence whose caches this run takes over, keeping the KV of the longest
        # common prefix (prompt caching): see Sequence.__init__
        self.reuse = reuse
        self.keep_seq = False  # set by a caller that keeps the finished sequence as a prompt cache
        # share KV pages of cached prefixes (the engine's PrefixCache) and leave this run's there.
        # Off by default: a prefix computed in another chunking (a long prompt's prefill chunk
        # runs batched matmuls) may differ from this prompt's own in the last bits, and a caller
        # comparing two runs of one prompt expects the same tokens
        self.cache_prompt = bool(cache_prompt)
        self.batch_size = 1  # sequences decoded beside this one when it starts (its draft policy's)
        self.batch_k = None  # the draft length a batch chose for this step (runtime/batch.py), or None
        self.last_step = None  # (k, drafted, accepted) of the last step, when the batch decides
        # decoded in a batch that has held two sequences: its own steps' times are the batch's,
        # so its policy is not told them (the batch prices its steps: runtime/batch.py)
        self.batched = False
        self._resume = None  # (tokens held, old sequence) after a preemption
        if isinstance(prompt, str):
            text = prompt
            if chat:
                text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            ids = engine.tokenizer.encode(text)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise NextnError("empty prompt")
        engine._check_ids(ids)
        if len(ids) >= engine.context and self.max_tokens > 0:
            raise NextnError(f"prompt of {len(ids)} tokens leaves no room in the context ({engine.context})")
        self.prompt_ids = ids
        self.result = GenerationResult("", [], {})
        self.seq: Sequence | None = None
        self.done = False
        self._closed = True  # until begin() opens the run's context

    def __iter__(self) -> Iterator[str]:
        from .batch import Batch

        batch = Batch(self.engine)
        batch.add(self)
        try:
            while not self.done:
                for run, piece in batch.round():
                    if piece:
                        yield piece
        finally:
            batch.cancel(self)

    # ---- the step machine ----------------------------------------------------------------------

    def begin(self) -> None:
        """Make the sequence (taking over `reuse`'s caches) and the run's context; no model work."""
        e = self.engine
        tok = e.tokenizer
        self._dec = tok.stream_decoder(skip_special=True)
        self._eos = tok.eos_ids
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.text, self._sent, self.out = "", 0, []
        self.finish = "length"
        policy = e.draft_policy(self.draft_max, self.adaptive, self.batch_size) if self.use_mtp else None
        use_mtp = self.use_mtp and (policy is None or policy.start_sequence())
        self._policy = policy if use_mtp else None
        self._decider = policy  # kept for the stats' `draft_policy` line after `_policy` is dropped
        self._mtp_off = self.use_mtp and not use_mtp  # adaptive found drafting does not pay here
        self._lengths: dict[int, int] = {}
        self._tl = Timeline(keep_spans=self.trace is not None)
        self.ctx = e.model.bus.begin_run(self._tl)
        self._closed = False
        with torch.inference_mode():
            seq = self.seq = e.new_sequence(self.params, use_mtp, self.draft_ahead, reuse=self.reuse,
                                            prefix=self.cache_prompt)
        self.reuse = None
        seq.oracle = self.oracle
        self._prefill = seq.prefill_ops(self.prompt_ids) if self.max_tokens > 0 else None
        self._prefill_len = len(self.prompt_ids)  # tokens the prefill runs
        self.cached_tokens = seq.cache.length  # prompt tokens whose KV was kept from `reuse`
        self._pending = None
        self._resuming = False
        self._plain_next = False  # the last step emitted `pending` alone: a plain step feeds it next
        self._t0 = self._t1 = time.perf_counter()
        self.done = self.max_tokens == 0
        if self.done:
            self._end()

    def step(self) -> str:
        """One model step; returns the text it completed (held back while it may start a stop
        string). Sets `done` at the end; the result is then in `.result`."""
        _activate(self.engine.model.bus, self.ctx)
        with torch.inference_mode():
            self.seq.reserve(self.slots_next())
            return run_alone(self.engine.model, self.step_ops())

    def slots_next(self) -> int:
        """Cache slots (0..n-1) the next step may write: a prefill chunk, or the pending token
        with at most draft_max drafts (and draft-ahead's rows past them). Its pages are reserved
        before the step starts."""
        seq = self.seq
        if self._prefill is not None:
            return min(self._prefill_len, seq.cache.length + seq.chunk)
        return len(seq.tokens) + 2 * (self.draft_max if self._policy is not None else 0) + 2

    def step_ops(self):
        """`step` as ops (runtime/decode.py): a runner serves them, batched with other runs'."""
        e, seq = self.engine, self.seq
        if self._prefill is not None:
            t0 = time.perf_counter()
            done, tok = yield from _until_step_end(self._prefill)
            self._tl.add("phase", "prefill", t0, time.perf_counter(), {"tokens": len(self.prompt_ids)})
            if not done:
                return ""
            self._prefill = None
            if self._resuming:  # recomputed after a preemption: `pending` is still the next token
                self._resuming = False
                return ""
            self._pending = tok
            self._t1 = time.perf_counter()
        policy = self._policy
        if self._plain_next:
            # `pending` was emitted by the last step alone; feed it
            self._plain_next = False
            if len(seq.tokens) >= e.context:
                self.finish = "context"
                return self._end()
            nxt = yield from seq.plain_ops(self._pending)
            if self.use_mtp and self._limit > 0:  # also after the policy turned drafting off
                self._lengths[0] = self._lengths.get(0, 0) + 1
            if policy is not None and self._limit > 0 and self.batch_k is None and not self.batched:
                policy.observe(0, 0, 0, seq.last_sample)
                if policy.mtp_loses():
                    policy.give_up()
                    seq.stop_mtp()
                    self._policy, self._mtp_off = None, True
            self._pending = nxt
            return ""
        # `pending` is the next token, not yet in the main cache. A speculative step feeds it
        # with k drafts and returns the accepted drafts plus the new pending.
        pending = self._pending
        limit = self.draft_limit()
        if policy is None:
            k = 0
        elif self.batch_k is not None:  # the batch decides for its adaptive sequences together
            k = min(self.batch_k, limit, self.draft_max)
            self.last_step = (0, 0, 0)
        elif self.batched:  # a step the batch does not price (a prefill runs beside it)
            k = policy.peek(limit)
        else:
            k = policy.choose(limit)
        nxt = None
        emit = [pending]
        if k > 0:
            step = yield from seq.spec_ops(pending, k, self.p_min)
            emit, nxt = emit + step[:-1], step[-1]
            if self.batch_k is None and not self.batched:
                policy.observe(k, seq.last_drafted, seq.last_accepted, seq.last_sample)
            elif self.batch_k is not None:
                self.last_step = (k, seq.last_drafted, seq.last_accepted)
            self._lengths[k] = self._lengths.get(k, 0) + 1
        for t in emit:
            if t in self._eos:
                self.finish = "eos"
                return self._end()
            self.out.append(t)
            self.text += self._dec.push(t)
            hit = self._find_stop(self.text)
            if hit is not None:
                self.text, self.finish = self.text[:hit], "stop"
                return self._end()
            if len(self.out) >= self.max_tokens:
                self.finish = "length"
                return self._end()
        if nxt is None:
            self._plain_next, self._limit = True, limit
        else:
            self._pending = nxt
        return self._take(len(self.text) - self._hold)

    def draft_limit(self) -> int:
        """Most drafts the next step may verify: the context's room after the pending token's own
        slot, and the tokens left to generate after it."""
        seq = self.seq
        return min(self.engine.context - len(seq.tokens) - 1, self.max_tokens - len(self.out) - 1)

    def stop_drafting(self) -> None:
        """The draft policy found drafting does not pay: MTP off for the rest of this run."""
        if self._policy is not None:
            self.seq.stop_mtp()
            self._policy, self._mtp_off = None, True
        self.batch_k = None

    def preempt(self) -> None:
        """Give the sequence's pages back (the pool is short); `resume` recomputes them."""
        seq = self.seq
        self._resume = (list(seq.tokens[:seq.cache.length]), seq)
        seq.release()

    @property
    def _resume_pending(self) -> bool:
        return self._resume is not None

    def resume(self) -> None:
        """After `preempt`: a new sequence prefills the tokens the old one held (prompt and
        output so far, or the part of the prompt it had reached); the pending token, the text so
        far, the sampler and the statistics carry over."""
        held, old = self._resume
        self._resume = None
        e = self.engine
        seq = self.seq = e.new_sequence(self.params, old.use_mtp, self.draft_ahead)
        seq.stats, seq.gen, seq.oracle, seq.last_sample = old.stats, old.gen, old.oracle, old.last_sample
        if self._prefill is not None:  # preempted during its prefill: start it again
            self._prefill = seq.prefill_ops(self.prompt_ids)
            return
        self._prefill = seq.prefill_ops(held)
        self._prefill_len = len(held)
        self._resuming = True

    def _take(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        piece = self.text[self._sent:upto]
        self._sent = upto
        return piece

    def _end(self) -> str:
        """The generation ended (self.finish says why): flush, stats; returns the last text."""
        if self._policy is not None:
            self._policy.end_sequence(turned_off=False)
        if self.finish != "stop":
            self.text += self._dec.flush()
        self.done = True
        piece = self._take(len(self.text))
        self._t2 = time.perf_counter()
        self._result()
        return piece

    def cancel(self) -> None:
        """End the generation now (the client went away): what was generated so far is the result."""
        if not self.done:
            self.finish = "cancelled"
            self._end()
        self.close()

    def close(self) -> None:
        """Release the run context and, unless a caller keeps the sequence (`keep_seq`: the
        server's prompt cache), its KV pages; writes the trace if one was asked for."""
        if self._closed:
            return
        self._closed = True
        if self.seq is not None and not self.keep_seq:
            self.seq.release(cache_prefix=self.cache_prompt and self.finish != "error")
        self.engine.model.bus.end_run()
        if self.trace is not None:
            self._tl.write_chrome_trace(self.trace)

    def _result(self) -> None:
        st = self.seq.stats
        out, tl, ctx = self.out, self._tl, self.ctx
        t0, t1, t2 = self._t0, self._t1, self._t2
        n = len(out)
        self.result = GenerationResult(self.text, out, {
            "prompt_tokens": len(self.prompt_ids),
            "cached_tokens": self.cached_tokens,
            "generated_tokens": n,
            "prompt_tokens_per_s": (len(self.prompt_ids) - self.cached_tokens) / max(t1 - t0, 1e-9),
            "decode_tokens_per_s": (n - 1) / max(t2 - t1, 1e-9) if n > 1 else 0.0,
            "prefill_s": t1 - t0,
            "decode_s": t2 - t1,
            "mtp": self.use_mtp,
            "adaptive": self.use_mtp and self.adaptive,
            "mtp_turned_off": self._mtp_off,  # the adaptive policy stopped drafting: it did not pay
            "draft_max": self.draft_max if self.use_mtp else 0,
            "draft_lengths": dict(sorted(self._lengths.items())),  # steps per chosen draft length
            "drafted": st.drafted,
            "accepted": st.accepted,
            "acceptance_rate": st.accepted / st.drafted if st.drafted else None,  # None: nothing drafted
            "acceptance_by_position": [a / d if d else None for a, d in zip(st.accepted_at, st.drafted_at)],
            # what the draft policy decided and why, one line (None: MTP off)
            "draft_policy": self._decider.decision() if self._decider is not None else None,
            "verify_steps": st.steps,
            "mean_tokens_per_step": (st.accepted + st.steps) / st.steps if st.steps else 1.0,
            "distinct_experts_per_verify": st.distinct_experts / st.steps if st.steps else 0.0,
            "draft_ahead": self.use_mtp and self.draft_ahead,
            "ahead_made": st.ahead_made,  # steps that drafted ahead beside their verification
            "ahead_used": st.ahead_used,  # steps that verified drafts made ahead (no draft phase)
            "draft_s": st.draft_s,
            "verify_s": st.verify_s,
            "weight_bytes_moved": ctx.weight_bytes,
            "activation_bytes_moved": ctx.activation_bytes,
            "finish_reason": self.finish,
            **tl.figures(t0, t2),
        }, self.finish)

    def _find_stop(self, text: str) -> int | None:
        best = None
        for s in self.stop:
            i = text.find(s, max(0, len(text) - len(s) - 64))
            if i == -1:
                i = text.find(s)
            if i != -1 and (best is None or i < best):
                best = i
        return best


def _until_step_end(gen):
    """Relay a prefill generator's ops until its next STEP_END (returns (False, None)) or its end
    (returns (True, its value))."""
    res = None
    while True:
        try:
            op = gen.send(res)
        except StopIteration as e:
            return True, e.value
        if op is STEP_END:
            return False, None
        res = yield op


def _activate(bus, ctx) -> None:
    """Make `ctx` this thread's run context. The bus keeps one per thread (what a run measures);
    a worker that interleaves several runs on one thread puts each run's own back before its step."""
    bus._tls.ctx = ctx
