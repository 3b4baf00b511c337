"""Test-model writer: small random GLM-4.x MoE models as a transformers checkpoint and as GGUF.

A :class:`TestModelSpec` describes the model; :func:`build_hf_model` makes the transformers objects
(``Glm4MoeForCausalLM``, its ``MtpModel`` and a byte-level BPE tokenizer trained on a built-in text);
:func:`write_gguf` writes them with llama.cpp's ``glm4moe`` tensor names, shapes and metadata (checked
against a file written by llama.cpp's ``convert_hf_to_gguf.py``); :func:`write_test_model` does all of
it into one directory. Also: :func:`hf_from_gguf` (the inverse mapping, for reference logits of any
GGUF), :func:`hf_logits` and :func:`hf_mtp_logits` (the reference contracts of ``Engine.logits`` and
``Engine.mtp_logits``).

CLI: ``python -m runtime.testmodel OUT_DIR [--types Q8_0] [--layers N] [--hidden N] ...``
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

# ----------------------------------------------------------------------------- spec

SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
# added but not special (llama.cpp: USER_DEFINED, token type 4), as GLM-4.5's reasoning/tool tags
USER_DEFINED_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]

# A small GLM-like chat template (GLM-4.5 shape: [gMASK]<sop>, <|role|> headers, generation prompt
# "<|assistant|>", optional empty think block when enable_thinking is false).
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}<|system|>\n{{ m['content'] }}"
    "{%- elif m['role'] == 'user' -%}<|user|>\n{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}<|assistant|>\n{{ m['content'] }}"
    "{%- elif m['role'] in ['tool', 'observation'] -%}<|observation|>\n{{ m['content'] }}"
    "{%- else -%}{{ raise_exception('unknown role: ' ~ m['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>"
    "{{- '\\n<think></think>' if (enable_thinking is defined and not enable_thinking) else '' -}}"
    "{%- endif -%}"
)

TRAIN_TEXT = """The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the sun.
Hello world! Hello, world. hello there, how are you doing today? I'm fine, thanks. don't won't can't I'LL WE'RE they've she'd
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, 2))

class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 123 1234 12345 3.14159 2025 1999 42 100 1000 65536.
Café, naïve, résumé, ñandú, über, façade, Ærøskøbing, Straße.
我想在apple工作。你好，世界！今天天气很好。我们一起学习中文。机器学习和人工智能。
こんにちは世界。ありがとうございます。안녕하세요 세계.
Emoji: 😀 😃 😄 🚀 🌍 ❤️ 👍🏽 🎉 — dashes – and “quotes” and ‘single’ quotes… ellipsis.
Tabs\tand\tspaces   and    runs of spaces.

Multiple newlines above and below.


