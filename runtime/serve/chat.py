"""GLM chat format for the server: OpenAI messages -> the GGUF's chat template, and the model's
text -> OpenAI's `content`, `reasoning_content` and `tool_calls`.

GLM-4.5/4.6/4.7 write reasoning between `<think>` and `</think>` (GLM-4.7's template opens the
`<think>` itself at the end of the prompt) and tool calls as

    <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>

(GLM-4.6 puts newlines between the parts). The template writes a string value as it is and any
other value as JSON, so a value is read back by the type the tool's JSON schema gives its key.
`OutputParser` splits the text incrementally, for streaming; text that may still become a tag
is held back until it is decided. A call that does not parse, or names no tool of the request,
stays in `content` as the model wrote it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


class ChatError(ValueError):
    """A request's messages or tools cannot be rendered; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ---- rendering --------------------------------------------------------------------------------


def _text(content, where: str) -> str:
    """OpenAI content (a string, null, or a list of parts) -> the text of its text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ChatError(f"{where}[{i}]: only text content parts are supported (got type {kind!r})",
                            f"{where}[{i}].type")
        out.append(part["text"])
    return "".join(out)


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages (plain dicts, already validated for shape) -> what GLM templates read:
    text content, and tool calls with their arguments as a mapping (OpenAI sends a JSON string)."""
    out = []
    for i, m in enumerate(messages):
        role = "system" if m["role"] == "developer" else m["role"]
        msg = {"role": role, "content": _text(m.get("content"), f"messages[{i}].content")}
        if role == "assistant" and m.get("reasoning_content"):
            msg["reasoning_content"] = m["reasoning_content"]
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for j, tc in enumerate(m["tool_calls"]):
                fn = tc["function"]
                where = f"messages[{i}].tool_calls[{j}].function.arguments"
                args = fn.get("arguments") or "{}"
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except json.JSONDecodeError as e:
                        raise ChatError(f"{where} is not valid JSON: {e}", where) from None
                if not isinstance(args, dict):
                    raise ChatError(f"{where} must be a JSON object", where)
                calls.append({"id": tc.get("id"), "type": "function",
                              "function": {"name": fn["name"], "arguments": args}})
            msg["tool_calls"] = calls
        if role == "tool" and m.get("tool_call_id"):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def starts_in_reasoning(prompt: str) -> bool:
    """GLM-4.7's template ends the prompt with an open `<think>`: the reply starts as reasoning."""
    tail = prompt.rstrip()
    return tail.endswith(THINK_OPEN)


# ---- tool calls ---------------------------------------------------------------------------------


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function",
             "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        if index is not None:
            d["index"] = index
        return d


def tool_schemas(tools: list[dict] | None) -> dict[str, dict]:
    """Tool name -> the JSON schema of its parameters (properties), from OpenAI `tools`."""
    out = {}
    for t in tools or []:
        fn = t.get("function") or {}
        if isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            out[fn["name"]] = props if isinstance(props, dict) else {}
    return out


_ARG = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


def _types(schema) -> set[str]:
    if not isinstance(schema, dict):
        return set()
    t = schema.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return {x for x in t if isinstance(x, str)}
    out = set()
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            out |= _types(sub)
    enum = schema.get("enum")
    if not out and isinstance(enum, list) and enum:
        out = {"string"} if all(isinstance(v, str) for v in enum) else {"json"}
    return out


def typed_value(raw: str, schema) -> object:
    """An <arg_value> by its schema: strings as written; numbers, booleans, objects, arrays and
    null from JSON. A value that does not read as its type stays a string."""
    types = _types(schema)
    if types == {"string"}:
        return raw
    try:
        v = json.loads(raw)
    except (json.JSONDecodeError, ValueError):
        return raw
    if not types:
        return v  # no schema for this key: what the template would have written as JSON
    ok = {"integer": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool),
          "boolean": isinstance(v, bool), "object": isinstance(v, dict), "array": isinstance(v, list),
          "null": v is None, "json": True}
    if any(ok.get(t, False) for t in types):
        return v
    return raw


