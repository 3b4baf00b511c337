"""OpenAI request shapes, validated at the edge (pydantic, strict types) and the error body.

Unknown fields are ignored, as OpenAI-compatible servers do; fields that would change the
result and that nextn does not implement (n > 1, logprobs, penalties, logit_bias, JSON
response formats, forced tool choice) are refused with a 400 that names them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from placement.schema import DRAFT_MAX_LIMIT


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Model):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class FunctionCall(_Model):
    name: str
    arguments: str | dict | None = None


class ToolCallIn(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(_Model):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Model):
    include_usage: bool = False


def _refuse(field: str, why: str):
    raise ApiError(400, f"{field}: {why}", param=field, code="unsupported_parameter")


class _Sampling(_Model):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    user: str | None = None
    # llama-server's extension: keep the slot's KV for the shared prefix (default on)
    cache_prompt: bool = True
    # nextn's extensions: MTP speculative decoding per request (default: the server's setting)
    mtp: bool | None = None
    draft_max: int | None = Field(None, ge=0, le=DRAFT_MAX_LIMIT)

    @model_validator(mode="after")
    def _check(self):
        if self.n not in (None, 1):
            _refuse("n", f"only n=1 is supported (got {self.n})")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                _refuse(name, "penalties are not supported (use 0 or leave it out)")
        if self.logit_bias:
            _refuse("logit_bias", "not supported")
        if self.logprobs:
            _refuse("logprobs", "not supported")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        for i, s in enumerate(stops):
            if not s:
                field = "stop" if isinstance(self.stop, str) else f"stop[{i}]"
                raise ApiError(400, f"{field}: a stop string must not be empty", param=field)
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None
    chat_template_kwargs: dict | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.tool_choice not in (None, "auto", "none"):
            _refuse("tool_choice", "only 'auto' and 'none' are supported (nextn does not constrain the output)")
        rf = self.response_format
        if rf is not None and rf.get("type") not in (None, "text"):
            _refuse("response_format", f"type {rf.get('type')!r} is not supported (only 'text')")
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _check_completion(self):
        if self.echo:
            _refuse("echo", "not supported")
        if self.suffix:
            _refuse("suffix", "not supported")
        if self.best_of not in (None, 1):
            _refuse("best_of", "only best_of=1 is supported")
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            if len(p) != 1:
                _refuse("prompt", f"one prompt per request (got {len(p)})")
        return self

    def prompt_value(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            return p[0]
        return p


class TokenizeRequest(_Model):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(_Model):
    tokens: list[int]


_UNION_TAGS = ("str", "int", "float", "bool", "dict", "list", "none")


def _param(loc) -> str | None:
    """pydantic's error location -> 'messages[0].content' (union branch names left out)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in _UNION_TAGS or part.startswith("function-"):
            continue
        else:
            out += ("." if out else "") + part
    return out or None


def parse_body(model: type[_Model], body: bytes):
    """The request body -> the model, or an ApiError(400) naming the first bad field."""
    if not body.strip():
        raise ApiError(400, "the request body is empty (expected a JSON object)")
    try:
        return model.model_validate_json(body)
    except ApiError:
        raise
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {err['msg']}") from None
        param = _param(err["loc"])
        if err["type"] == "missing":
            raise ApiError(400, f"{param}: required field missing", param=param) from None
        # a refusal raised inside a validator arrives wrapped
        ctx = err.get("ctx") or {}
        inner = ctx.get("error")
        if isinstance(inner, ApiError):
            raise inner from None
        raise ApiError(400, f"{param or 'body'}: {err['msg']}", param=param) from None