Mixture of experts models route each token to a few experts. Speculative decoding drafts tokens
with a small model and verifies them with the large one. Multi-token prediction layers predict the
token after next from the hidden state and the next token embedding.
"""


@dataclass(frozen=True)
class TestModelSpec:
    """A small random GLM-4.x MoE. Frozen and hashable (used as a cache key)."""
    __test__ = False  # not a pytest class

    hidden: int = 64
    n_layers: int = 3            # main layers
    n_dense: int = 1             # leading dense blocks (first_k_dense_replace)
    dense_ffn: int = 128
    n_experts: int = 8
    top_k: int = 2
    n_shared: int = 1
    expert_ffn: int = 32
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    partial_rotary: float = 0.5
    rope_theta: float = 10000.0
    qk_norm: bool = True
    attn_bias: bool = True
    routed_scaling: float = 1.0
    norm_topk: bool = True
    rms_eps: float = 1e-5
    n_nextn: int = 1             # MTP layers (0: none)
    vocab_target: int = 320      # total vocabulary incl. special tokens (the trainer may stop short)
    vocab_pad_multiple: int = 0  # pad the model's vocab up to a multiple (real GLM: 151365 tokens -> 151552);
                                 # the GGUF then lists [PADn] tokens of type UNUSED, as the converter writes
    context_length: int = 512
    selection_bias_scale: float = 0.0  # std of e_score_correction_bias (exp_probs_b)
    seed: int = 0
    nextn_embed_head: str = "copy"     # "copy": write blk.L.nextn.embed_tokens/shared_head_head; "omit"
    init_std: float = 0.05       # std of linear weights
    name: str = "nextn-test"

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(f"TestModelSpec: {msg}")
        if self.hidden <= 0 or self.n_layers <= 0:
            bad("hidden and n_layers must be positive")
        if not 0 <= self.n_dense <= self.n_layers:
            bad(f"n_dense={self.n_dense} must be in 0..n_layers={self.n_layers}")
        if not 1 <= self.top_k <= self.n_experts:
            bad(f"top_k={self.top_k} must be in 1..n_experts={self.n_experts}")
        if self.n_heads % self.n_kv_heads:
            bad(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        rot = int(self.head_dim * self.partial_rotary)
        if rot <= 0 or rot % 2:
            bad(f"head_dim*partial_rotary={self.head_dim * self.partial_rotary} must be a positive even integer")
        if self.nextn_embed_head not in ("copy", "omit"):
            bad(f"nextn_embed_head must be 'copy' or 'omit', got {self.nextn_embed_head!r}")
        if self.n_nextn < 0:
            bad("n_nextn must be >= 0")
        if self.vocab_target < 256 + len(SPECIAL_TOKENS) + len(USER_DEFINED_TOKENS):
            bad(f"vocab_target must be >= {256 + len(SPECIAL_TOKENS) + len(USER_DEFINED_TOKENS)} (bytes + special tokens)")

    @property
    def rope_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary)

    def replace(self, **kw) -> "TestModelSpec":
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(vocab_target: int = 320, text=TRAIN_TEXT):
    """Byte-level BPE (GLM-4 pre-tokenizer) trained on ``text`` (a string or an iterable of strings);
    special tokens appended at the end of the vocabulary as in GLM. Returns a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTok

    from runtime.tokenizer import GLM4_PRETOKENIZER_REGEX

    tok = HFTok(models.BPE(fuse_unk=False, byte_fallback=False, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PRETOKENIZER_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    n_added = len(SPECIAL_TOKENS) + len(USER_DEFINED_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=vocab_target - n_added, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator([text] if isinstance(text, str) else text, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in USER_DEFINED_TOKENS])
    return tok


def make_hf_tokenizer(vocab_target: int = 320, text=None, tokenizer_object=None):
    """transformers fast tokenizer around :func:`train_tokenizer` (on ``text``, default the built-in
    text) or around a given ``tokenizers.Tokenizer``; GLM special-token roles, chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = tokenizer_object if tokenizer_object is not None else (
        train_tokenizer(vocab_target) if text is None else train_tokenizer(vocab_target, text))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE, model_max_length=1 << 30,
        padding_side="left")


def tokenizer_gguf_metadata(hf_tok, vocab_size: int | None = None) -> dict[str, Any]:
    """The tokenizer.* GGUF keys as llama.cpp's converter (Glm4MoeModel.set_vocab) writes them."""
    vocab = hf_tok.get_vocab()
    n = max(max(vocab.values()) + 1, vocab_size or 0)
    rev = {i: t for t, i in vocab.items()}
    added = hf_tok.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(n):
        if i not in rev:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
            continue
        t = rev[i]
        tokens.append(t)
        if i in added:
            look_special = t.startswith("<|") and t.endswith("|>")
            types.append(3 if (added[i].special or look_special) else 4)
        else:
            types.append(1)
    tj = json.loads(hf_tok.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    ids = {t: vocab[t] for t in SPECIAL_TOKENS}
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "glm4",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": ids["<|endoftext|>"],
        "tokenizer.ggml.padding_token_id": ids["<|endoftext|>"],
        "tokenizer.ggml.bos_token_id": ids["[gMASK]"],
        "tokenizer.ggml.eot_token_id": ids["<|user|>"],
        "tokenizer.ggml.unknown_token_id": ids["<|endoftext|>"],
        "tokenizer.ggml.eom_token_id": ids["<|observation|>"],
    }
    if getattr(hf_tok, "chat_template", None):
        meta["tokenizer.chat_template"] = hf_tok.chat_template
    return meta


# ----------------------------------------------------------------------------- HF model

def hf_config(spec: TestModelSpec, vocab_size: int, eos_id: int | None = None, pad_id: int | None = None):
    from transformers import Glm4MoeConfig

    cfg = Glm4MoeConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=spec.dense_ffn,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads,
        head_dim=spec.head_dim, max_position_embeddings=spec.context_length, rms_norm_eps=spec.rms_eps,
        attention_bias=spec.attn_bias, moe_intermediate_size=spec.expert_ffn, num_experts_per_tok=spec.top_k,
        n_shared_experts=spec.n_shared, n_routed_experts=spec.n_experts, routed_scaling_factor=spec.routed_scaling,
        n_group=1, topk_group=1, first_k_dense_replace=spec.n_dense, norm_topk_prob=spec.norm_topk,
        use_qk_norm=spec.qk_norm, num_mtp_layers=spec.n_nextn, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(spec.rope_theta),
                         "partial_rotary_factor": float(spec.partial_rotary)},
        eos_token_id=eos_id, pad_token_id=pad_id, dtype="float32",
    )
    cfg._attn_implementation = "eager"
    return cfg


def _randomize(named_tensors, spec: TestModelSpec, gen) -> None:
    """Deterministic random init of every tensor (by sorted name) so every path is exercised."""
    import torch

    H = spec.hidden
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        shape = t.shape
        if name.endswith("e_score_correction_bias"):
            v = torch.randn(shape, generator=gen) * spec.selection_bias_scale
        elif "norm" in name:  # RMSNorm weights: random, non-unit
            v = 0.6 + 0.8 * torch.rand(shape, generator=gen)
        elif name.endswith(".bias"):
            v = 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("gate.weight"):  # router: logits of std ~1.5, so top-k is not degenerate
            v = torch.randn(shape, generator=gen) * (1.5 / H ** 0.5)
        elif "embed_tokens" in name:
            v = torch.randn(shape, generator=gen)
        else:
            v = torch.randn(shape, generator=gen) * spec.init_std
        with torch.no_grad():
            t.copy_(v.to(t.dtype))


