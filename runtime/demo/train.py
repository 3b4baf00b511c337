"""Train the bundled demo model: a small GLM-4.x MoE with one MTP (nextn) layer, on the Python
standard library's own source.

    python -m runtime.demo.train [--out DIR] [--steps N | --minutes M] [--resume] [--seed S] [--threads N]
    python -m runtime.demo.train --export-only [--out DIR] [--gguf PATH]

Corpus: every ``.py`` file of the running interpreter's standard library (``sysconfig`` "stdlib",
without ``site-packages``, the test suites and the modules that are mostly mapping tables:
:func:`is_generated_table`), in sorted path order.
Every 20th file is held out for validation and evaluation and never trained on (:func:`corpus_files`).
Nothing is downloaded. The standard library's source is (c) the Python Software Foundation, under
the PSF License Agreement (Python Software Foundation License Version 2); the trained weights are
derived from it.

Tokenizer: byte-level BPE (GLM-4 pre-tokenizer, ``tokenizers`` library) with 4096 tokens, GLM special
tokens at the end (:func:`runtime.testmodel.train_tokenizer`).

Model: transformers' own ``Glm4MoeForCausalLM`` and ``MtpModel`` (so the export is
:func:`runtime.testmodel.write_gguf` and parity with transformers holds by construction): partial RoPE
0.5, QK-norm, attention bias, 1 leading dense block, sigmoid router with selection bias
(``e_score_correction_bias`` = GGUF ``exp_probs_b``), 8 routed experts, top-2, 1 shared expert.
Narrow (hidden 128) and deep (16 blocks): the one MTP layer is then a small part of a step, as in
GLM-4.5-Air (1 layer in 47), so drafting pays on a CPU too. The first demo (hidden 192, 4 blocks)
drafted with the same acceptance, but its MTP layer was a fifth of its depth: one draft cost ~40%
of a plain step and speculative decoding gained at most ~1.1x there (BENCHMARKS.md).

Objective: ``CE(main next token) + MTP_WEIGHT * CE(MTP)``, the MTP row for position p taking
``h_p`` (the main model's hidden state after the final norm) and the embedding of ``x_{p+1}`` and
predicting ``x_{p+2}``. ``h_p`` is NOT detached (as in DeepSeek-V3): the MTP gradient also shapes the
main model's last hidden state so it carries what the token after next needs, which is what makes the
drafts agree with the main model; the main loss is barely affected at this weight.

Load balancing: auxiliary-loss-free (DeepSeek-V3): after each optimizer step, for every MoE layer
``bias_e += BIAS_RATE * sign(mean_load - load_e)`` on ``e_score_correction_bias`` (the bias only
selects experts; the mixing weights stay the unbiased sigmoid scores).

Reproducibility: the run is defined by its step count (``--steps``; ``--minutes`` only converts a time
budget to steps with the calibrated rate ``STEPS_PER_MINUTE`` of this project's 2-core machine). Every
batch is drawn from a generator seeded by (seed, step), so a run resumed from a checkpoint sees the
same data as an uninterrupted one; with the same seed and thread count two runs give bit-identical
weights on the same machine and torch build (checked: same validation loss to all printed digits).
Checkpoints (model, MTP, optimizer, step) are written every ``--ckpt-minutes`` of wall time; that only
decides *when* state is saved, never what is computed. Thread counts change float summation order, so
a run is reproducible for a given ``--threads``.

The shipped ``runtime/demo/demo.gguf`` is ``--steps 1050 --threads 1 --seed 0`` (37.7 min, 27.8 steps a
minute, on the project's 2-core machine while other jobs kept its load at 3-8; alone one thread runs
~35 steps a minute, and 2 OpenMP threads can stall 5-20x under such load), then the export (done at
the end of training unless ``--no-export``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEMO_GGUF = Path(__file__).resolve().parent / "demo.gguf"
DEFAULT_OUT = REPO / "build" / "demo_train"

HOLDOUT_EVERY = 20         # every 20th file (sorted order, index % 20 == 10) is held out
HOLDOUT_OFFSET = 10
EXCLUDE_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
STEPS_PER_MINUTE = 35.0    # the rate of 1 thread on the project's shared 2-core machine (37/min measured
                           # for this model, rounded down for other jobs' load; 2 threads on an idle
                           # machine: 51/min); --minutes 30 -> 1050 steps, the shipped run
EXPORT_TYPES = {"default": "F16", "experts": "Q8_0"}


@dataclass
class TrainConfig:
    vocab: int = 4096
    hidden: int = 128
    n_layers: int = 16         # main layers (1 dense + 15 MoE): deep enough that the one MTP layer is a
                               # small share of a step, as in GLM (1 in 47 or 93), so drafting can pay
    n_dense: int = 1
    dense_ffn: int = 384
    n_experts: int = 8
    top_k: int = 2
    n_shared: int = 1
    expert_ffn: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    context_length: int = 1024  # written to the GGUF; trained on seq_len windows
    seq_len: int = 256
    batch: int = 8
    lr: float = 2.5e-3
    min_lr_frac: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_weight: float = 0.5
    bias_rate: float = 1e-3
    val_windows: int = 64      # held-out windows for the final figures
    max_files: int = 0         # 0: the whole corpus; n: the first n train and n held-out files (smoke tests)


def tiny_config() -> TrainConfig:
    """For the smoke test: a few steps in seconds."""
    return TrainConfig(vocab=300, hidden=32, n_layers=2, dense_ffn=64, expert_ffn=32, n_heads=2, n_kv_heads=1,
                       head_dim=16, seq_len=32, batch=4, warmup=2, val_windows=4, context_length=128, max_files=12)


# ----------------------------------------------------------------------------- corpus

def corpus_files(stdlib: str | None = None) -> tuple[list[Path], list[Path]]:
    """(train files, held-out files): the stdlib's .py files in sorted order, every HOLDOUT_EVERY-th held out."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDE_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    files = sorted(files, key=lambda p: p.relative_to(root).as_posix())
    train = [f for i, f in enumerate(files) if i % HOLDOUT_EVERY != HOLDOUT_OFFSET]
    held = [f for i, f in enumerate(files) if i % HOLDOUT_EVERY == HOLDOUT_OFFSET]
    return train, held


