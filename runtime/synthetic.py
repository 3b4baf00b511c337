"""Synthetic GLM-4.x GGUF files: the real GLM-4.5-Air / GLM-4.7 shapes and quantization mixes with
random but valid quantized blocks, written straight as bytes (no float intermediate), for
benchmarks of models that are not on this machine.

    python -m runtime.synthetic air.gguf --shape glm45-air --layers 4 --mix q4k_q5_0
    write_synthetic("air.gguf", shape="glm45-air", layers=4)        # -> Path

Shapes come from `placement.GLM_SHAPES` (the published config.json shapes; glm47-flash is a
deepseek2 file with latent attention) with the main layer count replaced
(the leading dense blocks of the real model kept while `layers` leaves room for at least one MoE
block) and one nextn (MTP) block. Mixes (what published llama.cpp quants hold; rows that are not a
multiple of 256, like GLM-4.5-Air's expert width 1408 in ffn_down_exps, fall back to 32-element
types as llama.cpp's quantizer does):

  q4k_q5_0     llama.cpp Q4_K_M: Q4_K, with Q6_K for attn_v / ffn_down in the "more bits" layers and
               the head; Air's ffn_down_exps fall back to Q5_0 (Q8_0 where Q6_K was chosen)
  q8_0         Q8_0 everywhere
  iq4xs_iq4nl  IQ4_XS (IQ4_NL where rows are not a multiple of 256), head Q6_K
  q2k_q3k      Q2_K-like: experts gate/up Q2_K, down Q3_K (Air: Q4_0 / IQ4_NL fallbacks),
               attention and embedding Q4_K, head Q6_K

Norms, biases and routers are F32. Quantized blocks are random bytes whose fp16 scale fields are
set small and finite (|w| ~ 0.5/sqrt(row length)), so the model runs without NaN or inf. The
tokenizer has the real vocabulary size: 256 byte tokens, a handful of merges, placeholder normal
tokens (" w1234"), GLM's special tokens and [PAD] tokens at the end, as the real file lays them out.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from .config import ModelConfig, expected_tensors
from .errors import NextnError
from .testmodel import add_tokenizer_metadata

SHAPES = ("glm45-air", "glm47", "glm47-flash")
MIXES = ("q4k_q5_0", "q8_0", "iq4xs_iq4nl", "q2k_q3k")
_MIX_ALIASES = {"q4_k_m": "q4k_q5_0", "q4k": "q4k_q5_0", "iq4_xs": "iq4xs_iq4nl", "q2_k": "q2k_q3k"}
_FILE_TYPE = {"q4k_q5_0": 15, "q8_0": 7, "iq4xs_iq4nl": 30, "q2k_q3k": 10}

# llama.cpp's fallback when a row is not a multiple of the 256-element super-block.
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q3_K: T.IQ4_NL, T.Q2_K: T.Q4_0,
             T.IQ4_XS: T.IQ4_NL}
# fp16 fields of each block: (byte offset, kind) with kind d = scale, m = min; and the typical
# |integer factor| a unit of d multiplies, so that d = s / factor gives |w| ~ s (cpu_kernels.quant).
_HALF_FIELDS = {
    T.Q8_0: ((0, "d"),), T.Q4_0: ((0, "d"),), T.Q4_1: ((0, "d"), (2, "m")), T.Q5_0: ((0, "d"),),
    T.Q5_1: ((0, "d"), (2, "m")), T.IQ4_NL: ((0, "d"),), T.Q2_K: ((80, "d"), (82, "m")),
    T.Q3_K: ((108, "d"),), T.Q4_K: ((0, "d"), (2, "m")), T.Q5_K: ((0, "d"), (2, "m")),
    T.Q6_K: ((208, "d"),), T.IQ4_XS: ((0, "d"),),
}
_INT_RANGE = {T.Q8_0: 64, T.Q4_0: 4, T.Q4_1: 8, T.Q5_0: 8, T.Q5_1: 16, T.IQ4_NL: 64, T.Q2_K: 12,
              T.Q3_K: 32, T.Q4_K: 240, T.Q5_K: 500, T.Q6_K: 2048, T.IQ4_XS: 1024}
_MIN_RANGE = {T.Q4_1: 1, T.Q5_1: 1, T.Q2_K: 8, T.Q4_K: 32, T.Q5_K: 32}

# GLM-4.5 special tokens (control) and added non-special tokens (user-defined), as in the real file.
SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                  "<|begin_of_video|>", "<|end_of_video|>"]
USER_DEFINED_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
                       "</tool_response>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"]
_REAL_VOCAB, _REAL_FIRST_SPECIAL = 151552, 151329
_MERGES = ["Ġ t", "h e", "i n", "e r", "Ġ a", "o n", "r e", "Ġt he", "e n", "a t", "o r", "Ġ s", "e s",
           "Ġ w", "Ġ c", "i s", "i t", "Ġ o", "Ġ f", "e d", "a n", "Ġ b", "Ġ p", "a r", "d e", "Ġ (", "Ġ =",
           "Ġ Ġ", "ĠĠ ĠĠ", "Ċ Ġ", "Ġ d", "e f", "Ġd ef", "u r", "Ġ i", "Ġ in", "Ġ m", "o u", "a l", "Ġ n"]


class SyntheticError(NextnError, ValueError):
    pass


def _mix_name(mix: str) -> str:
    m = mix.lower()
    m = _MIX_ALIASES.get(m, m)
    if m not in MIXES:
        raise SyntheticError(f"unknown mix {mix!r}: expected one of {', '.join(MIXES)}")
    return m


def synthetic_config(shape: str = "glm45-air", layers: int = 4, nextn: bool = True,
                     vocab: int | None = None) -> ModelConfig:
    """The real `shape` (placement.GLM_SHAPES) with `layers` main layers and 0/1 nextn layer."""
    from placement.synthetic import GLM_SHAPES

    if shape not in GLM_SHAPES or shape not in SHAPES + ("glm45", "glm46"):
        raise SyntheticError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")
    if not isinstance(layers, int) or layers < 1:
        raise SyntheticError(f"layers must be a positive integer, got {layers!r}")
    base = GLM_SHAPES[shape]
    n_vocab = base.n_vocab if vocab is None else int(vocab)
    min_vocab = 256 + len(_MERGES) + len(SPECIAL_TOKENS) + len(USER_DEFINED_TOKENS)
    if n_vocab < min_vocab:
        raise SyntheticError(f"vocab {n_vocab} is too small (at least {min_vocab}: bytes, merges, special tokens)")
    # keep the real leading dense blocks while at least one MoE block remains
    n_dense = min(base.n_dense, layers - 1)
    return replace(base, n_layers=layers, n_nextn=1 if nextn else 0, n_dense=n_dense, n_vocab=n_vocab)


def tensor_type(name: str, shape: tuple[int, ...], cfg: ModelConfig, mix: str) -> T:
    """The GGML type `mix` gives tensor `name` of `shape` in a model of `cfg`."""
    from placement.synthetic import mix_type

    mix = _mix_name(mix)
    if name.endswith(("norm.weight", ".bias", "ffn_gate_inp.weight")) or len(shape) == 1:
        return T.F32
    if mix == "q4k_q5_0":
        return mix_type(name, shape, cfg, "Q4_K_M")
    if mix == "q8_0":
        return mix_type(name, shape, cfg, "Q8_0")
    head = name == "output.weight" or name.endswith("shared_head_head.weight")
    if mix == "iq4xs_iq4nl":
        t = T.Q6_K if head else T.IQ4_XS
    else:  # q2k_q3k
        if head:
            t = T.Q6_K
        elif name.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight")):
            t = T.Q2_K
        elif name.endswith("ffn_down_exps.weight"):
            t = T.Q3_K
        else:
            t = T.Q4_K
    while shape[-1] % GGML_QUANT_SIZES[t][0]:
        t = _FALLBACK.get(t, T.Q8_0 if t != T.Q8_0 else T.F16)
    return t


def random_quant_bytes(t: T, shape: tuple[int, ...], bitgen: np.random.BitGenerator, scale: float) -> np.ndarray:
    """Random but valid blocks of type `t` for logical `shape` (uint8 [..., row_bytes]): random bits from
    the bit generator directly (~2 GB/s), fp16 scale fields set to finite values around `scale`."""
    be, bb = GGML_QUANT_SIZES[t]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    nblk = rows * (shape[-1] // be)
    n = nblk * bb
    raw = bitgen.random_raw((n + 7) // 8).view(np.uint8)[:n]
    blocks = raw.reshape(nblk, bb)
    u = bitgen.random_raw(nblk)  # per-block factor in [0.5, 1.5)
    f = 0.5 + (u >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    for off, kind in _HALF_FIELDS[t]:
        base = scale / (_INT_RANGE[t] if kind == "d" else _MIN_RANGE[t])
        blocks[:, off:off + 2] = (base * f).astype(np.float16).view(np.uint8).reshape(nblk, 2)
    return blocks.reshape(tuple(shape[:-1]) + (shape[-1] // be * bb,))


def _float_tensor(name: str, shape, rng: np.random.Generator) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float32)
    if name.endswith("exp_probs_b.bias"):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.01).astype(np.float32)
    if name.endswith(".bias"):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    # the router [E, H] and anything else kept in float
    return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(np.float32)


def tokenizer_metadata(n_vocab: int) -> dict:
    """tokenizer.* keys of a GLM-4.x-like byte-level BPE vocabulary of exactly `n_vocab` tokens."""
    from .testmodel import CHAT_TEMPLATE
    from .tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    types = [1] * 256
    seen = set(tokens)
    for m in _MERGES:
        a, b = m.split(" ")
        tokens.append(a + b)
        types.append(1)
        seen.add(a + b)
    n_added = len(SPECIAL_TOKENS) + len(USER_DEFINED_TOKENS)
    first_special = _REAL_FIRST_SPECIAL if n_vocab >= _REAL_VOCAB else n_vocab - n_added
    i = 0
    while len(tokens) < first_special:
        t = f"Ġw{i}"
        i += 1
        if t not in seen:
            tokens.append(t)
            types.append(1)
    ids = {}
    for t in SPECIAL_TOKENS:
        ids[t] = len(tokens)
        tokens.append(t)
        types.append(3)  # CONTROL
    for t in USER_DEFINED_TOKENS:
        tokens.append(t)
        types.append(4)  # USER_DEFINED
    while len(tokens) < n_vocab:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(5)  # UNUSED
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "glm4",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": list(_MERGES),
        "tokenizer.ggml.eos_token_id": ids["<|endoftext|>"], "tokenizer.ggml.padding_token_id": ids["<|endoftext|>"],
        "tokenizer.ggml.bos_token_id": ids["[gMASK]"], "tokenizer.ggml.eot_token_id": ids["<|user|>"],
        "tokenizer.ggml.unknown_token_id": ids["<|endoftext|>"], "tokenizer.ggml.eom_token_id": ids["<|observation|>"],
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def tensor_plan(cfg: ModelConfig, mix: str, nextn_copies: bool) -> list[tuple[str, tuple[int, ...], T, str | None]]:
    """[(name, numpy shape, type, copy_of)]: token_embd, output_norm, output, then the blocks in order."""
    out = []
    exp = expected_tensors(cfg)
    order = ["token_embd.weight", "output_norm.weight", "output.weight"] + [n for n in exp if n.startswith("blk.")]
    for name in order:
        shape, required = exp[name]
        copy_of = None
        if not required and "nextn." in name:
            if not nextn_copies:
                continue
            copy_of = "token_embd.weight" if "embed_tokens" in name else "output.weight"
        t = tensor_type(copy_of or name, shape, cfg, mix)
        out.append((name, tuple(shape), t, copy_of))
    return out


def write_synthetic(path, shape: str = "glm45-air", layers: int = 4, mix: str = "q4k_q5_0", nextn: bool = True,
                    vocab: int | None = None, seed: int = 0, nextn_copies: bool | None = None,
                    progress: bool = False) -> Path:
    """Write a synthetic `shape` GGUF with `layers` main layers to `path`; returns the path.

    nextn_copies: write blk.L.nextn.embed_tokens / shared_head_head as byte copies of token_embd /
    output (GLM-4.5 files do; GLM-4.6/4.7 files do not). Default: True for glm45-air, else False.
    """
    import gguf

    mix = _mix_name(mix)
    cfg = synthetic_config(shape, layers, nextn, vocab)
    if nextn_copies is None:
        nextn_copies = shape in ("glm45-air", "glm45")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = tensor_plan(cfg, mix, nextn_copies and nextn)

    A = cfg.arch
    w = gguf.GGUFWriter(path, A)
    w.add_type("model")
    w.add_name(f"synthetic {shape} {layers}L {mix}")
    w.add_uint32(f"{A}.block_count", cfg.n_blocks)
    w.add_uint32(f"{A}.context_length", cfg.context_length)
    w.add_uint32(f"{A}.embedding_length", cfg.hidden)
    w.add_uint32(f"{A}.feed_forward_length", cfg.dense_ffn)
    w.add_uint32(f"{A}.attention.head_count", cfg.n_heads)
    w.add_uint32(f"{A}.attention.head_count_kv", cfg.n_kv_heads)
    w.add_float32(f"{A}.rope.freq_base", float(cfg.rope_base))
    w.add_float32(f"{A}.attention.layer_norm_rms_epsilon", float(cfg.rms_eps))
    w.add_uint32(f"{A}.expert_count", cfg.n_experts)
    w.add_uint32(f"{A}.expert_used_count", cfg.n_experts_used)
    w.add_uint32(f"{A}.expert_group_count", 1)
    w.add_uint32(f"{A}.expert_group_used_count", 1)
    w.add_uint32(f"{A}.attention.key_length", cfg.head_dim)
    w.add_uint32(f"{A}.attention.value_length", cfg.kv_lora_rank if cfg.mla else cfg.head_dim)
    if cfg.mla:  # GLM-4.7-Flash as llama.cpp's converter writes it (runtime/config.py, _mla_dims)
        w.add_uint32(f"{A}.attention.q_lora_rank", cfg.q_lora_rank)
        w.add_uint32(f"{A}.attention.kv_lora_rank", cfg.kv_lora_rank)
        w.add_uint32(f"{A}.attention.key_length_mla", cfg.nope_dim + cfg.rope_dim)
        w.add_uint32(f"{A}.attention.value_length_mla", cfg.v_dim)
        w.add_uint32(f"{A}.vocab_size", cfg.n_vocab)
    w.add_uint32("general.file_type", _FILE_TYPE[mix])
    w.add_uint32(f"{A}.rope.dimension_count", cfg.rope_dim)
    w.add_uint32(f"{A}.expert_feed_forward_length", cfg.expert_ffn)
    w.add_uint32(f"{A}.expert_shared_count", cfg.n_shared)
    w.add_uint32(f"{A}.leading_dense_block_count", cfg.n_dense)
    # written for deepseek2 too (real GLM-4.7-Flash files lack it): llama.cpp would read a file
    # without it at fewer than 47 layers as softmax-routed, and a peer benchmark must run one model
    w.add_uint32(f"{A}.expert_gating_func", 2)
    w.add_float32(f"{A}.expert_weights_scale", float(cfg.weights_scale))
    w.add_bool(f"{A}.expert_weights_norm", bool(cfg.weights_norm))
    w.add_uint32(f"{A}.nextn_predict_layers", cfg.n_nextn)
    w.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    tm = tokenizer_metadata(cfg.n_vocab)
    add_tokenizer_metadata(w, tm)

    for name, shp, t, _ in tensors:
        be, bb = GGML_QUANT_SIZES[t]
        if t == T.F32:
            w.add_tensor_info(name, shp, np.dtype(np.float32), int(np.prod(shp)) * 4)
        else:
            byte_shape = tuple(shp[:-1]) + (shp[-1] // be * bb,)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    rng = np.random.default_rng(seed)
    written: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    total = sum(int(np.prod(s)) * (4 if t == T.F32 else 1) for _, s, t, _ in tensors)
    done = 0
    for i, (name, shp, t, copy_of) in enumerate(tensors):
        if copy_of is not None:
            data = written[copy_of] if copy_of in written else None
            if data is None:
                raise RuntimeError(f"{name}: copy source {copy_of} not written before it")
        elif t == T.F32:
            data = _float_tensor(name, shp, rng)
        else:
            bitgen = np.random.SFC64(np.random.SeedSequence([seed, i]))
            data = random_quant_bytes(t, shp, bitgen, scale=0.5 / np.sqrt(shp[-1]))
        if name in ("token_embd.weight", "output.weight") and nextn_copies and nextn:
            written[name] = data
        w.write_tensor_data(data)
        done += int(np.prod(shp)) * (4 if t == T.F32 else 1)
        if progress and (sys.stderr.isatty() or name.endswith("_exps.weight")):
            print(f"\r  {done / total:6.1%}  {name:<40}", end="" if sys.stderr.isatty() else "\n",
                  file=sys.stderr, flush=True)
    w.close()
    if progress:
        size = path.stat().st_size
        print(f"\rwrote {path} ({size / 2**30:.2f} GiB, {len(tensors)} tensors) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.synthetic",
                                description="Write a GLM-4.x-shaped GGUF with random but valid quantized weights.")
    p.add_argument("out", metavar="OUT.gguf")
    p.add_argument("--shape", choices=SHAPES, default="glm45-air")
    p.add_argument("--layers", type=int, default=4, help="main layers (default 4); one nextn layer is added")
    p.add_argument("--mix", default="q4k_q5_0", help=f"type mix: {', '.join(MIXES)}")
    p.add_argument("--nextn", action=argparse.BooleanOptionalAction, default=True, help="add the nextn (MTP) layer")
    p.add_argument("--nextn-copies", action=argparse.BooleanOptionalAction, default=None,
                   help="write nextn.embed_tokens/shared_head_head copies (default: as the real files: glm45-air yes)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the real 151552)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        write_synthetic(a.out, shape=a.shape, layers=a.layers, mix=a.mix, nextn=a.nextn, vocab=a.vocab, seed=a.seed,
                        nextn_copies=a.nextn_copies, progress=True)
    except SyntheticError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