def build_hf_model(spec: TestModelSpec, tokenizer=None):
    """-> (Glm4MoeForCausalLM, MtpModel | None, tokenizer), float32, eval mode, random weights."""
    import torch
    from transformers import Glm4MoeForCausalLM

    spec.validate()
    tok = tokenizer if tokenizer is not None else make_hf_tokenizer(spec.vocab_target)
    V = len(tok)
    if spec.vocab_pad_multiple > 0:
        V = -(-V // spec.vocab_pad_multiple) * spec.vocab_pad_multiple
    cfg = hf_config(spec, V, eos_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                    pad_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    torch.manual_seed(spec.seed)
    model = Glm4MoeForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(spec.seed)
    _randomize(list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                 if n.endswith("e_score_correction_bias")], spec, gen)
    mtp = None
    if spec.n_nextn > 0:
        mtp = make_mtp_model(model, spec.n_nextn)
        own = [(n, p) for n, p in mtp.named_parameters() if n.startswith("layers.")]
        own += [(n, b) for n, b in mtp.named_buffers() if n.endswith("e_score_correction_bias")]
        _randomize(own, spec, torch.Generator().manual_seed(spec.seed + 1))
    return model, mtp, tok


def make_mtp_model(model, n_layers: int):
    """transformers ``MtpModel`` sharing ``model``'s embedding, head and rotary embedding."""
    import torch
    from transformers.modeling_layers import MtpModel

    snap = {k: v.clone() for k, v in model.state_dict().items()}
    mtp = MtpModel(model, n_layers).float().eval()
    after = model.state_dict()
    if any(not torch.equal(snap[k], after[k]) for k in snap):  # guard: construction must not touch main weights
        model.load_state_dict(snap)
    mtp.config._attn_implementation = "eager"
    return mtp


# ----------------------------------------------------------------------------- name mapping

@dataclass
class _Entry:
    name: str                 # GGUF tensor name
    tensor: Any               # torch tensor (parameter or buffer) holding the data
    index: Any = None         # index into tensor (expert gate/up halves), or None
    group: str = "default"    # type group
    copy_of: str | None = None  # GGUF name this entry duplicates (nextn embed/head copies)

    def get(self) -> np.ndarray:
        t = self.tensor if self.index is None else self.tensor[self.index]
        return t.detach().to("cpu").float().numpy().copy()

    def set(self, arr: np.ndarray) -> None:
        import torch
        t = self.tensor if self.index is None else self.tensor[self.index]
        if tuple(t.shape) != tuple(arr.shape):
            raise ValueError(f"{self.name}: GGUF shape {tuple(arr.shape)} != transformers shape {tuple(t.shape)}")
        with torch.no_grad():
            t.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(t.dtype))


def _block_entries(b: str, layer, moe: bool, I: int | None) -> list[_Entry]:
    at = layer.self_attn
    e = [_Entry(f"{b}.attn_norm.weight", layer.input_layernorm.weight, group="norms")]
    for proj, g in (("q", at.q_proj), ("k", at.k_proj), ("v", at.v_proj)):
        e.append(_Entry(f"{b}.attn_{proj}.weight", g.weight, group="attn"))
        if g.bias is not None:
            e.append(_Entry(f"{b}.attn_{proj}.bias", g.bias, group="norms"))
    e.append(_Entry(f"{b}.attn_output.weight", at.o_proj.weight, group="attn"))
    if getattr(at, "use_qk_norm", False):
        e.append(_Entry(f"{b}.attn_q_norm.weight", at.q_norm.weight, group="norms"))
        e.append(_Entry(f"{b}.attn_k_norm.weight", at.k_norm.weight, group="norms"))
    e.append(_Entry(f"{b}.post_attention_norm.weight", layer.post_attention_layernorm.weight, group="norms"))
    mlp = layer.mlp
    if moe:
        e.append(_Entry(f"{b}.ffn_gate_inp.weight", mlp.gate.weight, group="router"))
        e.append(_Entry(f"{b}.exp_probs_b.bias", mlp.gate.e_score_correction_bias, group="router"))
        ex = mlp.experts
        I = ex.intermediate_dim
        e.append(_Entry(f"{b}.ffn_gate_exps.weight", ex.gate_up_proj, (slice(None), slice(0, I)), group="experts"))
        e.append(_Entry(f"{b}.ffn_up_exps.weight", ex.gate_up_proj, (slice(None), slice(I, 2 * I)), group="experts"))
        e.append(_Entry(f"{b}.ffn_down_exps.weight", ex.down_proj, group="experts"))
        sh = mlp.shared_experts
        for p in ("gate", "up", "down"):
            e.append(_Entry(f"{b}.ffn_{p}_shexp.weight", getattr(sh, f"{p}_proj").weight, group="shexp"))
    else:
        for p in ("gate", "up", "down"):
            e.append(_Entry(f"{b}.ffn_{p}.weight", getattr(mlp, f"{p}_proj").weight, group="dense"))
    return e


