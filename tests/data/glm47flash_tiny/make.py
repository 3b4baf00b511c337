"""Rebuild the tiny GLM-4.7-Flash fixture: a random `Glm4MoeLiteForCausalLM` (transformers) with
one MTP layer, converted by llama.cpp's own `convert_hf_to_gguf.py` (architecture `deepseek2`),
and transformers' logits for three prompts.

    python tests/data/glm47flash_tiny/make.py --llama-cpp DIR [--glm4moe-fixture GGUF]

DIR: llama.cpp's source tree (the `vendor/llama.cpp` of the llama-cpp-python 0.3.36 source
distribution). The tokenizer is the 394-token GLM tokenizer of the glm4moe fixture
(../shared/fixtures/glm4moe-tiny), saved in transformers' form. The converter recognises a
pre-tokenizer by hashing a real vocabulary's output; a tiny vocabulary has no known hash, so it is
told "glm4" (what it writes for GLM-4.7-Flash). Written next to this file:

- `glm47flash-tiny-f32.gguf`: hidden 64, 3 main blocks (1 dense) and the MTP block, 4 heads,
  q_lora_rank 32, kv_lora_rank 32, nope 24 + rope 16 dims a head, values of 16 (every size its own, so a transposed weight cannot pass), 4 routed experts
  top-2 and a shared one, routed scaling 1.8, rms eps 1e-6 (transformers hard-codes 1e-6 in its
  two latent norms; with the file at 1e-6 too, both sides compute the same model).
- `reference.npz`: `ids{i}` and `hf{i}` ([len, vocab] logits of Glm4MoeLiteForCausalLM), and
  `mtp{i}` ([len-1, vocab]): the MTP block run with transformers' own modules, row p from the
  main model's final-norm hidden state at p and token ids[p+1] at position p+1 (the contract of
  `Engine.mtp_logits`); with llama-cpp-python installed (0.3.36, built from the same source),
  `llama{i}`: llama.cpp's logits (F32 KV cache). llama.cpp takes a deepseek2 file without
  expert_gating_func for sigmoid only at 47/48 layers and a 154,880-token vocabulary (real
  GLM-4.7-Flash files), softmax otherwise, so it reads a copy that says sigmoid (2).
  `--llama-only` adds these to an existing reference.npz.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
PROMPTS = ["def add(a, b):\n    return a + b", "import os", "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n"]


def hf_tokenizer(glm4moe: Path, out: Path):
    sys.path.insert(0, str(HERE.parents[2]))
    from transformers import PreTrainedTokenizerFast

    from runtime.gguf_file import GGUFFile
    from runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_metadata(GGUFFile(glm4moe).metadata)
    name = lambda i: tok.tokens[i]  # noqa: E731
    fast = PreTrainedTokenizerFast(tokenizer_object=tok._tok, eos_token=name(tok.eos_id), pad_token=name(tok.pad_id),
                                   unk_token=name(tok.unk_id))
    fast.save_pretrained(out)
    return tok


def build(glm4moe: Path, llama_cpp: Path) -> None:
    from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM
    from safetensors.torch import save_file

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tok = hf_tokenizer(glm4moe, d)
        V = len(tok.tokens)
        kw = dict(vocab_size=V, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
                  qk_nope_head_dim=24, qk_rope_head_dim=16, qk_head_dim=40, v_head_dim=16,
                  n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                  routed_scaling_factor=1.8, norm_topk_prob=True, rms_norm_eps=1e-6,
                  max_position_embeddings=1024, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                  tie_word_embeddings=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                  pad_token_id=tok.pad_id)
        # 4 layers, the last the MTP block's decoder layer: saved by transformers in the
        # checkpoint's own per-expert form, then the config says 3 layers and 1 MTP layer
        full = Glm4MoeLiteForCausalLM(Glm4MoeLiteConfig(num_hidden_layers=4, mlp_layer_types=["dense"] + ["sparse"] * 3,
                                                        **kw)).eval()
        with torch.no_grad():  # visible weights: norms near 1, router biases that matter
            for n, p in full.named_parameters():
                if "norm" in n:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5))
            for m in full.modules():
                if hasattr(m, "e_score_correction_bias"):
                    m.e_score_correction_bias.copy_(0.1 * torch.randn_like(m.e_score_correction_bias))
        full.save_pretrained(d / "hf")
        for p in d.iterdir():
            if p.is_file():
                (d / "hf" / p.name).write_bytes(p.read_bytes())
        cfg = Glm4MoeLiteConfig(num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"], **kw)
        model = Glm4MoeLiteForCausalLM(cfg).eval()
        missing, unexpected = model.load_state_dict(full.state_dict(), strict=False)
        assert not missing and all(k.startswith("model.layers.3.") for k in unexpected), (missing, unexpected)
        mtp_layer = full.model.layers[3]

        H = cfg.hidden_size
        eh = torch.randn(H, 2 * H) * (0.5 / (2 * H) ** 0.5)
        en, hn, sn = (1.0 + 0.1 * torch.randn(H) for _ in range(3))
        extra = {"model.layers.3.eh_proj.weight": eh, "model.layers.3.enorm.weight": en,
                 "model.layers.3.hnorm.weight": hn, "model.layers.3.shared_head.norm.weight": sn}
        from safetensors.torch import load_file
        save_file(extra, d / "hf" / "mtp.safetensors")
        main = load_file(d / "hf" / "model.safetensors")
        wm = {k: "model.safetensors" for k in main} | {k: "mtp.safetensors" for k in extra}
        (d / "hf" / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
        conf = json.loads((d / "hf" / "config.json").read_text())
        conf["num_hidden_layers"] = 3
        conf["mlp_layer_types"] = ["dense", "sparse", "sparse"]
        conf["num_nextn_predict_layers"] = 1
        conf["first_k_dense_replace"] = 1  # as GLM-4.7-Flash's own config.json says it (transformers keeps mlp_layer_types)
        (d / "hf" / "config.json").write_text(json.dumps(conf, indent=1))

        out = HERE / "glm47flash-tiny-f32.gguf"
        runner = (f"import sys; sys.path.insert(0, {str(llama_cpp)!r}); sys.path.insert(0, {str(llama_cpp / 'gguf-py')!r}); "
                  "import conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, t: 'glm4'; "
                  "import convert_hf_to_gguf as c; sys.argv = ['c', sys.argv[1], '--outtype', 'f32', '--outfile', sys.argv[2]]; c.main()")
        subprocess.run([sys.executable, "-c", runner, str(d / "hf"), str(out)], check=True)

        # references
        ref = {}
        with torch.no_grad():
            for i, text in enumerate(PROMPTS):
                ids = tok.encode(text)
                x = torch.tensor([ids])
                o = model(x, output_hidden_states=True)
                ref[f"ids{i}"] = np.array(ids, dtype=np.int64)
                ref[f"hf{i}"] = o.logits[0].float().numpy()
                h = o.hidden_states[-1][0]  # after the final norm
                ref[f"mtp{i}"] = mtp_reference(model, mtp_layer, eh, en, hn, sn, h, ids).numpy()
        np.savez(HERE / "reference.npz", **ref)
        print(f"wrote {out} ({out.stat().st_size} bytes) and reference.npz")
    llama_reference()


def llama_reference() -> None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama_cpp not installed: no llama{i} references")
        return
    import gguf

    ref = dict(np.load(HERE / "reference.npz"))
    with tempfile.TemporaryDirectory() as d:
        src = gguf.GGUFReader(HERE / "glm47flash-tiny-f32.gguf")
        dst = Path(d) / "sigmoid.gguf"
        w = gguf.GGUFWriter(dst, "deepseek2")
        for k, f in src.fields.items():
            if k.startswith("GGUF.") or k == "general.architecture":
                continue
            if f.types[0] == gguf.GGUFValueType.ARRAY:
                w.add_array(k, f.contents())
            else:
                w.add_key_value(k, f.contents(), f.types[0])
        w.add_uint32("deepseek2.expert_gating_func", 2)
        for t in src.tensors:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        m = Llama(model_path=str(dst), n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0)
        for i in range(len(PROMPTS)):
            ids = ref[f"ids{i}"].tolist()
            m.reset()
            m.eval(ids)
            ref[f"llama{i}"] = np.array(m.scores[:len(ids)], dtype=np.float32)
            print(f"prompt {i}: llama.cpp against transformers {np.abs(ref[f'llama{i}'] - ref[f'hf{i}']).max():.2e}")
        del m
    np.savez(HERE / "reference.npz", **ref)


def mtp_reference(model, layer, eh, en, hn, sn, h, ids):
    """z_p = eh_proj([enorm(embed(ids[p+1])), hnorm(h_p)]) at position p+1, causal over the rows,
    through the MTP decoder layer, then shared_head.norm and the main head."""
    from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteRMSNorm

    cfg = model.config
    L = len(ids) - 1
    if L < 1:
        return torch.zeros(0, cfg.vocab_size)

    def norm(w, x):
        m = Glm4MoeLiteRMSNorm(w.shape[0], eps=cfg.rms_norm_eps)
        m.weight.data.copy_(w)
        return m(x)

    e = model.model.embed_tokens(torch.tensor(ids[1:]))
    z = torch.cat([norm(en, e), norm(hn, h[:L])], dim=-1) @ eh.T
    pos = torch.arange(1, L + 1)[None]
    cos_sin = model.model.rotary_emb(z[None], pos)
    mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
    y = layer(z[None], attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    y = y[0] if isinstance(y, tuple) else y
    return model.lm_head(norm(sn, y[0])).float()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path)
    ap.add_argument("--llama-only", action="store_true")
    ap.add_argument("--glm4moe-fixture", type=Path,
                    default=HERE.parents[3] / "shared" / "fixtures" / "glm4moe-tiny" / "glm4moe-tiny-f32.gguf")
    a = ap.parse_args()
    if a.llama_only:
        llama_reference()
    elif a.llama_cpp is None:
        ap.error("--llama-cpp DIR is needed to convert")
    else:
        build(a.glm4moe_fixture, a.llama_cpp)
