"""The GLM-4.x model contract: hyperparameters from GGUF metadata and the tensors a file must hold,
with their shapes. Loading checks a file against this before touching weights.

Two architectures, as llama.cpp's converter writes them: `glm4moe` (GLM-4.5/4.6/4.7: GQA
attention) and `deepseek2` (GLM-4.7-Flash, `Glm4MoeLiteForCausalLM`: multi-head latent
attention, MLA). Both have the same sigmoid-routed MoE, shared expert, leading dense blocks and
MTP block; only the attention and a norm's name differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as T

import math

from .errors import ModelFileError, short
from .gguf_file import GGUFFile

ARCH = "glm4moe"
MLA_ARCH = "deepseek2"  # GLM-4.7-Flash

# Tensor types accepted anywhere in a model file (issue 2).
SUPPORTED_TYPES = frozenset({
    T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS,
})


@dataclass(frozen=True)
class ModelConfig:
    n_vocab: int
    hidden: int
    n_layers: int  # main decoder layers (block_count - nextn_predict_layers)
    n_nextn: int  # MTP layers present in the file (0 or 1 in practice)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_dim: int
    rope_base: float
    rms_eps: float
    dense_ffn: int
    expert_ffn: int
    n_experts: int
    n_experts_used: int
    n_shared: int
    n_dense: int  # leading dense blocks
    weights_scale: float
    weights_norm: bool
    context_length: int
    qk_norm: bool
    attn_bias: bool
    # multi-head latent attention (deepseek2 files: GLM-4.7-Flash). The KV cache holds one latent
    # "head" a position: the normed kv latent (kv_lora_rank) and the rotated shared rope key
    # (rope_dim), which is `head_dim` (the file's key_length) with n_kv_heads = 1; the values are
    # the latent itself, so the cache keeps no V (cache_v_dim 0)
    mla: bool = False
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    nope_dim: int = 0  # per-head q/k dims without RoPE (key_length_mla - rope_dim)
    v_dim: int = 0  # per-head value dims after the latent's up-projection (value_length_mla)
    arch: str = ARCH
    gating_assumed: bool = False  # no expert_gating_func in the file: sigmoid assumed (GLM-4.7-Flash)

    @property
    def cache_v_dim(self) -> int:
        return 0 if self.mla else self.head_dim

    @property
    def attn_scale(self) -> float:
        """Softmax scale: head_dim^-0.5; with MLA (nope + rope dims)^-0.5, the size of the
        per-head q.k product the latent form computes."""
        return (self.nope_dim + self.rope_dim) ** -0.5 if self.mla else self.head_dim ** -0.5

    @property
    def n_blocks(self) -> int:
        return self.n_layers + self.n_nextn

    def is_moe(self, layer: int) -> bool:
        return layer >= self.n_dense


# Bounds on hyperparameters, far past any GLM-4.x (GLM-4.5: 93 blocks, hidden 5120, 160 experts):
# a damaged value fails here with its key rather than as a huge loop or allocation later.
_INT_MAX = {"block_count": 4096, "nextn_predict_layers": 16, "embedding_length": 1 << 20,
            "attention.head_count": 4096, "attention.head_count_kv": 4096, "attention.key_length": 1 << 16,
            "rope.dimension_count": 1 << 16, "feed_forward_length": 1 << 24,
            "expert_feed_forward_length": 1 << 24, "expert_count": 1 << 16, "expert_used_count": 1 << 16,
            "expert_shared_count": 1 << 10, "leading_dense_block_count": 4096, "context_length": 1 << 32,
            "expert_gating_func": 1 << 10, "expert_group_count": 1 << 16,
            "attention.q_lora_rank": 1 << 16, "attention.kv_lora_rank": 1 << 16,
            "attention.key_length_mla": 1 << 16, "attention.value_length_mla": 1 << 16,
            "attention.value_length": 1 << 16}
_POSITIVE = {"block_count", "embedding_length", "attention.head_count", "attention.head_count_kv",
             "attention.key_length", "expert_count", "expert_used_count", "context_length"}


def _key(f: GGUFFile, name: str, default=None, required=True):
    """A metadata value of the right kind: a whole number within _INT_MAX for the sizes above, a
    finite number for the floats (a bool for expert_weights_norm), else a one-line error."""
    k = f"{f.architecture}.{name}"
    if k not in f.metadata:
        if required and default is None:
            raise ModelFileError(f"{f.path}: missing metadata key {k}")
        return default
    v = f.metadata[k]
    if name == "expert_weights_norm":
        if type(v) is not bool and not (type(v) is int and v in (0, 1)):
            raise ModelFileError(f"{f.path}: {k} is {short(v)}; expected a bool")
        return bool(v)
    if name in _INT_MAX:
        lo = 2 if name == "context_length" else 1 if name in _POSITIVE else 0
        if type(v) is not int or not lo <= v <= _INT_MAX[name]:
            raise ModelFileError(f"{f.path}: {k} is {short(v)}; expected a whole number in {lo}..{_INT_MAX[name]}")
        return v
    if type(v) not in (int, float) or not math.isfinite(v):
        raise ModelFileError(f"{f.path}: {k} is {short(v)}; expected a finite number")
    return v


def read_config(f: GGUFFile) -> ModelConfig:
    arch = f.architecture
    if arch not in (ARCH, MLA_ARCH):
        raise ModelFileError(f"{f.path}: architecture is {short(arch)}, nextn runs '{ARCH}' (GLM-4.5/4.6/4.7) and "
                             f"'{MLA_ARCH}' (GLM-4.7-Flash) models")
    mla = arch == MLA_ARCH
    blocks = int(_key(f, "block_count"))
    n_nextn = int(_key(f, "nextn_predict_layers", 0))
    hidden = int(_key(f, "embedding_length"))
    n_heads = int(_key(f, "attention.head_count"))
    head_dim = int(_key(f, "attention.key_length", max(hidden // n_heads, 1)))
    # GLM-4.7-Flash files carry no expert_gating_func (its config.json has no scoring_func):
    # sigmoid, as llama.cpp assumes for them (it tells them by 47/48 layers and a 154,880-token
    # vocabulary; here by the GLM tokenizer). DeepSeek-V2's files lack the key too, and mean softmax.
    gating_key = _key(f, "expert_gating_func", None, required=False)
    if gating_key is None and mla and f.metadata.get("tokenizer.ggml.pre") != "glm4":
        raise ModelFileError(f"{f.path}: a {arch} file with no {arch}.expert_gating_func and no GLM tokenizer "
                             f"(tokenizer.ggml.pre 'glm4'): DeepSeek-V2's softmax router, not supported "
                             f"(GLM-4.7-Flash files load)")
    gating = 2 if gating_key is None else int(gating_key)
    if gating != 2:
        why = " (DeepSeek-V2's softmax router: only GLM-4.7-Flash's deepseek2 files are supported)" if mla else ""
        raise ModelFileError(f"{f.path}: {arch}.expert_gating_func is {gating}; GLM-4.x uses 2 (sigmoid){why}")
    groups = int(_key(f, "expert_group_count", 1))
    if groups > 1:
        raise ModelFileError(f"{f.path}: {arch}.expert_group_count {groups} > 1 (grouped routing) is not supported")
    mla_dims = _mla_dims(f, head_dim) if mla else {}
    emb = f.tensors.get("token_embd.weight")
    if emb is None:
        raise ModelFileError(f"{f.path}: missing tensor token_embd.weight")
    if len(emb.shape) != 2:
        raise ModelFileError(f"{f.path}: tensor token_embd.weight has shape {list(emb.shape)}, expected 2 dims")
    n_vocab = emb.shape[0]
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and (not isinstance(tokens, list) or len(tokens) != n_vocab):
        raise ModelFileError(
            f"{f.path}: tokenizer.ggml.tokens has {len(tokens) if isinstance(tokens, list) else short(tokens)} "
            f"tokens but token_embd.weight has {n_vocab} rows")
    n_layers = blocks - n_nextn
    if n_layers < 1 or n_nextn < 0:
        raise ModelFileError(f"{f.path}: block_count {blocks} with nextn_predict_layers {n_nextn} leaves no main layer")
    cfg = ModelConfig(
        n_vocab=n_vocab,
        hidden=hidden,
        n_layers=n_layers,
        n_nextn=n_nextn,
        n_heads=n_heads,
        n_kv_heads=int(_key(f, "attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        rope_dim=int(_key(f, "rope.dimension_count", head_dim)),
        rope_base=float(_key(f, "rope.freq_base", 10000.0)),
        rms_eps=float(_key(f, "attention.layer_norm_rms_epsilon", 1e-5)),
        dense_ffn=int(_key(f, "feed_forward_length")),
        expert_ffn=int(_key(f, "expert_feed_forward_length")),
        n_experts=int(_key(f, "expert_count")),
        n_experts_used=int(_key(f, "expert_used_count")),
        n_shared=int(_key(f, "expert_shared_count", 0, required=False) or 0),
        n_dense=int(_key(f, "leading_dense_block_count", 0, required=False) or 0),
        weights_scale=float(_key(f, "expert_weights_scale", 1.0)),
        weights_norm=bool(_key(f, "expert_weights_norm", False, required=False)),
        context_length=int(_key(f, "context_length", 4096)),
        qk_norm="blk.0.attn_q_norm.weight" in f.tensors,
        attn_bias="blk.0.attn_q.bias" in f.tensors,
        arch=arch,
        gating_assumed=gating_key is None,
        **mla_dims,
    )
    if cfg.rope_base <= 0 or cfg.rms_eps < 0:
        raise ModelFileError(f"{f.path}: rope.freq_base {cfg.rope_base} / layer_norm_rms_epsilon {cfg.rms_eps} "
                             f"out of range")
    if cfg.mla and (cfg.n_kv_heads != 1 or cfg.rope_dim % 2 or cfg.rope_dim >= cfg.head_dim
                    or cfg.head_dim != cfg.kv_lora_rank + cfg.rope_dim):
        raise ModelFileError(f"{f.path}: {arch}.attention.head_count_kv {cfg.n_kv_heads}, key_length {cfg.head_dim} "
                             f"and rope.dimension_count {cfg.rope_dim} do not describe latent attention (expected 1 "
                             f"and kv_lora_rank {cfg.kv_lora_rank} + an even rope dimension)")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ModelFileError(f"{f.path}: head_count {cfg.n_heads} is not a multiple of head_count_kv {cfg.n_kv_heads}")
    if cfg.rope_dim > cfg.head_dim or cfg.rope_dim % 2:
        raise ModelFileError(f"{f.path}: rope.dimension_count {cfg.rope_dim} invalid for head dim {cfg.head_dim}")
    if not 0 < cfg.n_experts_used <= cfg.n_experts:
        raise ModelFileError(f"{f.path}: expert_used_count {cfg.n_experts_used} not in 1..{cfg.n_experts}")
    return cfg


def _mla_dims(f: GGUFFile, key_length: int) -> dict:
    """The latent attention's sizes (llama.cpp's converter: key_length = kv_lora_rank + rope dims,
    value_length = kv_lora_rank, key_length_mla = nope + rope dims, value_length_mla = v dims)."""
    arch = f.architecture
    q_rank = int(_key(f, "attention.q_lora_rank", 0, required=False) or 0)
    if q_rank < 1:  # as llama.cpp, which refuses a GLM deepseek2 file without it
        raise ModelFileError(f"{f.path}: missing metadata key {arch}.attention.q_lora_rank (GLM-4.7-Flash has a "
                             f"low-rank query projection)")
    kv_rank = int(_key(f, "attention.kv_lora_rank"))
    if int(_key(f, "attention.value_length", kv_rank)) != kv_rank:
        raise ModelFileError(f"{f.path}: {arch}.attention.value_length is not kv_lora_rank {kv_rank}: not a file of "
                             f"llama.cpp's latent-attention layout")
    rope = int(_key(f, "rope.dimension_count"))
    k_mla = int(_key(f, "attention.key_length_mla"))
    v_mla = int(_key(f, "attention.value_length_mla"))
    if k_mla <= rope or v_mla < 1 or kv_rank < 1:
        raise ModelFileError(f"{f.path}: {arch}.attention.key_length_mla {k_mla} must exceed rope.dimension_count "
                             f"{rope}, and value_length_mla {v_mla} and kv_lora_rank {kv_rank} be positive")
    scaling = f.metadata.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ModelFileError(f"{f.path}: {arch}.rope.scaling.type {short(scaling)} (YaRN context extension) is not "
                             f"supported yet")
    return {"mla": True, "q_lora_rank": q_rank, "kv_lora_rank": kv_rank, "nope_dim": k_mla - rope, "v_dim": v_mla}


def post_norm_name(cfg: ModelConfig) -> str:
    """The norm before a block's FFN: post_attention_norm (glm4moe), ffn_norm (deepseek2)."""
    return "ffn_norm.weight" if cfg.mla else "post_attention_norm.weight"


