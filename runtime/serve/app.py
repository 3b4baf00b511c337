"""The HTTP routes: OpenAI's chat completions and completions (plain and streamed as server-sent
events), models, health, Prometheus metrics, tokenize / detokenize.

Handlers validate the request, render and tokenize the prompt, then hand an engine run to the
slot scheduler and relay its events. Every error is answered in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`; nothing a client sends reaches a 500.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import _Run
from ..errors import NextnError
from . import chat
from .protocol import (ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                       parse_body)
from .slots import Job, QueueFull, Scheduler

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "length"}


@dataclass
class ServerState:
    """What the routes need; `engine` and `scheduler` are None while the model loads."""

    alias: str
    api_key: str | None = None
    engine: object = None
    scheduler: Scheduler | None = None
    max_tokens: int | None = None  # default for requests that give none (None: the rest of the context)
    started: int = field(default_factory=lambda: int(time.time()))
    http_errors: dict = field(default_factory=dict)  # status -> count of error responses

    @property
    def ready(self) -> bool:
        return self.scheduler is not None


def _error_response(e: ApiError, state: ServerState | None = None) -> JSONResponse:
    if state is not None:
        state.http_errors[e.status] = state.http_errors.get(e.status, 0) + 1
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="nextn", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.nextn = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error_response(e, state)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return _error_response(ApiError(e.status_code, msg, type=kind), state)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return _error_response(ApiError(400, str(e)), state)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):  # a bug of ours, still in OpenAI's shape
        import traceback

        traceback.print_exception(e)
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"), state)

    def check(request: Request, need_model: bool = True) -> None:
        if state.api_key is not None:
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {state.api_key}":
                raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                               type="authentication_error", code="invalid_api_key")
        if need_model and not state.ready:
            raise ApiError(503, "the model is loading", type="unavailable_error", code="model_loading",
                           headers={"Retry-After": "5"})

    @app.get("/health")
    async def health():
        if not state.ready:
            return _error_response(ApiError(503, "the model is loading", type="unavailable_error",
                                            code="model_loading", headers={"Retry-After": "5"}))
        sch = state.scheduler
        return {"status": "ok", "slots_idle": len(sch.slots) - sch.busy, "slots_processing": sch.busy}

    @app.get("/v1/models")
    @app.get("/models")
    async def models(request: Request):
        check(request, need_model=False)
        meta = {}
        if state.ready:
            e = state.engine
            meta = {"n_ctx_slot": e.context, "n_slots": len(state.scheduler.slots), "n_vocab": e.cfg.n_vocab,
                    "mtp": e.has_mtp}
        return {"object": "list", "data": [{"id": state.alias, "object": "model", "created": state.started,
                                            "owned_by": "nextn", "meta": meta}]}

    @app.get("/metrics")
    async def metrics(request: Request):
        check(request)
        return PlainTextResponse(_metrics_text(state), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(request: Request):
        check(request)
        req = parse_body(TokenizeRequest, await request.body())
        tok = state.engine.tokenizer
        ids = tok.encode(req.content, add_special=req.add_special)
        if req.with_pieces:
            return {"tokens": [{"id": i, "piece": tok.decode([i])} for i in ids]}
        return {"tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        check(request)
        req = parse_body(DetokenizeRequest, await request.body())
        n = state.engine.cfg.n_vocab
        for i, t in enumerate(req.tokens):
            if not 0 <= t < n:
                raise ApiError(400, f"tokens[{i}]: token id {t} is outside the vocabulary (0..{n - 1})",
                               param=f"tokens[{i}]")
        return {"content": state.engine.detokenize(req.tokens)}

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        check(request)
        req = parse_body(ChatRequest, await request.body())
        prompt, parser_kw = await asyncio.to_thread(_render_chat, state.engine, req)
        run = _make_run(state, prompt, req, req.max_completion_tokens or req.max_tokens)
        return await _serve(state, request, run, req, chat_kw=parser_kw)

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(request: Request):
        check(request)
        req = parse_body(CompletionRequest, await request.body())
        prompt = req.prompt_value()
        if isinstance(prompt, str):
            ids = await asyncio.to_thread(state.engine.tokenize, prompt)
        else:
            ids = list(prompt)
            n = state.engine.cfg.n_vocab
            for i, t in enumerate(ids):
                if not 0 <= t < n:
                    raise ApiError(400, f"prompt[{i}]: token id {t} is outside the vocabulary (0..{n - 1})",
                                   param=f"prompt[{i}]")
        run = _make_run(state, ids, req, req.max_tokens)
        return await _serve(state, request, run, req, chat_kw=None)

    return app


# ---- requests -> runs ---------------------------------------------------------------------------


def _render_chat(engine, req: ChatRequest) -> tuple[list[int], dict]:
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    tools = None
    if req.tools and req.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
    kwargs = dict(req.chat_template_kwargs or {})
    for reserved in ("messages", "add_generation_prompt"):
        if reserved in kwargs:
            raise ApiError(400, f"chat_template_kwargs.{reserved}: set by the server", param="chat_template_kwargs")
    if tools:
        kwargs["tools"] = tools
    try:
        text = engine.tokenizer.apply_chat_template(chat.template_messages(messages), **kwargs)
    except chat.ChatError as e:
        raise ApiError(400, str(e), param=e.param) from None
    except NextnError as e:
        raise ApiError(400, f"messages: {e}", param="messages") from None
    parser_kw = {"reasoning": True, "in_reasoning": chat.starts_in_reasoning(text), "tools": tools}
    return engine.tokenize(text), parser_kw


def _make_run(state: ServerState, ids: list[int], req, max_tokens: int | None) -> _Run:
    e = state.engine
    if not ids:
        raise ApiError(400, "prompt: the prompt is empty", param="prompt")
    if len(ids) >= e.context:
        raise ApiError(400, f"the prompt has {len(ids)} tokens, the context of a slot holds {e.context} "
                            f"(prompt and reply together)", param="messages" if hasattr(req, "messages") else "prompt",
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = state.max_tokens or e.context - len(ids)
    kw = dict(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
              min_p=req.min_p, seed=req.seed, stop=req.stops(), mtp=req.mtp, draft_max=req.draft_max)
    if req.mtp is True and not e.has_mtp:
        raise ApiError(400, "mtp: this model has no nextn (MTP) layer", param="mtp")
    try:
        return _Run(e, ids, **kw)
    except NextnError as err:
        raise ApiError(400, str(err)) from None


async def _serve(state: ServerState, request: Request, run: _Run, req, chat_kw: dict | None):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink(ev):
        try:
            loop.call_soon_threadsafe(events.put_nowait, ev)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    job = Job(run, sink, cache_prompt=req.cache_prompt)
    sch = state.scheduler
    try:
        sch.submit(job)
    except QueueFull as e:
        raise ApiError(503, f"server busy: {e}; retry later", type="server_busy", code="server_busy",
                       headers={"Retry-After": "1"}) from None
    rid = ("chatcmpl-" if chat_kw is not None else "cmpl-") + uuid.uuid4().hex[:24]
    reply = _Reply(state, rid, chat_kw, len(run.prompt_ids))
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(sch, job, events, reply, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    sch.cancel(job)
                    return Response(status_code=204)
                continue
            if ev[0] == "text":
                reply.feed(ev[1])
            elif ev[0] == "error":
                raise ApiError(500, f"generation failed: {ev[1]}", type="server_error")
            else:
                return reply.final(ev[1])
    except asyncio.CancelledError:
        sch.cancel(job)
        raise


async def _stream(sch: Scheduler, job: Job, events: asyncio.Queue, reply: "_Reply", include_usage: bool):
    """SSE chunks until the run ends; a client that goes away cancels the job (finally)."""
    try:
        yield _sse(reply.chunk({"role": "assistant", "content": ""} if reply.is_chat else {"text": ""}))
        while True:
            ev = await events.get()
            if ev[0] == "text":
                for delta in reply.feed(ev[1]):
                    yield _sse(reply.chunk(delta))
            elif ev[0] == "error":
                yield _sse(ApiError(500, f"generation failed: {ev[1]}", type="server_error").body())
                break
            else:
                for delta in reply.flush():
                    yield _sse(reply.chunk(delta))
                stats = ev[1]
                last = reply.chunk({} if reply.is_chat else {"text": ""}, finish=reply.finish_reason(stats))
                last["timings"] = _timings(stats)
                yield _sse(last)
                if include_usage:
                    u = reply.chunk(None)
                    u["choices"] = []
                    u["usage"] = _usage(stats, reply.prompt_tokens)
                    yield _sse(u)
                break
        yield "data: [DONE]\n\n"
    finally:
        if not job.run.done:
            sch.cancel(job)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Reply:
    """Turns the run's text into OpenAI's response or chunks (chat: content, reasoning, tools)."""

    def __init__(self, state: ServerState, rid: str, chat_kw: dict | None, prompt_tokens: int):
        self.state, self.id = state, rid
        self.is_chat = chat_kw is not None
        self.parser = chat.OutputParser(**chat_kw) if self.is_chat else None
        self.prompt_tokens = prompt_tokens
        self.created = int(time.time())
        self.text = ""
        self.total = chat.Delta()  # everything parsed so far
        self.n_calls = 0

    def feed(self, piece: str) -> list[dict]:
        self.text += piece
        if not self.is_chat:
            return [{"text": piece}]
        return self._deltas(self.parser.feed(piece))

    def flush(self) -> list[dict]:
        return self._deltas(self.parser.finish()) if self.is_chat else []

    def _deltas(self, d: chat.Delta) -> list[dict]:
        self.total.content += d.content
        self.total.reasoning += d.reasoning
        self.total.tool_calls += d.tool_calls
        out = []
        if d.reasoning:
            out.append({"reasoning_content": d.reasoning})
        if d.content:
            out.append({"content": d.content})
        for call in d.tool_calls:
            out.append({"tool_calls": [call.openai(index=self.n_calls)]})
            self.n_calls += 1
        return out

    def finish_reason(self, stats: dict) -> str:
        if self.is_chat and self.parser.calls:
            return "tool_calls"
        return FINISH.get(stats.get("finish_reason"), "stop")

    def chunk(self, delta: dict | None, finish: str | None = None) -> dict:
        base = {"id": self.id, "object": "chat.completion.chunk" if self.is_chat else "text_completion",
                "created": self.created, "model": self.state.alias}
        if delta is None:
            return base
        if self.is_chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta.get("text", ""), "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice]}

    def final(self, stats: dict) -> dict:
        base = {"id": self.id, "object": "chat.completion" if self.is_chat else "text_completion",
                "created": self.created, "model": self.state.alias}
        tail = {"usage": _usage(stats, self.prompt_tokens), "timings": _timings(stats)}
        if not self.is_chat:
            return {**base, "choices": [{"index": 0, "text": self.text, "logprobs": None,
                                         "finish_reason": self.finish_reason(stats)}], **tail}
        self.flush()
        t = self.total
        msg = {"role": "assistant", "content": t.content if t.content or not t.tool_calls else None}
        if t.reasoning:
            msg["reasoning_content"] = t.reasoning.rstrip()  # the newline before </think>
        if t.tool_calls:
            msg["tool_calls"] = [c.openai() for c in t.tool_calls]
        return {**base, "choices": [{"index": 0, "message": msg, "finish_reason": self.finish_reason(stats)}],
                **tail}


def _usage(stats: dict, prompt_tokens: int) -> dict:
    n = stats.get("generated_tokens", 0)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n,
            "prompt_tokens_details": {"cached_tokens": stats.get("cached_tokens", 0)}}


def _timings(st: dict) -> dict:
    """llama-server's `timings` object."""
    pn = st.get("prompt_tokens", 0) - st.get("cached_tokens", 0)
    ps, dn, ds = st.get("prefill_s", 0.0), st.get("generated_tokens", 0), st.get("decode_s", 0.0)
    return {"cache_n": st.get("cached_tokens", 0), "prompt_n": pn, "prompt_ms": ps * 1e3,
            "prompt_per_second": pn / ps if ps > 0 else 0.0, "predicted_n": dn, "predicted_ms": ds * 1e3,
            "predicted_per_second": st.get("decode_tokens_per_s", 0.0),
            "draft_n": st.get("drafted", 0), "draft_n_accepted": st.get("accepted", 0)}


