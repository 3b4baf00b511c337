"""Tokenizer from GGUF metadata: parity with transformers, the llama.cpp-converted fixture, streaming
detokenization, chat template."""
from __future__ import annotations

import random

import gguf
import numpy as np
import pytest

from runtime.tokenizer import GLM4_PRETOKENIZER_REGEX, StreamDecoder, Tokenizer, TokenizerError

PARITY_STRINGS = [
    "hello world",
    "Hello, world! hello there",
    "12345 1234567 3.14159 2025-11-27 0 00 000 0000",   # digits group by 1-3 (\p{N}{1,3})
    "我想在apple工作。你好，世界！",                     # CJK
    "こんにちは 안녕하세요",
    "😀🚀 👍🏽 ❤️ 🎉x",                                   # emoji, modifiers, variation selector
    "don't I'LL WE'RE they've she'd it's I'M",          # contractions, case-insensitive
    "a   b    c\n\n\n  d\t\te \r\n x  \n",              # runs of spaces / newlines / tabs
    "\t\tindented\n    code\n",
    "<|user|>\nhi<|assistant|>\n<think>ok</think> done",  # special and user-defined tokens in text
    "[gMASK]<sop><|system|>\nbe nice<|endoftext|>",
    "x<|user|>y<|observation|>z",
    " leading space", "trailing   ", "", "\n", " ", "Ærøskøbing Straße café naïve",
    "def f(x):\n    return x ** 2  # comment\n",
    "\u00a0nbsp\u3000ideographic space\u200bzwsp",
]


def _meta(path):
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def tm(test_model):
    return test_model


@pytest.fixture(scope="module")
def tok(tm):
    return Tokenizer.from_metadata(_meta(tm.gguf_path))


@pytest.fixture(scope="module")
def hf_tok(tm):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tm.hf_dir)  # the saved checkpoint, as a user would load it