def gguf_entries(hf_model, mtp_model=None, nextn_embed_head: str = "copy") -> list[_Entry]:
    """GGUF tensor name -> transformers tensor mapping (llama.cpp convert_hf_to_gguf, Glm4MoeModel)."""
    cfg = hf_model.config
    m = hf_model.model
    ents = [_Entry("token_embd.weight", m.embed_tokens.weight, group="embd")]
    for i, layer in enumerate(m.layers):
        ents += _block_entries(f"blk.{i}", layer, moe=i >= cfg.first_k_dense_replace, I=None)
    ents.append(_Entry("output_norm.weight", m.norm.weight, group="norms"))
    ents.append(_Entry("output.weight", hf_model.lm_head.weight, group="output"))
    if mtp_model is not None:
        L = cfg.num_hidden_layers
        for k, ml in enumerate(mtp_model.layers):
            b = f"blk.{L + k}"
            ents.append(_Entry(f"{b}.nextn.eh_proj.weight", ml.eh_proj.weight, group="nextn"))
            ents.append(_Entry(f"{b}.nextn.enorm.weight", ml.enorm.weight, group="norms"))
            ents.append(_Entry(f"{b}.nextn.hnorm.weight", ml.hnorm.weight, group="norms"))
            ents += _block_entries(b, ml.mtp_block, moe=True, I=None)
            ents.append(_Entry(f"{b}.nextn.shared_head_norm.weight", ml.post_norm.weight, group="norms"))
            if nextn_embed_head == "copy":
                ents.append(_Entry(f"{b}.nextn.embed_tokens.weight", m.embed_tokens.weight, group="embd",
                                   copy_of="token_embd.weight"))
                ents.append(_Entry(f"{b}.nextn.shared_head_head.weight", hf_model.lm_head.weight, group="output",
                                   copy_of="output.weight"))
    return ents


# ----------------------------------------------------------------------------- GGUF writing

WRITABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# Types gguf.quants cannot quantize: written as random blocks (sane f16 scales, magnitudes like the
# weights they replace) whose dequantized values become the transformers weights (needs match_hf=True).
# Byte offsets of the f16 scale fields in each block.
SYNTH_TYPES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
               "IQ4_NL": (0,), "IQ4_XS": (0,)}
TYPE_GROUPS = ("default", "embd", "output", "attn", "dense", "experts", "shexp", "nextn")
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 12,
              "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30, "BF16": 32}


def _base_name(name: str) -> str:
    # "blk.3.nextn.eh_proj.weight" -> "nextn.eh_proj"; "blk.1.ffn_down_exps.weight" -> "ffn_down_exps"
    n = re.sub(r"^blk\.\d+\.", "", name)
    return re.sub(r"\.(weight|bias)$", "", n)


def resolve_types(entries: list[_Entry], types: dict | str) -> dict[str, str]:
    """GGUF name -> type name. ``types`` is one type for all, or a dict with keys among TYPE_GROUPS,
    GGUF base names (``ffn_down_exps``, ``attn_q``, ``nextn.eh_proj``, ...) or full tensor names.
    1-D tensors (norms, biases) and the router (ffn_gate_inp, exp_probs_b) are always F32."""
    if isinstance(types, str):
        types = {"default": types}
    types = dict(types)
    known_bases = {_base_name(e.name) for e in entries}
    known_names = {e.name for e in entries}
    for k, v in types.items():
        if k not in TYPE_GROUPS and k not in known_bases and k not in known_names:
            raise ValueError(f"unknown tensor group {k!r} in types (groups: {', '.join(TYPE_GROUPS)}, "
                             f"or a tensor base name such as 'ffn_down_exps', or a full tensor name)")
        if str(v).upper() not in WRITABLE_TYPES and str(v).upper() not in SYNTH_TYPES:
            raise ValueError(f"cannot write tensor type {v!r} for {k!r}: the test-model writer supports "
                             f"{', '.join(WRITABLE_TYPES)} (gguf.quants) and, with match_hf=True, "
                             f"{', '.join(SYNTH_TYPES)} (random blocks)")
    out = {}
    for e in entries:
        if e.group in ("norms", "router") or (e.index is None and e.tensor.dim() == 1):
            out[e.name] = "F32"
            continue
        t = types.get(e.name) or types.get(_base_name(e.name)) or types.get(e.group) or types.get("default", "F32")
        out[e.name] = str(t).upper()
    return out


def _encode(arr: np.ndarray, tname: str, name: str, rng: np.random.Generator | None = None):
    """-> (data array for GGUFWriter.add_tensor, raw_dtype or None)."""
    import gguf
    from gguf.quants import quantize

    qt = gguf.GGMLQuantizationType[tname]
    if tname == "F32":
        return arr.astype(np.float32), None
    if tname == "F16":
        return arr.astype(np.float16), None
    block = gguf.GGML_QUANT_SIZES[qt][0]
    if arr.shape[-1] % block:
        raise ValueError(f"{name}: row length {arr.shape[-1]} is not a multiple of the {tname} block size "
                         f"{block}; pick sizes that are, or another type for this tensor group")
    if tname in SYNTH_TYPES:
        return _synth_blocks(arr, tname, rng if rng is not None else np.random.default_rng(0)), qt
    return quantize(arr.astype(np.float32), qt), qt


