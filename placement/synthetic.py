"""Tensor tables of the real GLM-4.x shapes without the weights, to validate plans and estimate
memory for models that are not on this machine.

`synthetic_model("glm45-air", mix="Q4_K_M")` returns an object with the parts of `GGUFFile` that
`read_config`, `resolve` and `estimate_memory` use: `path`, `metadata`, `architecture`, `tensors`
(name -> SyntheticTensor with name, ggml_type, shape, nbytes, n_elements, type_name). There is no
data: `raw()` raises, and identity of the nextn embedding/head copies is carried by `content_key`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from runtime.config import MLA_ARCH, ModelConfig, expected_tensors

# The published shapes (the Hugging Face config.json of each model).
_COMMON = dict(n_vocab=151552, n_nextn=1, n_heads=96, n_kv_heads=8, head_dim=128, rope_dim=64,
               rope_base=1e6, rms_eps=1e-5, n_experts_used=8, n_shared=1, weights_norm=True, attn_bias=True)
GLM_SHAPES: dict[str, ModelConfig] = {
    "glm45-air": ModelConfig(**_COMMON, hidden=4096, n_layers=46, dense_ffn=10944, expert_ffn=1408,
                             n_experts=128, n_dense=1, weights_scale=1.0, context_length=131072, qk_norm=False),
    "glm45": ModelConfig(**_COMMON, hidden=5120, n_layers=92, dense_ffn=12288, expert_ffn=1536,
                         n_experts=160, n_dense=3, weights_scale=2.5, context_length=131072, qk_norm=True),
}
GLM_SHAPES["glm46"] = replace(GLM_SHAPES["glm45"], context_length=202752)
GLM_SHAPES["glm47"] = GLM_SHAPES["glm46"]
# GLM-4.7-Flash (Glm4MoeLiteForCausalLM, a deepseek2 file): latent attention, the cache's one
# "head" the kv latent (512) and the shared rope key (64)
GLM_SHAPES["glm47-flash"] = ModelConfig(
    n_vocab=154880, n_nextn=1, n_heads=20, n_kv_heads=1, head_dim=576, rope_dim=64, rope_base=1e6, rms_eps=1e-5,
    n_experts_used=4, n_shared=1, weights_norm=True, attn_bias=False, hidden=2048, n_layers=47, dense_ffn=10240,
    expert_ffn=1536, n_experts=64, n_dense=1, weights_scale=1.8, context_length=202752, qk_norm=False,
    mla=True, q_lora_rank=768, kv_lora_rank=512, nope_dim=192, v_dim=256, arch=MLA_ARCH)

MIXES = ("Q4_K_M", "Q8_0", "BF16")

_FLOAT = ("norm.weight", ".bias", "ffn_gate_inp.weight")
# llama.cpp's fallback when a row is not a multiple of 256 (k-quants' block).
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q3_K: T.IQ4_NL, T.Q2_K: T.Q4_0}


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits(i_layer, n_layers): the layers Q4_K_M gives Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_type(name: str, shape: tuple[int, ...], cfg: ModelConfig, mix: str) -> T:
    """The type a llama.cpp-style quantization `mix` gives tensor `name` (simplified, realistic)."""
    if name.endswith(_FLOAT) or len(shape) == 1:
        return T.F32
    if mix == "BF16":
        return T.BF16
    if mix == "Q8_0":
        t = T.Q8_0
    elif mix == "Q4_K_M":
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        more = layer >= 0 and _more_bits(layer, cfg.n_blocks)
        if name == "output.weight" or name.endswith("shared_head_head.weight"):
            t = T.Q6_K
        elif name.endswith(("attn_v.weight", "ffn_down.weight", "ffn_down_exps.weight", "ffn_down_shexp.weight")):
            t = T.Q6_K if more else T.Q4_K
        else:
            t = T.Q4_K
    else:
        raise ValueError(f"unknown mix {mix!r}; expected one of {', '.join(MIXES)}")
    while shape[-1] % GGML_QUANT_SIZES[t][0]:
        t = _FALLBACK.get(t, T.Q8_0 if t != T.Q8_0 else T.F16)
    return t


@dataclass
class SyntheticTensor:
    name: str
    ggml_type: T
    shape: tuple[int, ...]
    nbytes: int
    content_key: str

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    def raw(self):
        raise RuntimeError(f"{self.name}: a synthetic tensor table has no data")


class SyntheticModel:
    def __init__(self, label: str, metadata: dict, tensors: dict[str, SyntheticTensor]):
        self.path = label
        self.metadata = metadata
        self.tensors = tensors

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture"))

    def get(self, key, default=None):
        return self.metadata.get(key, default)

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def config_metadata(cfg: ModelConfig) -> dict:
    a = cfg.arch
    mla = {f"{a}.attention.q_lora_rank": cfg.q_lora_rank, f"{a}.attention.kv_lora_rank": cfg.kv_lora_rank,
           f"{a}.attention.key_length_mla": cfg.nope_dim + cfg.rope_dim,
           f"{a}.attention.value_length_mla": cfg.v_dim} if cfg.mla else {}
    return mla | {
        "general.architecture": a,
        f"{a}.block_count": cfg.n_blocks, f"{a}.nextn_predict_layers": cfg.n_nextn,
        f"{a}.embedding_length": cfg.hidden, f"{a}.feed_forward_length": cfg.dense_ffn,
        f"{a}.expert_feed_forward_length": cfg.expert_ffn, f"{a}.expert_count": cfg.n_experts,
        f"{a}.expert_used_count": cfg.n_experts_used, f"{a}.expert_shared_count": cfg.n_shared,
        f"{a}.leading_dense_block_count": cfg.n_dense, f"{a}.expert_gating_func": 2,
        f"{a}.expert_weights_scale": cfg.weights_scale, f"{a}.expert_weights_norm": cfg.weights_norm,
        f"{a}.attention.head_count": cfg.n_heads, f"{a}.attention.head_count_kv": cfg.n_kv_heads,
        f"{a}.attention.key_length": cfg.head_dim,
        f"{a}.attention.value_length": cfg.kv_lora_rank if cfg.mla else cfg.head_dim,
        f"{a}.attention.layer_norm_rms_epsilon": cfg.rms_eps, f"{a}.rope.dimension_count": cfg.rope_dim,
        f"{a}.rope.freq_base": cfg.rope_base, f"{a}.context_length": cfg.context_length,
    }


def synthetic_model(model: str | ModelConfig, mix: str = "Q4_K_M", nextn_copies: str = "missing") -> SyntheticModel:
    """A tensor table of `model` (a GLM_SHAPES name or a ModelConfig) quantized with `mix`.

    nextn_copies: "missing" (GLM-4.6/4.7 files), "identical" (GLM-4.5 files: copies of token_embd /
    output), or "different" (own tensors).
    """
    cfg = GLM_SHAPES[model] if isinstance(model, str) else model
    label = model if isinstance(model, str) else "model"
    tensors: dict[str, SyntheticTensor] = {}
    for name, (shape, required) in expected_tensors(cfg).items():
        if not required and "nextn." in name and nextn_copies == "missing":
            continue
        t = mix_type(name, shape, cfg, mix)
        key = name
        if "nextn." in name and nextn_copies == "identical":
            main = "token_embd.weight" if "embed_tokens" in name else "output.weight"
            t, key = mix_type(main, shape, cfg, mix), main
        block, size = GGML_QUANT_SIZES[t]
        n = int(np.prod(shape))
        tensors[name] = SyntheticTensor(name, t, tuple(shape), n // block * size, key)
    return SyntheticModel(f"<synthetic {label} {mix}>", config_metadata(cfg), tensors)


def synthetic_tensor_table(cfg: ModelConfig | str, mix: str = "Q4_K_M", nextn_copies: str = "missing"):
    """Alias of `synthetic_model` (name used in the issue)."""
    return synthetic_model(cfg, mix, nextn_copies)