def read_text(p: Path) -> str | None:
    try:
        return p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


# A mapping-table line: after its comment, only literals and punctuation, at least one of them a
# number or a character literal ('\x00', u'\u00c7', 'A', '\u03b9\u0308'); or a comment row
# "# 0x00e -> NAME". Plain word strings ('foo', in __all__ lists or docs) do not count.
_ESC = r"(?:\\x[0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4}|\\U[0-9a-fA-F]{8}|\\N\{[^}]*\}|\\[0-7]{1,3}|\\.)"
_CHAR_LITERAL = re.compile(r"[uUbB]?(?:'(?:%s+|[^'\\])'|\"(?:%s+|[^\"\\])\")" % (_ESC, _ESC))
_TABLE_TOKEN = re.compile(r"""\s*(?:
    (?P<str>[rRbBuU]{0,2}(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"))
  | (?P<num>0[xXoObB][0-9a-fA-F_]+|\d[\d_]*(?:\.\d*)?(?:[eE][-+]?\d+)?)
  | (?P<const>(?:None|True|False)\b)
  | (?P<punct>[:,()\[\]{}+\-])
  | (?P<comment>\#.*)
)""", re.X)
_CODE_COMMENT = re.compile(r"#\s*0x[0-9a-fA-F]+\s*->")

# Measured over CPython 3.11's standard library (train + held-out files, :func:`table_share`): the
# charmap codecs (gencodec.py's and the hand-made cp858, cp1125, koi8_t, palmos...) 0.87-0.94,
# html/entities 0.99, stringprep 0.70, _sysconfigdata 0.54, encodings/rot_13 0.54, re/_casefix 0.48,
# html/__init__ (its charref table) 0.42; then a gap to __hello__ 0.27 (a 4-line file) and
# xml/dom/xmlbuilder 0.18, pydoc_data/topics 0.17, locale 0.14, everything else <= 0.10.
TABLE_SHARE_MAX = 0.35