def parse_tool_call(body: str, schemas: dict[str, dict]) -> ToolCall | None:
    """The text between <tool_call> and </tool_call> -> a ToolCall, or None when it is malformed
    (no name, a name no tool of the request has, text outside the argument pairs)."""
    i = body.find("<arg_key>")
    name = (body if i < 0 else body[:i]).strip()
    if not name or "<" in name or ">" in name or name not in schemas:
        return None
    args = {}
    pos = len(body) if i < 0 else i
    rest = body[pos:]
    at = 0
    for m in _ARG.finditer(rest):
        if m.start() != at:
            return None
        key = m.group(1).strip()
        if not key:
            return None
        args[key] = typed_value(m.group(2), schemas[name].get(key))
        at = m.end()
    if rest[at:].strip():
        return None
    return ToolCall(name, args)


# ---- the output parser ------------------------------------------------------------------------


@dataclass
class Delta:
    """What one piece of model text adds: any of the three."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


def _partial_tag_at(text: str, tags: tuple[str, ...]) -> int:
    """Index where a suffix of `text` that could begin one of `tags` starts (len(text) if none)."""
    best = len(text)
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), 0, -1):
            if tag.startswith(text[-n:]):
                best = min(best, len(text) - n)
                break
    return best


class OutputParser:
    """Incremental split of the model's text. `feed(piece)` and `finish()` return Deltas; the sum
    of all of them is what `parse(text)` gives for the whole text."""

    def __init__(self, *, reasoning: bool = True, in_reasoning: bool = False,
                 tools: list[dict] | None = None):
        self.reasoning = reasoning
        self.state = "reasoning" if (reasoning and in_reasoning) else "content"
        self.schemas = tool_schemas(tools) if tools else {}
        self.buf = ""
        # whitespace before the reply's first text, after </think> or after a tool call, is not content
        self.content_started = False
        self.reasoning_started = False
        self.calls: list[ToolCall] = []

    def _tags(self) -> tuple[str, ...]:
        if self.state == "reasoning":
            return (THINK_CLOSE,)
        tags = ()
        if self.reasoning and not self.content_started:
            tags += (THINK_OPEN,)
        if self.schemas:
            tags += (CALL_OPEN,)
        return tags

    def _content(self, d: Delta, text: str) -> None:
        if not self.content_started:
            text = text.lstrip()
            if not text:
                return
            self.content_started = True
        d.content += text

    def _reasoning(self, d: Delta, text: str) -> None:
        if not self.reasoning_started:
            text = text.lstrip()
            if not text:
                return
            self.reasoning_started = True
        d.reasoning += text

    def feed(self, piece: str) -> Delta:
        self.buf += piece
        d = Delta()
        while self.buf:
            if self.state == "tool":
                j = self.buf.find(CALL_CLOSE)
                if j < 0:
                    break
                body, self.buf = self.buf[:j], self.buf[j + len(CALL_CLOSE):]
                call = parse_tool_call(body, self.schemas)
                if call is None:
                    self._content(d, CALL_OPEN + body + CALL_CLOSE)
                else:
                    self.calls.append(call)
                    d.tool_calls.append(call)
                    self.content_started = False
                self.state = "content"
                continue
            tags = self._tags()
            hits = [(self.buf.find(t), t) for t in tags]
            hits = [(i, t) for i, t in hits if i >= 0]
            if hits:
                i, tag = min(hits)
                before, self.buf = self.buf[:i], self.buf[i + len(tag):]
                if self.state == "reasoning":
                    self._reasoning(d, before)
                    self.state = "content"
                    self.content_started = False
                else:
                    self._content(d, before)
                    self.state = "reasoning" if tag == THINK_OPEN else "tool"
                continue
            keep = _partial_tag_at(self.buf, tags)
            out, self.buf = self.buf[:keep], self.buf[keep:]
            if self.state == "reasoning":
                self._reasoning(d, out)
            else:
                self._content(d, out)
            break
        return d

    def finish(self) -> Delta:
        """End of the text: whatever is held is what it is (an unclosed call stays text)."""
        d = Delta()
        if self.state == "tool":
            self._content(d, CALL_OPEN + self.buf)
        elif self.state == "reasoning":
            self._reasoning(d, self.buf)
        else:
            self._content(d, self.buf)
        self.buf = ""
        return d


def parse(text: str, **kw) -> Delta:
    """The whole of a reply at once (what a non-streaming response carries)."""
    p = OutputParser(**kw)
    total = Delta()
    for d in (p.feed(text), p.finish()):
        total.content += d.content
        total.reasoning += d.reasoning
        total.tool_calls += d.tool_calls
    total.reasoning = total.reasoning.rstrip()  # the newline before </think> (a stream sends it)
    return total