def test_regex_is_llamacpp_chatglm4():
    # llama.cpp llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_CHATGLM4 (spelled with explicit case classes there)
    assert r"\p{N}{1,3}" in GLM4_PRETOKENIZER_REGEX
    assert GLM4_PRETOKENIZER_REGEX.startswith(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+")


@pytest.mark.parametrize("s", PARITY_STRINGS)
def test_encode_matches_transformers(tok, hf_tok, s):
    ids = tok.encode(s)
    assert ids == hf_tok.encode(s, add_special_tokens=False)
    assert tok.decode(ids) == s


def test_digits_grouped_by_three(tok):
    pieces = [tok.decode([i]) for i in tok.encode("1234567")]
    assert "".join(pieces) == "1234567"
    assert all(len(p) <= 3 for p in pieces)
    # the pre-tokenizer never merges across a 3-digit boundary
    assert tok.encode("1234567") == tok.encode("123") + tok.encode("456") + tok.encode("7")


def test_random_strings_match_transformers(tok, hf_tok):
    pool = (list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789") + [" "] * 10 + list("\n\t\r.,;:!?'\"()[]{}<>|-_+=*&^%$#@~`/\\")
            + list("我想在工作你好世界こんにちは안녕éñüßÆø") + ["😀", "🚀", "👍🏽", "❤️", "\u200b", "\u00a0"]
            + ["'s", "'LL", "'re", "<|user|>", "<think>", "[gMASK]", "<|endoftext|>", "  ", "\n\n"])
    rng = random.Random(0)
    for _ in range(400):
        s = "".join(rng.choice(pool) for _ in range(rng.randrange(0, 30)))
        ids = tok.encode(s)
        assert ids == hf_tok.encode(s, add_special_tokens=False), repr(s)
        assert tok.decode(ids) == s


def test_decode_matches_transformers_on_random_ids(tok, hf_tok):
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        for skip in (False, True):
            assert tok.decode(ids, skip_special=skip) == hf_tok.decode(ids, skip_special_tokens=skip), ids


def test_special_tokens(tok, hf_tok):
    for name in ["<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>"]:
        i = tok.token_to_id(name)
        assert i == hf_tok.convert_tokens_to_ids(name)
        assert tok.encode(name) == [i]
    assert tok.vocab_size == len(hf_tok)
    assert tok.bos_id == tok.token_to_id("[gMASK]")
    assert tok.eos_id == tok.token_to_id("<|endoftext|>")
    assert tok.eos_ids == {tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
    # control tokens are skippable, user-defined ones are text
    ids = tok.encode("<|user|>\nhi<think>")
    assert tok.decode(ids, skip_special=True) == "\nhi<think>"
    # parse_special=False: control tokens are plain text (user-defined still match, as in llama.cpp)
    plain = tok.encode("<|user|><think>", parse_special=False)
    assert tok.token_to_id("<|user|>") not in plain and tok.token_to_id("<think>") in plain
    assert tok.decode(plain) == "<|user|><think>"
    # GLM files set no add_bos: add_special adds nothing (the chat template writes [gMASK]<sop>)
    assert tok.encode("hi", add_special=True) == tok.encode("hi")


def test_fixture_ids_round_trip(glm4moe_fixture_dir):
    """The llama.cpp-converted fixture: the transformers ids of its prompts decode and re-encode exactly."""
    path = glm4moe_fixture_dir / "glm4moe-tiny-f32.gguf"
    t = Tokenizer.from_metadata(_meta(path))
    ref = np.load(glm4moe_fixture_dir / "reference.npz")
    assert t.vocab_size == 394
    assert t.bos_id == t.token_to_id("[gMASK]") and t.eot_id == t.token_to_id("<|user|>")
    for i in range(3):
        ids = ref[f"ids{i}"].tolist()
        text = t.decode(ids)
        assert "\ufffd" not in text
        assert t.encode(text) == ids
    assert t.decode(ref["ids0"].tolist()) == "hello world"
    assert t.encode("<|user|>\nhello") == [t.token_to_id("<|user|>"), *t.encode("\nhello")]
    with pytest.raises(TokenizerError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])


def test_from_lead_gguf_reader_metadata(tm, tok):
    from runtime.gguf_file import GGUFFile
    t2 = Tokenizer.from_metadata(GGUFFile(tm.gguf_path).metadata)
    s = PARITY_STRINGS[9] + PARITY_STRINGS[3]
    assert t2.encode(s) == tok.encode(s)


def test_streaming_holds_back_split_characters(tok):
    text = "a😀b我想🚀c é👍🏽"
    ids = tok.encode(text)
    # at least one character is split over several tokens in this tiny vocabulary
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert any(p == "" for p in pieces[:-1])  # something was held back
    # skip_special drops control tokens mid-stream
    dec = StreamDecoder(tok, skip_special=True)
    ids2 = tok.encode("<|user|>😀<|assistant|>ok")
    assert "".join(dec.push(i) for i in ids2) + dec.flush() == "😀ok"


def test_streaming_equals_decode_on_random_ids(tok):
    rng = random.Random(2)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 16))]
        dec = tok.stream_decoder()
        out = "".join(dec.push(i) for i in ids) + dec.flush()
        assert out == tok.decode(ids)


def test_invalid_ids(tok):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError):
        tok.decode([-1])


def test_chat_template_matches_transformers(tok, hf_tok):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}]
    for gen in (True, False):
        assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == \
            hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    out = tok.apply_chat_template(msgs, enable_thinking=False)
    assert out == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert out.startswith("[gMASK]<sop><|system|>\nYou are terse.<|user|>\n")
    assert out.endswith("<|assistant|>\n<think></think>")
    ids = tok.encode(out)
    assert ids[:2] == [tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")]
    with pytest.raises(TokenizerError, match="unknown role"):
        tok.apply_chat_template([{"role": "wizard", "content": "x"}])


def test_chat_template_is_sandboxed(tok):
    bad = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception) as ei:
        tok.apply_chat_template([], template=bad)
    assert "unsafe" in str(ei.value).lower() or "security" in type(ei.value).__name__.lower()


def test_bad_metadata():
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.from_metadata({})
    with pytest.raises(TokenizerError, match="unsupported tokenizer.ggml.model"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "glm4", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.token_type": [1, 1, 1], "tokenizer.ggml.merges": ["a b"]}
    assert Tokenizer.from_metadata(base).encode("abab") == [2, 2]
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        Tokenizer.from_metadata({**base, "tokenizer.ggml.eos_token_id": 7})
    with pytest.raises(TokenizerError, match="unsupported tokenizer.ggml.pre"):
        Tokenizer.from_metadata({**base, "tokenizer.ggml.pre": "qwen2"})