def is_table_line(line: str) -> bool:
    """Whether one line is a mapping-table entry (``0x0080: 0x00c7,  # NAME``, ``'\\x00'  #  0x00 ->
    NULL``, ``0xb5:'\\u03bc', 0xdf:'ss',``) or a code-point comment row (``# 0x00e -> NAME``)."""
    s = line.strip()
    if s.startswith("#"):
        return bool(_CODE_COMMENT.match(s))
    pos, data = 0, 0
    while pos < len(s):
        m = _TABLE_TOKEN.match(s, pos)
        if not m or m.end() == pos:
            return False                        # a name, operator or keyword: code
        if m.group("comment"):
            break
        if m.group("num") or (m.group("str") and _CHAR_LITERAL.fullmatch(m.group("str"))):
            data += 1
        pos = m.end()
    return data > 0


def table_share(text: str) -> float:
    """Share of the non-blank lines of ``text`` that are mapping-table lines (:func:`is_table_line`)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return sum(map(is_table_line, lines)) / len(lines) if lines else 0.0


def is_generated_table(text: str) -> bool:
    """A module that is mostly a mapping table (codec tables, entity and case-folding maps), not code.
    The charmap codecs alone were 11% of the training text, and greedy decoding from a short prompt
    fell into them ("0x00c: 0x00b,  #  LATIN SMALL LETTER E"). Detected by content, so hand-made
    tables (encodings/cp858.py, stringprep.py) go too and code with a small table (locale.py) stays."""
    return table_share(text) > TABLE_SHARE_MAX


def texts(files) -> list[str]:
    """The files' texts, less empty files and mapping-table modules (:func:`is_generated_table`)."""
    return [t for t in (read_text(f) for f in files) if t and t.strip() and not is_generated_table(t)]


def build_tokenizer(train_texts: list[str], vocab: int):
    from runtime.testmodel import make_hf_tokenizer
    return make_hf_tokenizer(vocab, text=train_texts)


def encode_corpus(tok, docs: list[str]) -> np.ndarray:
    """Token stream of the documents, each followed by <|endoftext|>."""
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    enc = tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    out = []
    for e in enc:
        out.append(np.asarray(e.ids, dtype=np.int32))
        out.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def prepare_data(out: Path, cfg: TrainConfig, stdlib=None, log=print):
    """Tokenizer + token streams, cached in ``out`` (tokenizer/ and tokens.npz)."""
    from transformers import PreTrainedTokenizerFast

    from runtime.testmodel import CHAT_TEMPLATE

    tdir, tfile = out / "tokenizer", out / "tokens.npz"
    train_f, held_f = corpus_files(stdlib)
    if cfg.max_files:
        train_f, held_f = train_f[:cfg.max_files], held_f[:cfg.max_files]
    if tdir.exists() and tfile.exists():
        tok = PreTrainedTokenizerFast.from_pretrained(tdir)
        tok.chat_template = CHAT_TEMPLATE
        z = np.load(tfile)
        return tok, z["train"], z["val"]
    t0 = time.time()
    tr, va = texts(train_f), texts(held_f)
    log(f"corpus: {len(train_f)} train files ({sum(map(len, tr)) / 1e6:.1f} MB), "
        f"{len(held_f)} held-out files ({sum(map(len, va)) / 1e6:.1f} MB)")
    tok = build_tokenizer(tr, cfg.vocab)
    train_ids, val_ids = encode_corpus(tok, tr), encode_corpus(tok, va)
    log(f"tokenizer: {len(tok)} tokens; {len(train_ids) / 1e6:.2f}M train tokens, {len(val_ids) / 1e6:.2f}M "
        f"held-out tokens ({time.time() - t0:.0f} s)")
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(tdir)
    np.savez(tfile, train=train_ids, val=val_ids)
    return tok, train_ids, val_ids