def _synth_blocks(arr: np.ndarray, tname: str, rng: np.random.Generator) -> np.ndarray:
    """Random ``tname`` blocks for a tensor shaped like ``arr``: random quants and sub-scales, f16 scale
    fields set so the dequantized values have about ``arr``'s std (varying by block)."""
    import gguf
    from gguf.quants import dequantize

    qt = gguf.GGMLQuantizationType[tname]
    block, bsize = gguf.GGML_QUANT_SIZES[qt]
    rows = int(np.prod(arr.shape[:-1])) if arr.ndim > 1 else 1
    nb = arr.shape[-1] // block
    raw = rng.integers(0, 256, size=(rows, nb, bsize), dtype=np.uint8)

    def set_scales(v):
        b = np.ascontiguousarray(v.astype(np.float16)).view(np.uint8).reshape(rows, nb, 2)
        for off in SYNTH_TYPES[tname]:
            raw[:, :, off:off + 2] = b

    set_scales(np.ones((rows, nb)))
    unit = dequantize(raw.reshape(rows, nb * bsize), qt)
    s = float(np.std(arr)) / max(float(np.std(unit)), 1e-12)
    set_scales(s * rng.uniform(0.5, 1.5, size=(rows, nb)))
    return raw.reshape(*arr.shape[:-1], nb * bsize)


def dequantize_written(data: np.ndarray, raw_dtype) -> np.ndarray:
    import gguf
    from gguf.quants import dequantize
    if raw_dtype is None:
        return data.astype(np.float32)
    return dequantize(data, raw_dtype).astype(np.float32)