def block_tensors(cfg: ModelConfig, layer: int) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Expected tensors of block `layer`: name -> (numpy shape, required)."""
    H, D = cfg.hidden, cfg.head_dim
    q, kv = cfg.n_heads * D, cfg.n_kv_heads * D
    p = f"blk.{layer}."
    if cfg.mla:
        nh, R, rope = cfg.n_heads, cfg.kv_lora_rank, cfg.rope_dim
        t = {
            p + "attn_norm.weight": ((H,), True),
            p + "attn_q_a.weight": ((cfg.q_lora_rank, H), True),
            p + "attn_q_a_norm.weight": ((cfg.q_lora_rank,), True),
            p + "attn_q_b.weight": ((nh * (cfg.nope_dim + rope), cfg.q_lora_rank), True),
            p + "attn_kv_a_mqa.weight": ((R + rope, H), True),
            p + "attn_kv_a_norm.weight": ((R,), True),
            p + "attn_k_b.weight": ((nh, R, cfg.nope_dim), True),  # per head: latent <- nope (transposed)
            p + "attn_v_b.weight": ((nh, cfg.v_dim, R), True),  # per head: v <- latent
            p + "attn_output.weight": ((H, nh * cfg.v_dim), True),
            p + "ffn_norm.weight": ((H,), True),
        }
    else:
        t = _gqa_tensors(cfg, p, H, D, q, kv)
    return _ffn_tensors(cfg, layer, p, t)


def _gqa_tensors(cfg: ModelConfig, p: str, H: int, D: int, q: int, kv: int) -> dict:
    t = {
        p + "attn_norm.weight": ((H,), True),
        p + "attn_q.weight": ((q, H), True),
        p + "attn_k.weight": ((kv, H), True),
        p + "attn_v.weight": ((kv, H), True),
        p + "attn_output.weight": ((H, q), True),
        p + "post_attention_norm.weight": ((H,), True),
    }
    if cfg.attn_bias:
        t.update({p + "attn_q.bias": ((q,), True), p + "attn_k.bias": ((kv,), True), p + "attn_v.bias": ((kv,), True)})
    if cfg.qk_norm:
        t.update({p + "attn_q_norm.weight": ((D,), True), p + "attn_k_norm.weight": ((D,), True)})
    return t


def _ffn_tensors(cfg: ModelConfig, layer: int, p: str, t: dict) -> dict:
    H = cfg.hidden
    if not cfg.is_moe(layer):
        F = cfg.dense_ffn
        t.update({p + "ffn_gate.weight": ((F, H), True), p + "ffn_up.weight": ((F, H), True),
                  p + "ffn_down.weight": ((H, F), True)})
        return t
    E, I = cfg.n_experts, cfg.expert_ffn
    t.update({
        p + "ffn_gate_inp.weight": ((E, H), True),
        p + "exp_probs_b.bias": ((E,), True),
        p + "ffn_gate_exps.weight": ((E, I, H), True),
        p + "ffn_up_exps.weight": ((E, I, H), True),
        p + "ffn_down_exps.weight": ((E, H, I), True),
    })
    if cfg.n_shared:
        S = I * cfg.n_shared
        t.update({p + "ffn_gate_shexp.weight": ((S, H), True), p + "ffn_up_shexp.weight": ((S, H), True),
                  p + "ffn_down_shexp.weight": ((H, S), True)})
    if layer >= cfg.n_layers:  # the nextn (MTP) block
        t.update({
            p + "nextn.eh_proj.weight": ((H, 2 * H), True),
            p + "nextn.enorm.weight": ((H,), True),
            p + "nextn.hnorm.weight": ((H,), True),
            p + "nextn.shared_head_norm.weight": ((H,), True),
            p + "nextn.embed_tokens.weight": ((cfg.n_vocab, H), False),
            p + "nextn.shared_head_head.weight": ((cfg.n_vocab, H), False),
        })
    return t


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    t = {
        "token_embd.weight": ((cfg.n_vocab, cfg.hidden), True),
        "output_norm.weight": ((cfg.hidden,), True),
        "output.weight": ((cfg.n_vocab, cfg.hidden), False),  # absent: tied to token_embd
    }
    for layer in range(cfg.n_blocks):
        t.update(block_tensors(cfg, layer))
    return t


# Tensors that must stay in float (llama.cpp keeps them F32): norms, biases, the router.
_FLOAT_ONLY = ("norm.weight", ".bias", "ffn_gate_inp.weight")


def check_tensors(f: GGUFFile, cfg: ModelConfig) -> None:
    """Raise a one-line ModelFileError for the first missing, misshapen or unsupported tensor."""
    for name, (shape, required) in expected_tensors(cfg).items():
        info = f.tensors.get(name)
        if info is None:
            if required:
                raise ModelFileError(f"{f.path}: missing tensor {name} (expected shape {list(shape)})")
            continue
        if info.shape != shape:
            raise ModelFileError(f"{f.path}: tensor {name} has shape {list(info.shape)}, expected {list(shape)}")
        if info.ggml_type not in SUPPORTED_TYPES:
            raise ModelFileError(f"{f.path}: tensor {name} has unsupported type {info.type_name}")
        if name.endswith(_FLOAT_ONLY) and info.ggml_type not in (T.F32, T.F16, T.BF16):
            raise ModelFileError(f"{f.path}: tensor {name} is {info.type_name}; norms, biases and routers must be float")