def batch_at(ids: np.ndarray, step: int, seed: int, batch: int, width: int):
    """Deterministic random windows of ``width`` tokens for ``step`` (independent of any other step)."""
    import torch
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(ids) - width, (batch,), generator=g).numpy()
    return torch.from_numpy(np.stack([ids[s:s + width] for s in starts]).astype(np.int64))


def val_windows(ids: np.ndarray, n: int, width: int):
    """n evenly spaced, non-overlapping held-out windows."""
    import torch
    n = max(1, min(n, len(ids) // width))
    step = (len(ids) - width) // max(n - 1, 1)
    return torch.from_numpy(np.stack([ids[i * step:i * step + width] for i in range(n)]).astype(np.int64))


# ----------------------------------------------------------------------------- model

def spec_of(cfg: TrainConfig, seed: int):
    from runtime.testmodel import TestModelSpec
    return TestModelSpec(hidden=cfg.hidden, n_layers=cfg.n_layers, n_dense=cfg.n_dense, dense_ffn=cfg.dense_ffn,
                         n_experts=cfg.n_experts, top_k=cfg.top_k, n_shared=cfg.n_shared, expert_ffn=cfg.expert_ffn,
                         n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                         partial_rotary=0.5, rope_theta=10000.0, qk_norm=True, attn_bias=True, routed_scaling=1.0,
                         norm_topk=True, n_nextn=1, vocab_target=cfg.vocab, context_length=cfg.context_length,
                         seed=seed, nextn_embed_head="omit", name="nextn-demo-stdlib")


def build_model(cfg: TrainConfig, tok, seed: int, attn: str = "sdpa"):
    """Fresh (Glm4MoeForCausalLM, MtpModel), deterministic init from ``seed`` (transformers' init:
    normal(0, 0.02) weights, unit norms, zero biases and selection bias)."""
    import torch
    from transformers import Glm4MoeForCausalLM

    from runtime.testmodel import hf_config, make_mtp_model

    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    hcfg = hf_config(spec_of(cfg, seed), len(tok), eos_id=eos, pad_id=eos)
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(hcfg).float()
    mtp = make_mtp_model(model, 1)
    # MtpModel's generic init leaves the MoE block's 3-D expert tensors and router uninitialised:
    # initialise them as the main model's (normal(0, initializer_range), zero selection bias).
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeExperts, Glm4MoeTopkRouter
    g = torch.Generator().manual_seed(seed + 1)
    std = hcfg.initializer_range
    with torch.no_grad():
        for _, mod in sorted(mtp.named_modules(), key=lambda kv: kv[0]):
            if isinstance(mod, Glm4MoeExperts):
                mod.gate_up_proj.copy_(torch.randn(mod.gate_up_proj.shape, generator=g) * std)
                mod.down_proj.copy_(torch.randn(mod.down_proj.shape, generator=g) * std)
            elif isinstance(mod, Glm4MoeTopkRouter):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
                mod.e_score_correction_bias.zero_()
    for n, p in own_params(model, mtp):
        if not torch.isfinite(p).all():
            raise RuntimeError(f"non-finite initial weights in {n}")
    set_attn(model, mtp, attn)
    return model, mtp


def set_attn(model, mtp, attn: str):
    model.config._attn_implementation = attn
    mtp.config._attn_implementation = attn


def own_params(model, mtp):
    """Every trainable tensor once (the MTP layer shares the main embedding and head)."""
    seen, out = set(), []
    for n, p in list(model.named_parameters()) + [("mtp." + n, p) for n, p in mtp.named_parameters()]:
        if id(p) not in seen:
            seen.add(id(p))
            out.append((n, p))
    return out


def routers(model, mtp):
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter
    rs = [(n, m) for n, m in model.named_modules() if isinstance(m, Glm4MoeTopkRouter)]
    rs += [("mtp." + n, m) for n, m in mtp.named_modules() if isinstance(m, Glm4MoeTopkRouter)]
    return rs


class LoadCounter:
    """Forward hooks on the routers: per-router expert selection counts since the last reset."""

    def __init__(self, model, mtp):
        import torch
        self.routers = routers(model, mtp)
        self.counts = [torch.zeros(m.num_experts) for _, m in self.routers]
        for i, (_, m) in enumerate(self.routers):
            m.register_forward_hook(self._hook(i))

    def _hook(self, i):
        import torch

        def f(mod, inp, out):
            idx = out[2]
            self.counts[i] += torch.bincount(idx.reshape(-1), minlength=mod.num_experts).float()
        return f

    def reset(self):
        for c in self.counts:
            c.zero_()

    def balance(self, rate: float):
        """Auxiliary-loss-free update of the selection biases from the counts since the last reset."""
        import torch
        with torch.no_grad():
            for (_, m), c in zip(self.routers, self.counts):
                m.e_score_correction_bias += rate * torch.sign(c.mean() - c)


def forward_losses(model, mtp, w):
    """w: [B, T+2] token windows -> (main CE, MTP CE, main logits, MTP logits)."""
    import torch
    import torch.nn.functional as F

    T = w.shape[1] - 2
    inp = w[:, :T]
    h = model.model(input_ids=inp).last_hidden_state                # after the final norm
    logits = model.lm_head(h)
    pos = torch.arange(1, T + 1, dtype=torch.long)[None].expand(w.shape[0], T)
    z = mtp.forward_layer(0, h, pos, None, input_ids=w[:, 1:T + 1])  # row p: (h_p, x_{p+1}) at position p+1
    mlogits = mtp._project_to_logits(z)
    V = logits.shape[-1]
    main = F.cross_entropy(logits.reshape(-1, V), w[:, 1:T + 1].reshape(-1))
    mt = F.cross_entropy(mlogits.reshape(-1, V), w[:, 2:T + 2].reshape(-1))
    return main, mt, logits, mlogits


def evaluate_windows(model, mtp, windows, batch: int = 8) -> dict:
    """Held-out figures: main CE/accuracy, MTP CE/top-1 accuracy and agreement with the main argmax."""
    import torch
    tot = dict(loss=0.0, mtp_loss=0.0, acc=0.0, mtp_acc=0.0, agree=0.0)
    n = 0
    model.eval()
    mtp.eval()
    with torch.no_grad():
        for s in range(0, len(windows), batch):
            w = windows[s:s + batch]
            main, mt, lg, ml = forward_losses(model, mtp, w)
            T = w.shape[1] - 2
            k = w.shape[0] * T
            tot["loss"] += main.item() * k
            tot["mtp_loss"] += mt.item() * k
            pm, pt = lg.argmax(-1), ml.argmax(-1)
            tot["acc"] += (pm == w[:, 1:T + 1]).float().sum().item()
            tot["mtp_acc"] += (pt == w[:, 2:T + 2]).float().sum().item()
            # draft for x_{p+2} vs the main model's own greedy choice there (acceptance at draft_max 1,
            # teacher forced): main row p+1 predicts x_{p+2}
            tot["agree"] += (pt[:, :-1] == pm[:, 1:]).float().sum().item() * T / (T - 1)
            n += k
    model.train()
    mtp.train()
    return {k: v / n for k, v in tot.items()}


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def make_optimizer(model, mtp, cfg: TrainConfig):
    import torch
    decay, no_decay = [], []
    for n, p in own_params(model, mtp):
        (decay if p.dim() >= 2 and "embed" not in n else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def save_ckpt(path: Path, model, mtp, opt, step: int, meta: dict):
    import torch
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "mtp": {k: v for k, v in mtp.state_dict().items()
                                                     if k.startswith("layers.")},
                "opt": opt.state_dict() if opt is not None else None, "step": step, "meta": meta}, tmp)
    os.replace(tmp, path)


def load_weights(model, mtp, ck: dict):
    model.load_state_dict(ck["model"])
    missing, unexpected = mtp.load_state_dict(ck["mtp"], strict=False)
    bad = [k for k in missing if k.startswith("layers.")] + list(unexpected)
    if bad:
        raise RuntimeError(f"checkpoint does not match the MTP layer: {bad[:4]}")


def param_counts(model, mtp, cfg: TrainConfig) -> tuple[int, int]:
    """(total, active per token) parameters, MTP layer included."""
    total = sum(p.numel() for _, p in own_params(model, mtp))
    n_moe = (cfg.n_layers - cfg.n_dense) + 1
    inactive = n_moe * (cfg.n_experts - cfg.top_k) * 3 * cfg.hidden * cfg.expert_ffn
    return total, total - inactive


# ----------------------------------------------------------------------------- training

def train(cfg: TrainConfig, out: Path, steps: int, seed: int, resume: bool, threads: int,
          ckpt_minutes: float = 3.0, stdlib=None, progress: bool = True, log=print,
          stop_after: int | None = None) -> dict | None:
    """Train (or resume) a run of ``steps`` steps; returns the held-out figures. ``stop_after``: save a
    checkpoint and return None after that many steps (an interrupted run, for resume tests)."""
    import torch
    from tqdm import tqdm

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out.mkdir(parents=True, exist_ok=True)
    tok, train_ids, val_ids = prepare_data(out, cfg, stdlib, log)
    model, mtp = build_model(cfg, tok, seed)
    opt = make_optimizer(model, mtp, cfg)
    counter = LoadCounter(model, mtp)
    ck_path = out / "ckpt.pt"
    start = 0
    meta = {"config": asdict(cfg), "seed": seed, "steps": steps, "threads": threads}
    if resume and ck_path.exists():
        ck = torch.load(ck_path, weights_only=False)
        if ck["meta"]["config"] != meta["config"] or ck["meta"]["seed"] != seed or ck["meta"]["steps"] != steps:
            raise SystemExit(f"{ck_path}: checkpoint was made with another config/seed/--steps "
                             f"({ck['meta']['steps']} steps, seed {ck['meta']['seed']}); use a new --out")
        load_weights(model, mtp, ck)
        opt.load_state_dict(ck["opt"])
        start = ck["step"]
        log(f"resumed from {ck_path} at step {start}")
    total, active = param_counts(model, mtp, cfg)
    log(f"model: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active per token), vocab {len(tok)}, "
        f"{steps} steps x {cfg.batch} x {cfg.seq_len} tokens, seed {seed}, {threads} threads")
    model.train()
    mtp.train()
    params = [p for _, p in own_params(model, mtp)]
    last_ck = time.time()
    t0 = time.time()
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress, dynamic_ncols=True,
               desc="train", file=sys.stderr)
    ema = None
    loads = [torch.zeros_like(c) for c in counter.counts]
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, cfg)
        w = batch_at(train_ids, step, seed, cfg.batch, cfg.seq_len + 2)
        counter.reset()
        main, mt, _, _ = forward_losses(model, mtp, w)
        loss = main + cfg.mtp_weight * mt
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        counter.balance(cfg.bias_rate)
        for a, c in zip(loads, counter.counts):
            a += c
        v = (main.item(), mt.item())
        ema = v if ema is None else (0.98 * ema[0] + 0.02 * v[0], 0.98 * ema[1] + 0.02 * v[1])
        bar.set_postfix(loss=f"{ema[0]:.3f}", mtp=f"{ema[1]:.3f}", lr=f"{lr_at(step, steps, cfg):.1e}")
        if stop_after is not None and step + 1 >= stop_after:
            save_ckpt(ck_path, model, mtp, opt, step + 1, meta)
            bar.close()
            return None
        if time.time() - last_ck > ckpt_minutes * 60 and step + 1 < steps:
            save_ckpt(ck_path, model, mtp, opt, step + 1, meta)
            last_ck = time.time()
    bar.close()
    dt = time.time() - t0
    save_ckpt(ck_path, model, mtp, opt, steps, meta)
    final = out / "final.pt"
    save_ckpt(final, model, mtp, None, steps, meta)
    tok.save_pretrained(out / "tokenizer")
    res = evaluate_windows(model, mtp, val_windows(val_ids, cfg.val_windows, cfg.seq_len + 2))
    res["steps"] = steps
    res["train_seconds_this_run"] = round(dt, 1)
    res["steps_per_minute_this_run"] = round((steps - start) / max(dt, 1e-9) * 60, 2)
    res["params"] = total
    res["active_params"] = active
    spread = []
    for (n, m), c in zip(counter.routers, loads):
        frac = (c / c.sum().clamp_min(1)).tolist()
        spread.append({"router": n, "min": min(frac), "max": max(frac),
                       "bias": [round(x, 3) for x in m.e_score_correction_bias.tolist()]})
    res["expert_load"] = spread
    (out / "result.json").write_text(json.dumps(res, indent=1))
    log(f"held-out validation: loss {res['loss']:.4f}, next-token accuracy {res['acc']:.1%}, "
        f"MTP loss {res['mtp_loss']:.4f}, MTP top-1 accuracy {res['mtp_acc']:.1%}, "
        f"MTP agrees with main argmax {res['agree']:.1%} (teacher forced)")
    log(f"expert load (share of selections this run, ideal {1 / cfg.n_experts:.3f}): " + "; ".join(
        f"{s['router'].replace('model.layers.', 'L').replace('.mlp.gate', '')} {s['min']:.3f}-{s['max']:.3f}"
        for s in spread))
    return res