def _size_label(arrays: dict[str, np.ndarray]) -> str:
    from gguf.utility import size_label
    total = shared = expert = 0
    esum = nexp = 0
    for name, a in arrays.items():
        s = int(np.prod(a.shape))
        total += s
        if "_exps." in name and a.ndim >= 3:
            expert += s // a.shape[0]
            esum += a.shape[0]
            nexp += 1
        else:
            shared += s
    return size_label(total, shared, expert, esum // nexp if nexp else 0)


def add_tokenizer_metadata(w, tm: dict) -> None:
    """Write tokenizer metadata (as `tokenizer_gguf_metadata` returns it) with a gguf.GGUFWriter,
    in the order and value types llama.cpp's converter uses."""
    w.add_string("tokenizer.ggml.model", tm["tokenizer.ggml.model"])
    w.add_string("tokenizer.ggml.pre", tm["tokenizer.ggml.pre"])
    w.add_array("tokenizer.ggml.tokens", tm["tokenizer.ggml.tokens"])
    w.add_array("tokenizer.ggml.token_type", tm["tokenizer.ggml.token_type"])
    w.add_array("tokenizer.ggml.merges", tm["tokenizer.ggml.merges"])
    for k in ("eos", "padding", "bos", "eot", "unknown", "eom"):
        w.add_uint32(f"tokenizer.ggml.{k}_token_id", tm[f"tokenizer.ggml.{k}_token_id"])
    if "tokenizer.chat_template" in tm:
        w.add_string("tokenizer.chat_template", tm["tokenizer.chat_template"])


def write_gguf(hf_model, mtp_model, tokenizer, spec: TestModelSpec | None, path, types: dict | str = "F32",
               split_max_tensors: int | None = None, match_hf: bool = False) -> list[Path]:
    """Write the model as a llama.cpp ``glm4moe`` GGUF. Returns the written file(s).

    ``types``: see :func:`resolve_types`. ``split_max_tensors``: split as llama.cpp's gguf-split does
    (``NAME-00001-of-0000N.gguf`` with ``split.no``/``split.count``/``split.tensors.count``; only the
    first file has the model metadata). ``match_hf``: after quantizing, copy the dequantized values
    back into the transformers weights, so transformers and the GGUF hold exactly the same model.
    """
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = hf_model.config
    embed_head = spec.nextn_embed_head if spec is not None else "copy"
    n_nextn = len(mtp_model.layers) if mtp_model is not None else 0
    ents = gguf_entries(hf_model, mtp_model, embed_head)
    tmap = resolve_types(ents, types)

    synth = sorted({t for t in tmap.values() if t in SYNTH_TYPES})
    if synth and not match_hf:
        raise ValueError(f"cannot quantize to {', '.join(synth)} (gguf.quants has no quantizer for it): pass "
                         f"match_hf=True to write random blocks of that type and make the transformers weights "
                         f"their dequantized values")
    rng = np.random.default_rng((spec.seed if spec is not None else 0) + 12345)
    encoded: dict[str, tuple] = {}
    arrays: dict[str, np.ndarray] = {}
    for e in ents:
        arr = e.get()
        arrays[e.name] = arr
        if e.copy_of is not None and tmap[e.name] == tmap[e.copy_of]:
            encoded[e.name] = encoded[e.copy_of]  # byte-identical copy, as the converter writes it
        else:
            encoded[e.name] = _encode(arr, tmap[e.name], e.name, rng)
    if match_hf:
        for e in ents:
            if e.copy_of is None:
                e.set(dequantize_written(*encoded[e.name]).reshape(arrays[e.name].shape))

    # file type: the type of the expert tensors (most of the bytes), else the default
    main_t = tmap.get("blk.%d.ffn_gate_exps.weight" % cfg.first_k_dense_replace) if cfg.first_k_dense_replace < cfg.num_hidden_layers else None
    main_t = main_t or tmap.get("token_embd.weight", "F32")

    H = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    rope_dim = int(head_dim * cfg.rope_parameters.get("partial_rotary_factor", 1.0))
    ctx = spec.context_length if spec is not None else cfg.max_position_embeddings
    A = "glm4moe"
    w = gguf.GGUFWriter(path, A, split_max_tensors=split_max_tensors or 0)
    w.add_type("model")
    w.add_name(spec.name if spec is not None else "nextn-test")
    w.add_string("general.size_label", _size_label(arrays))
    w.add_uint32(f"{A}.block_count", cfg.num_hidden_layers + n_nextn)
    w.add_uint32(f"{A}.context_length", ctx)
    w.add_uint32(f"{A}.embedding_length", H)
    w.add_uint32(f"{A}.feed_forward_length", cfg.intermediate_size)
    w.add_uint32(f"{A}.attention.head_count", cfg.num_attention_heads)
    w.add_uint32(f"{A}.attention.head_count_kv", cfg.num_key_value_heads)
    w.add_float32(f"{A}.rope.freq_base", float(cfg.rope_parameters["rope_theta"]))
    w.add_float32(f"{A}.attention.layer_norm_rms_epsilon", float(cfg.rms_norm_eps))
    w.add_uint32(f"{A}.expert_count", cfg.n_routed_experts)
    w.add_uint32(f"{A}.expert_used_count", cfg.num_experts_per_tok)
    w.add_uint32(f"{A}.expert_group_count", cfg.n_group)
    w.add_uint32(f"{A}.expert_group_used_count", cfg.topk_group)
    w.add_uint32(f"{A}.attention.key_length", head_dim)
    w.add_uint32(f"{A}.attention.value_length", head_dim)
    w.add_uint32("general.file_type", _FILE_TYPE[main_t])
    w.add_uint32(f"{A}.rope.dimension_count", rope_dim)
    w.add_uint32(f"{A}.expert_feed_forward_length", cfg.moe_intermediate_size)
    w.add_uint32(f"{A}.expert_shared_count", cfg.n_shared_experts)
    w.add_uint32(f"{A}.leading_dense_block_count", cfg.first_k_dense_replace)
    w.add_uint32(f"{A}.expert_gating_func", 2)  # sigmoid
    w.add_float32(f"{A}.expert_weights_scale", float(cfg.routed_scaling_factor))
    w.add_bool(f"{A}.expert_weights_norm", bool(cfg.norm_topk_prob))
    w.add_uint32(f"{A}.nextn_predict_layers", n_nextn)
    w.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    tm = tokenizer_gguf_metadata(tokenizer, cfg.vocab_size)
    add_tokenizer_metadata(w, tm)

    for e in ents:
        data, raw = encoded[e.name]
        if raw is None:
            w.add_tensor(e.name, data)
        else:
            w.add_tensor(e.name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(path)


# ----------------------------------------------------------------------------- HF checkpoint

MTP_FILE = "model-mtp.safetensors"


def mtp_checkpoint_state_dict(hf_model, mtp_model) -> dict:
    """MTP weights in the original GLM checkpoint layout (``model.layers.{L+k}.*``, per-expert tensors,
    ``shared_head.norm``, copies of ``embed_tokens`` / ``shared_head.head``) — what llama.cpp's converter
    and vLLM read."""
    L = hf_model.config.num_hidden_layers
    sd = {}
    for k, ml in enumerate(mtp_model.layers):
        p = f"model.layers.{L + k}."
        for n, t in ml.state_dict().items():
            if n.startswith("mtp_block."):
                n2 = n[len("mtp_block."):]
                if n2 == "mlp.experts.gate_up_proj":
                    I = t.shape[1] // 2
                    for e in range(t.shape[0]):
                        sd[f"{p}mlp.experts.{e}.gate_proj.weight"] = t[e, :I].contiguous()
                        sd[f"{p}mlp.experts.{e}.up_proj.weight"] = t[e, I:].contiguous()
                    continue
                if n2 == "mlp.experts.down_proj":
                    for e in range(t.shape[0]):
                        sd[f"{p}mlp.experts.{e}.down_proj.weight"] = t[e].contiguous()
                    continue
                sd[p + n2] = t.contiguous()
            elif n.startswith("post_norm."):
                sd[p + "shared_head.norm." + n[len("post_norm."):]] = t.contiguous()
            else:
                sd[p + n] = t.contiguous()
        sd[p + "embed_tokens.weight"] = hf_model.model.embed_tokens.weight.detach().clone()
        sd[p + "shared_head.head.weight"] = hf_model.lm_head.weight.detach().clone()
    return {k: v.detach().clone() for k, v in sd.items()}


def load_mtp_checkpoint(hf_model, path, n_layers: int):
    """Inverse of :func:`mtp_checkpoint_state_dict`: an ``MtpModel`` sharing ``hf_model``'s embedding/head."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(str(path))
    mtp = make_mtp_model(hf_model, n_layers)
    L = hf_model.config.num_hidden_layers
    target = mtp.state_dict()
    new = {}
    for k in range(n_layers):
        p = f"model.layers.{L + k}."
        experts: dict[str, dict[int, torch.Tensor]] = {"gate": {}, "up": {}, "down": {}}
        for name, t in sd.items():
            if not name.startswith(p):
                continue
            n = name[len(p):]
            mexp = re.match(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$", n)
            if mexp:
                experts[mexp.group(2)][int(mexp.group(1))] = t
            elif n.startswith(("enorm.", "hnorm.", "eh_proj.")):
                new[f"layers.{k}.{n}"] = t
            elif n.startswith("shared_head.norm."):
                new[f"layers.{k}.post_norm.{n[len('shared_head.norm.'):]}"] = t
            elif n in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # shared with the main model
            else:
                new[f"layers.{k}.mtp_block.{n}"] = t
        E = len(experts["gate"])
        if E:
            new[f"layers.{k}.mtp_block.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([experts["gate"][e], experts["up"][e]], 0) for e in range(E)])
            new[f"layers.{k}.mtp_block.mlp.experts.down_proj"] = torch.stack([experts["down"][e] for e in range(E)])
    missing = [k for k in target if k.startswith("layers.") and k not in new]
    if missing:
        raise ValueError(f"{path}: MTP weights missing: {missing[:5]}")
    mtp.load_state_dict(new, strict=False)
    return mtp


def save_hf(hf_model, mtp_model, tokenizer, hf_dir) -> Path:
    """``save_pretrained`` of model and tokenizer; MTP weights in ``model-mtp.safetensors``
    (GLM checkpoint layout, so llama.cpp's converter picks them up with the main weights)."""
    from safetensors.torch import save_file

    hf_dir = Path(hf_dir)
    hf_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    if mtp_model is not None:
        save_file(mtp_checkpoint_state_dict(hf_model, mtp_model), str(hf_dir / MTP_FILE), metadata={"format": "pt"})
    return hf_dir


def load_hf(hf_dir):
    """-> (Glm4MoeForCausalLM, MtpModel | None, tokenizer) from a directory written by :func:`save_hf`."""
    import torch
    from transformers import AutoTokenizer, Glm4MoeForCausalLM

    hf_dir = Path(hf_dir)
    model = Glm4MoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    mtp = None
    n = getattr(model.config, "num_mtp_layers", 0) or 0
    if n and (hf_dir / MTP_FILE).exists():
        mtp = load_mtp_checkpoint(model, hf_dir / MTP_FILE, n)
    return model, mtp, tok


# ----------------------------------------------------------------------------- references

def hf_logits(hf_model, ids) -> np.ndarray:
    """transformers logits [len(ids), vocab], float32 (reference for ``Engine.logits``)."""
    import torch
    x = torch.tensor([list(map(int, ids))], dtype=torch.long)
    with torch.no_grad():
        return hf_model(input_ids=x).logits[0].float().numpy()


def hf_mtp_logits(hf_model, mtp_model, ids, layer: int = 0) -> np.ndarray:
    """transformers MTP logits [len(ids)-1, vocab] (reference for ``Engine.mtp_logits``): row p uses the
    main model's final-norm hidden state at p and token ids[p+1], at position p+1, predicting ids[p+2]."""
    import torch
    ids = list(map(int, ids))
    if len(ids) < 2:
        return np.zeros((0, hf_model.config.vocab_size), np.float32)
    x = torch.tensor([ids], dtype=torch.long)
    with torch.no_grad():
        h = hf_model.model(input_ids=x).last_hidden_state[:, :-1]
        pos = torch.arange(1, len(ids), dtype=torch.long)[None]
        out = mtp_model.forward_layer(layer, h, pos, None, input_ids=x[:, 1:])
        return mtp_model._project_to_logits(out)[0].float().numpy()


def hf_from_gguf(path, dtype="float32"):
    """Build (Glm4MoeForCausalLM, MtpModel | None) holding the (dequantized) weights of a glm4moe GGUF,
    through the inverse of the writer's name mapping. Reference logits for any GGUF file."""
    import gguf
    import torch
    from transformers import Glm4MoeForCausalLM

    r = gguf.GGUFReader(str(path))
    f = lambda k, d=None: (r.fields[k].contents() if k in r.fields else d)  # noqa: E731
    A = f("general.architecture")
    if A != "glm4moe":
        raise ValueError(f"{path}: architecture {A!r}, expected 'glm4moe'")
    tensors = {t.name: t for t in r.tensors}
    n_nextn = int(f(f"{A}.nextn_predict_layers", 0) or 0)
    n_layers = int(f(f"{A}.block_count")) - n_nextn
    H = int(f(f"{A}.embedding_length"))
    n_heads = int(f(f"{A}.attention.head_count"))
    head_dim = int(f(f"{A}.attention.key_length", H // n_heads))
    spec = TestModelSpec(
        hidden=H, n_layers=n_layers, n_dense=int(f(f"{A}.leading_dense_block_count", 0)),
        dense_ffn=int(f(f"{A}.feed_forward_length")), n_experts=int(f(f"{A}.expert_count")),
        top_k=int(f(f"{A}.expert_used_count")), n_shared=int(f(f"{A}.expert_shared_count", 1)),
        expert_ffn=int(f(f"{A}.expert_feed_forward_length")), n_heads=n_heads,
        n_kv_heads=int(f(f"{A}.attention.head_count_kv")), head_dim=head_dim,
        partial_rotary=int(f(f"{A}.rope.dimension_count", head_dim)) / head_dim,
        rope_theta=float(f(f"{A}.rope.freq_base")), qk_norm="blk.0.attn_q_norm.weight" in tensors,
        attn_bias="blk.0.attn_q.bias" in tensors, routed_scaling=float(f(f"{A}.expert_weights_scale", 1.0)),
        norm_topk=bool(f(f"{A}.expert_weights_norm", True)),
        rms_eps=float(f(f"{A}.attention.layer_norm_rms_epsilon")), n_nextn=n_nextn,
        context_length=int(f(f"{A}.context_length")),
    )
    V = tensors["token_embd.weight"].data.shape[0]
    cfg = hf_config(spec, V)
    model = Glm4MoeForCausalLM(cfg).float().eval()
    mtp = make_mtp_model(model, n_nextn) if n_nextn else None
    for e in gguf_entries(model, mtp, "omit"):
        t = tensors.get(e.name)
        if t is None:
            raise ValueError(f"{path}: tensor {e.name} is missing")
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(x) for x in reversed(t.shape)))
        e.set(arr.astype(np.float32))
    return model, mtp


# ----------------------------------------------------------------------------- one-call writer

@dataclass
class TestModel:
    __test__ = False

    spec: TestModelSpec
    gguf_path: Path              # the file to load (first split where split)
    gguf_paths: list[Path]
    hf_dir: Path
    hf_model: Any
    mtp_model: Any
    tokenizer: Any               # transformers tokenizer
    types: Any = "F32"

    def logits(self, ids) -> np.ndarray:
        return hf_logits(self.hf_model, ids)

    def mtp_logits(self, ids) -> np.ndarray:
        if self.mtp_model is None:
            raise ValueError("this test model has no MTP layer (n_nextn=0)")
        return hf_mtp_logits(self.hf_model, self.mtp_model, ids)


def write_test_model(spec: TestModelSpec | None = None, out_dir=".", types: dict | str = "F32",
                     split_max_tensors: int | None = None, match_hf: bool = False, save_hf_dir: bool = True,
                     gguf_name: str | None = None) -> TestModel:
    """Build a random model from ``spec`` and write ``out_dir/hf`` (transformers) and
    ``out_dir/<name>.gguf`` (or its splits). ``match_hf``: transformers weights are replaced by the
    dequantized GGUF values (exact parity for quantized files)."""
    spec = spec or TestModelSpec()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, mtp, tok = build_hf_model(spec)
    tname = types if isinstance(types, str) else (types.get("default", "mixed") if types else "F32")
    name = gguf_name or f"{spec.name}-{str(tname).lower()}.gguf"
    paths = write_gguf(model, mtp, tok, spec, out_dir / name, types=types, split_max_tensors=split_max_tensors,
                       match_hf=match_hf)
    hf_dir = out_dir / "hf"
    if save_hf_dir:
        save_hf(model, mtp, tok, hf_dir)
    return TestModel(spec=spec, gguf_path=paths[0], gguf_paths=list(paths), hf_dir=hf_dir, hf_model=model,
                     mtp_model=mtp, tokenizer=tok, types=types)


# ----------------------------------------------------------------------------- CLI

def _parse_types(s: str):
    if "=" not in s:
        return s.upper()
    out = {}
    for part in s.split(","):
        k, _, v = part.partition("=")
        out[k.strip()] = v.strip().upper()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.testmodel",
                                description="Write a small random GLM-4.x MoE model (GGUF + transformers checkpoint).")
    p.add_argument("out_dir")
    p.add_argument("--types", default="F32",
                   help="one type for all (F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1) or GROUP=TYPE,... "
                        f"with groups {', '.join(TYPE_GROUPS)} or tensor base names (e.g. ffn_down_exps=Q8_0)")
    p.add_argument("--layers", type=int, help="main layers")
    p.add_argument("--dense", type=int, help="leading dense blocks")
    p.add_argument("--hidden", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--expert-ffn", type=int)
    p.add_argument("--dense-ffn", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--nextn", type=int, help="MTP layers (0 = none)")
    p.add_argument("--no-qk-norm", action="store_true")
    p.add_argument("--scaling", type=float, help="routed scaling factor")
    p.add_argument("--bias-scale", type=float, help="std of the expert selection bias")
    p.add_argument("--vocab", type=int, help="vocabulary size target")
    p.add_argument("--ctx", type=int, help="context length")
    p.add_argument("--seed", type=int)
    p.add_argument("--omit-nextn-embed-head", action="store_true")
    p.add_argument("--split-max-tensors", type=int)
    p.add_argument("--match-hf", action="store_true", help="transformers weights = dequantized GGUF weights")
    p.add_argument("--no-hf", action="store_true", help="do not save the transformers checkpoint")
    a = p.parse_args(argv)
    kw = {k: v for k, v in dict(
        n_layers=a.layers, n_dense=a.dense, hidden=a.hidden, n_experts=a.experts, top_k=a.top_k,
        expert_ffn=a.expert_ffn, dense_ffn=a.dense_ffn, n_heads=a.heads, n_kv_heads=a.kv_heads,
        head_dim=a.head_dim, n_nextn=a.nextn, routed_scaling=a.scaling, selection_bias_scale=a.bias_scale,
        vocab_target=a.vocab, context_length=a.ctx, seed=a.seed).items() if v is not None}
    if a.no_qk_norm:
        kw["qk_norm"] = False
    if a.omit_nextn_embed_head:
        kw["nextn_embed_head"] = "omit"
    try:
        spec = TestModelSpec(**kw)
        spec.validate()
        tm = write_test_model(spec, a.out_dir, types=_parse_types(a.types), split_max_tensors=a.split_max_tensors,
                              match_hf=a.match_hf, save_hf_dir=not a.no_hf)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for pth in tm.gguf_paths:
        print(pth)
    if not a.no_hf:
        print(tm.hf_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
