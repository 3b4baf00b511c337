"""GLM-4.x tokenizer and chat template, built from GGUF metadata.

The vocabulary is byte-level BPE (``tokenizer.ggml.model == "gpt2"``). Encoding runs through the
``tokenizers`` library with the pre-tokenizer llama.cpp uses for ``tokenizer.ggml.pre == "glm4"``
(``LLAMA_VOCAB_PRE_TYPE_CHATGLM4``): one regex split, then byte-level mapping. llama.cpp does not set
``ignore_merges`` for glm4 (only its LLAMA3 pre-type does), so merges are always applied here too.
Control (type 3) and user-defined (type 4) tokens are added tokens, matched inside text before BPE.

Decoding is done here from per-token byte strings, so that whole-sequence decoding and streaming
decoding (:class:`StreamDecoder`) agree byte for byte.
"""
from __future__ import annotations

import codecs
import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable, Mapping

from .errors import NextnError, short

# Token types (llama.cpp / gguf.TokenType)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_CHATGLM4 (pre "glm4" / "chatglm-bpe"). This is the
# original tokenizer.json form (HF GLM-4.5); llama.cpp spells the case-insensitive group out as
# '[sS]|'[tT]|..., which is the same set of matches. Digits are grouped 1-3, not split one by one.
GLM4_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Pre-tokenizer names that use the regex above (llama.cpp maps these to LLAMA3 / CHATGLM4 types,
# which share the regex; llama3 additionally ignores merges).
_PRE_GLM4 = {"glm4", "chatglm-bpe"}
_PRE_LLAMA3 = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"}


class TokenizerError(NextnError, ValueError):
    """Tokenizer metadata missing or unusable, a bad token id, or a chat template problem."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _bytelevel_to_bytes(token: str) -> bytes:
    table = unicode_to_bytes()
    out = bytearray()
    for ch in token:
        b = table.get(ch)
        if b is None:  # not a byte-level char (odd vocabularies): keep its UTF-8
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def _get(meta: Mapping[str, Any], key: str, default=None):
    v = meta.get(key, default)
    if hasattr(v, "tolist"):  # numpy arrays / scalars
        v = v.tolist()
    return v


class Tokenizer:
    """Byte-level BPE tokenizer of a GLM-4.x GGUF file.

    Build with :meth:`from_metadata` from a mapping of GGUF keys to plain Python values.
    """

    def __init__(self, tokens: list[str], token_types: list[int], merges: list[str], *, pre: str = "glm4",
                 bos_id: int | None = None, eos_id: int | None = None, eot_id: int | None = None,
                 eom_id: int | None = None, pad_id: int | None = None, unk_id: int | None = None,
                 chat_template: str | None = None, add_bos: bool = False, add_eos: bool = False):
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as _HFTok

        n = len(tokens)
        if n == 0:
            raise TokenizerError("tokenizer.ggml.tokens is empty")
        if len(token_types) != n:
            raise TokenizerError(f"tokenizer.ggml.token_type has {len(token_types)} entries, tokens has {n}")
        for name, tid in (("bos", bos_id), ("eos", eos_id), ("eot", eot_id), ("eom", eom_id),
                          ("padding", pad_id), ("unknown", unk_id)):
            if tid is not None and not 0 <= tid < n:
                raise TokenizerError(f"tokenizer.ggml.{name}_token_id = {tid} is outside the vocabulary (0..{n - 1})")
        self.tokens = list(tokens)
        self.token_types = [int(t) for t in token_types]
        self.pre = pre
        self.bos_id, self.eos_id, self.eot_id, self.eom_id = bos_id, eos_id, eot_id, eom_id
        self.pad_id, self.unk_id = pad_id, unk_id
        self.chat_template = chat_template or None
        self.add_bos, self.add_eos = add_bos, add_eos

        vocab: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            vocab.setdefault(t, i)  # first occurrence wins, as in llama.cpp's token_to_id
        self._vocab = vocab
        merge_pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep:
                raise TokenizerError(f"bad merge {short(m)} in tokenizer.ggml.merges (expected 'left right')")
            merge_pairs.append((a, b))

        if pre in _PRE_GLM4 or pre in _PRE_LLAMA3 or pre == "default":
            regex = GLM4_PRETOKENIZER_REGEX
        else:
            raise TokenizerError(f"unsupported tokenizer.ggml.pre {short(pre)} (this runtime supports GLM-4.x: 'glm4')")
        ignore_merges = pre in _PRE_LLAMA3
        # Each merge's parts and result must be tokens: llama.cpp skips a merge that is not, the
        # tokenizers library refuses the whole vocabulary (a bare "Error while initializing BPE").
        for a, b in merge_pairs:
            for part in (a, b, a + b):
                if part not in vocab:
                    raise TokenizerError(f"tokenizer.ggml.merges: {short(a + ' ' + b)} uses {short(part)}, "
                                         f"which is not in tokenizer.ggml.tokens")
        try:
            bpe = models.BPE(vocab=vocab, merges=merge_pairs, ignore_merges=ignore_merges, fuse_unk=False,
                             byte_fallback=False)
            tok = _HFTok(bpe)
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ])
            tok.decoder = decoders.ByteLevel()
            added = []
            for i, (t, ty) in enumerate(zip(self.tokens, self.token_types)):
                if ty == TOKEN_CONTROL:
                    added.append(AddedToken(t, special=True, normalized=False))
                elif ty == TOKEN_USER_DEFINED:
                    added.append(AddedToken(t, special=False, normalized=False))
            if added:
                tok.add_tokens(added)  # ids already exist in the BPE vocab, so they keep them
        except Exception as e:  # the library's own refusal (its messages echo whole tokens): one short line
            raise TokenizerError(f"the vocabulary is unusable: {short(str(e).splitlines()[0] if str(e) else e, 120)}") from None
        self._tok = tok
        for a in added:
            if tok.token_to_id(a.content) != vocab[a.content]:  # pragma: no cover - library behaviour guard
                raise TokenizerError(f"added token {a.content!r} did not keep its id")

        # per-token bytes for decoding; None marks control/unused tokens (skippable)
        self._special = set()
        self._bytes: list[bytes] = []
        for i, (t, ty) in enumerate(zip(self.tokens, self.token_types)):
            if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_UNKNOWN):
                self._bytes.append(t.encode("utf-8"))
                if ty != TOKEN_USER_DEFINED:
                    self._special.add(i)
            else:
                self._bytes.append(_bytelevel_to_bytes(t))

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        def typed(key, kind, what, required=False):
            v = _get(meta, key)
            if v is None:
                if required:
                    raise TokenizerError(f"{key} is missing")
                return None
            if kind is list and isinstance(v, str):  # a str is iterable, but not a list of tokens
                v = 0
            ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
            if not ok:
                raise TokenizerError(f"{key} is {short(v)}; expected {what}")
            return v

        def items(key, kind, what, required=False):
            v = typed(key, list, f"an array of {what}", required)
            if v is not None:
                for i, x in enumerate(v):
                    if not isinstance(x, kind) or (kind is int and isinstance(x, bool)):
                        raise TokenizerError(f"{key}[{i}] is {short(x)}; expected {what}")
            return v

        model = _get(meta, "tokenizer.ggml.model")
        if model is None:
            raise TokenizerError("the GGUF has no tokenizer (tokenizer.ggml.model is missing)")
        if model != "gpt2":
            raise TokenizerError(f"unsupported tokenizer.ggml.model {short(model)} (GLM-4.x uses byte-level BPE 'gpt2')")
        tokens = items("tokenizer.ggml.tokens", str, "strings", required=True)
        if not tokens:
            raise TokenizerError("tokenizer.ggml.tokens is missing")
        types = items("tokenizer.ggml.token_type", int, "whole numbers")
        if types is None:
            types = [TOKEN_NORMAL] * len(tokens)
        merges = items("tokenizer.ggml.merges", str, "strings", required=True)
        pre = typed("tokenizer.ggml.pre", str, "a string") or "default"
        template = typed("tokenizer.chat_template", str, "a string")

        def tid(name):
            v = typed(f"tokenizer.ggml.{name}_token_id", int, "a token id")
            return None if v is None or v < 0 else v

        def flag(name):
            v = _get(meta, name, False)
            if type(v) is not bool and not (type(v) is int and v in (0, 1)):
                raise TokenizerError(f"{name} is {short(v)}; expected a bool")
            return bool(v)

        return cls(list(tokens), list(types), list(merges), pre=pre,
                   bos_id=tid("bos"), eos_id=tid("eos"), eot_id=tid("eot"), eom_id=tid("eom"),
                   pad_id=tid("padding"), unk_id=tid("unknown"),
                   chat_template=template,
                   add_bos=flag("tokenizer.ggml.add_bos_token"),
                   add_eos=flag("tokenizer.ggml.add_eos_token"))

    # ---------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def eos_ids(self) -> set[int]:
        """Ids that end generation: eos, eot and eom where the metadata sets them."""
        return {t for t in (self.eos_id, self.eot_id, self.eom_id) if t is not None}

    @property
    def special_ids(self) -> set[int]:
        """Control, unused and unknown-type tokens (what ``skip_special`` removes)."""
        return set(self._special)

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def id_to_token(self, i: int) -> str:
        return self.tokens[i]

    def token_bytes(self, i: int) -> bytes:
        return self._bytes[i]

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Text -> ids. ``add_special`` adds BOS/EOS only where the metadata asks for them
        (``tokenizer.ggml.add_bos_token`` / ``add_eos_token``, as llama.cpp does; GLM files set
        neither: the chat template writes ``[gMASK]<sop>``). With ``parse_special=False`` control
        tokens in the text are tokenized as plain text (user-defined tokens still match, as in llama.cpp).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        self._tok.encode_special_tokens = not parse_special
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False
        if add_special:
            if self.add_bos and self.bos_id is not None:
                ids = [self.bos_id] + ids
            if self.add_eos and self.eos_id is not None:
                ids = ids + [self.eos_id]
        return ids

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        out = []
        n = len(self.tokens)
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise TokenizerError(f"token id {i} is outside the vocabulary (0..{n - 1})")
            out.append(i)
        return out

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        ids = self._check_ids(ids)
        sp = self._special
        return b"".join(self._bytes[i] for i in ids if not (skip_special and i in sp))

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Ids -> text; bytes that are not valid UTF-8 become U+FFFD (as transformers does)."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special)

    # ---------------------------------------------------------------- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            template: str | None = None, **kwargs) -> str:
        """Render ``messages`` with the GGUF's ``tokenizer.chat_template`` (jinja2, sandboxed, the
        environment transformers uses). Extra keyword arguments (``tools``, ``enable_thinking``, ...)
        are passed to the template."""
        tpl = template or self.chat_template
        if not tpl:
            raise TokenizerError("this model has no chat template (tokenizer.chat_template is missing from the GGUF); "
                                 "pass a raw prompt instead")
        compiled = _compile_template(tpl)
        ctx = dict(
            bos_token=self._tok_str(self.bos_id), eos_token=self._tok_str(self.eos_id),
            pad_token=self._tok_str(self.pad_id), unk_token=self._tok_str(self.unk_id),
        )
        ctx.update(kwargs)
        import jinja2
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **ctx)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template error: {e}") from None

    def _tok_str(self, i: int | None) -> str:
        return "" if i is None else self.tokens[i]


@lru_cache(maxsize=8)
def _compile_template(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template does not parse: {e}") from None


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get back only complete UTF-8 text.

    Incomplete multi-byte sequences are held back until the bytes that complete them arrive, so a
    character split across tokens is never emitted as U+FFFD. Bytes that can never form a valid
    character become U+FFFD, as in :meth:`Tokenizer.decode`; ``flush()`` ends the stream.
    Concatenating every ``push`` result and the final ``flush`` equals ``Tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tok = tokenizer
        self.skip_special = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(self.tok.decode_bytes([token_id], self.skip_special), final=False)

    __call__ = push

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """Text for any bytes still held (U+FFFD for an unfinished character); resets the decoder."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out

    @property
    def pending(self) -> bool:
        """True while an incomplete character is held back."""
        return bool(self._dec.getstate()[0])