# ----------------------------------------------------------------------------- export

def load_trained(out: Path, attn: str = "eager"):
    """(model, mtp, tokenizer, cfg, seed) from ``out``'s final (or latest) checkpoint."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from runtime.testmodel import CHAT_TEMPLATE

    path = out / "final.pt" if (out / "final.pt").exists() else out / "ckpt.pt"
    if not path.exists():
        raise SystemExit(f"no checkpoint in {out}: train first")
    ck = torch.load(path, weights_only=False)
    cfg = TrainConfig(**ck["meta"]["config"])
    tok = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    tok.chat_template = CHAT_TEMPLATE
    model, mtp = build_model(cfg, tok, ck["meta"]["seed"], attn)
    load_weights(model, mtp, ck)
    return model.eval(), mtp.eval(), tok, cfg, ck["meta"]["seed"]


def export(out: Path, gguf_path: Path, log=print) -> Path:
    model, mtp, tok, cfg, seed = load_trained(out)
    from runtime.testmodel import write_gguf
    paths = write_gguf(model, mtp, tok, spec_of(cfg, seed), gguf_path, types=EXPORT_TYPES)
    log(f"wrote {paths[0]} ({paths[0].stat().st_size / 1e6:.2f} MB; experts Q8_0, other matrices F16, "
        f"norms/router F32)")
    return paths[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.demo.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"work directory (default {DEFAULT_OUT})")
    ap.add_argument("--steps", type=int, default=None, help="training steps (defines the run)")
    ap.add_argument("--minutes", type=float, default=30.0,
                    help=f"time budget used only to pick --steps (x {STEPS_PER_MINUTE:g} steps/minute, calibrated)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ckpt-minutes", type=float, default=3.0)
    ap.add_argument("--tiny", action="store_true", help="tiny config (smoke tests)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--export-only", action="store_true", help="write the GGUF from OUT's checkpoint")
    ap.add_argument("--no-export", action="store_true", help="do not write the GGUF after training")
    ap.add_argument("--gguf", type=Path, default=DEMO_GGUF, help=f"export path (default {DEMO_GGUF})")
    a = ap.parse_args(argv)
    if a.export_only:
        export(a.out, a.gguf)
        return 0
    cfg = tiny_config() if a.tiny else TrainConfig()
    steps = a.steps if a.steps is not None else max(1, int(round(a.minutes * STEPS_PER_MINUTE)))
    train(cfg, a.out, steps, a.seed, a.resume, a.threads, a.ckpt_minutes, progress=not a.no_progress)
    if not a.no_export:
        export(a.out, a.gguf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