def _metrics_text(state: ServerState) -> str:
    sch = state.scheduler
    c = sch.counters
    rows = [
        ("nextn_requests_total", "counter", "generations finished (including cancelled)", c.requests),
        ("nextn_requests_cancelled_total", "counter", "generations whose client went away", c.cancelled),
        ("nextn_requests_errors_total", "counter", "generations that failed", c.errors),
        ("nextn_requests_rejected_total", "counter", "requests refused with 503: queue full", c.rejected_full),
        ("nextn_prompt_tokens_total", "counter", "prompt tokens", c.prompt_tokens),
        ("nextn_prompt_tokens_cached_total", "counter", "prompt tokens whose KV was kept (prompt cache)",
         c.cached_tokens),
        ("nextn_tokens_predicted_total", "counter", "generated tokens", c.generated_tokens),
        ("nextn_predicted_tokens_seconds", "gauge", "generated tokens per second of decoding, per stream",
         c.generated_tokens / c.decode_s if c.decode_s > 0 else 0.0),
        ("nextn_draft_tokens_total", "counter", "MTP drafted tokens", c.drafted),
        ("nextn_draft_tokens_accepted_total", "counter", "MTP drafted tokens accepted", c.accepted),
        ("nextn_draft_acceptance_rate", "gauge", "accepted / drafted", c.accepted / c.drafted if c.drafted else 0.0),
        ("nextn_slots_busy", "gauge", "slots generating", sch.busy),
        ("nextn_slots_total", "gauge", "slots", len(sch.slots)),
        ("nextn_requests_waiting", "gauge", "requests queued for a slot", sch.waiting),
    ]
    out = []
    for name, kind, doc, v in rows:
        out += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {v}"]
    out += ["# HELP nextn_http_errors_total error responses by HTTP status",
            "# TYPE nextn_http_errors_total counter"]
    for status, n in sorted(state.http_errors.items()):
        out.append(f'nextn_http_errors_total{{status="{status}"}} {n}')
    return "\n".join(out) + "\n"
