"""The server's GLM chat handling without a model: rendering OpenAI messages through the real GLM
templates, and parsing reasoning and tool calls back out of the text those templates write (which
is the format the models were trained to emit). Plus the request validation and response shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.serve import chat
from runtime.serve.chat import OutputParser, parse, parse_tool_call, template_messages, tool_schemas
from runtime.tokenizer import _compile_template

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"  # copies of GLM's own templates
REAL = sorted(TEMPLATES.glob("*.jinja"))

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "detail": {"type": "object"},
        "metric": {"type": "boolean"}, "zip": {"type": "string"}, "ratio": {"type": ["number", "null"]}}}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]

ARGS = {"city": "Paris, France", "days": 3, "detail": {"wind": [1, 2]}, "metric": True, "zip": "75001",
        "ratio": 0.5}


def render(tpl: str, messages, **kw) -> str:
    return _compile_template(tpl).render(messages=template_messages(messages), **kw)


def test_real_templates_present():
    assert {p.name for p in REAL} == {"GLM-4.6.jinja", "GLM-4.7-Flash.jinja"}


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_reply_written_by_the_template_parses_back(path):
    """An assistant turn as the template writes it (reasoning, text, two tool calls with typed
    arguments) is what a GLM model emits; parsing the text after the generation prompt gives back
    the same reasoning, content and calls, whole and fed one character at a time."""
    tpl = path.read_text()
    user = [{"role": "user", "content": "Weather in Paris?"}]
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}},
             {"id": "c2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]
    turn = {"role": "assistant", "content": "Let me check.", "reasoning_content": "The user wants weather.",
            "tool_calls": calls}
    prompt = render(tpl, user, tools=TOOLS, add_generation_prompt=True)
    full = render(tpl, user + [turn], tools=TOOLS, add_generation_prompt=False)
    assert full.startswith(prompt)
    reply = full[len(prompt):]
    kw = dict(in_reasoning=chat.starts_in_reasoning(prompt), tools=TOOLS)
    assert kw["in_reasoning"] == (path.stem == "GLM-4.7-Flash")
    whole = parse(reply, **kw)
    assert whole.reasoning == "The user wants weather."
    assert whole.content.strip() == "Let me check."
    assert [(c.name, c.arguments) for c in whole.tool_calls] == [("get_weather", ARGS), ("now", {})]
    p = OutputParser(**kw)
    parts = [p.feed(ch) for ch in reply] + [p.finish()]
    assert "".join(d.reasoning for d in parts).rstrip() == whole.reasoning
    assert "".join(d.content for d in parts) == whole.content
    assert [c.arguments for d in parts for c in d.tool_calls] == [ARGS, {}]
    # no tag or partial tag ever leaks into the text
    assert "<" not in "".join(d.content + d.reasoning for d in parts)


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_tool_results_and_thinking_switch_render(path):
    tpl = path.read_text()
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "12:00"}]
    out = render(tpl, msgs, tools=TOOLS, add_generation_prompt=True)
    assert "<tool_response>" in out and "12:00" in out and "<|observation|>" in out
    assert "<tool_call>now" in out and "Be brief." in out and "Weather?" in out
    off = render(tpl, msgs[:2], add_generation_prompt=True, enable_thinking=False)
    assert not chat.starts_in_reasoning(off)
    assert off.rstrip().endswith("</think>")


def test_typed_arguments_follow_the_schema():
    schemas = tool_schemas(TOOLS)
    body = ("get_weather\n<arg_key>city</arg_key>\n<arg_value>42</arg_value>\n"
            "<arg_key>days</arg_key><arg_value>7</arg_value><arg_key>metric</arg_key><arg_value>false</arg_value>"
            "<arg_key>detail</arg_key><arg_value>not json</arg_value><arg_key>extra</arg_key><arg_value>[1]</arg_value>")
    c = parse_tool_call(body, schemas)
    # a string stays a string even when it reads as JSON; a value that is not its type stays text
    assert c.arguments == {"city": "42", "days": 7, "metric": False, "detail": "not json", "extra": [1]}
    assert json.loads(c.openai()["function"]["arguments"]) == c.arguments
    assert c.openai(index=0)["index"] == 0 and c.id.startswith("call_")


@pytest.mark.parametrize("text", [
    "<tool_call>unknown_tool<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",
    "<tool_call><arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",
    "<tool_call>get_weather junk<arg_key>a</arg_key></tool_call>",
    "<tool_call>get_weather<arg_key>city</arg_key><arg_value>x</arg_value> trailing</tool_call>",
    "<tool_call>get_weather<arg_key>city</arg_key><arg_value>never closed",
])
def test_malformed_call_stays_text(text):
    d = parse("ok " + text, tools=TOOLS)
    assert d.tool_calls == []
    assert d.content == "ok " + text


def test_reasoning_split_and_no_tools():
    d = parse("<think>\nhmm\n</think>\n\nAnswer <tool_call>x</tool_call>")
    assert (d.reasoning, d.content) == ("hmm", "Answer <tool_call>x</tool_call>")  # no tools: text
    d = parse("still thinking", in_reasoning=True)
    assert (d.reasoning, d.content) == ("still thinking", "")
    assert parse("a < b and <thin", tools=TOOLS).content == "a < b and <thin"


def test_bad_messages_name_the_field():
    with pytest.raises(chat.ChatError) as e:
        template_messages([{"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": "{bad"}}]}])
    assert e.value.param == "messages[0].tool_calls[0].function.arguments"
    with pytest.raises(chat.ChatError) as e:
        template_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert e.value.param == "messages[0].content[0].type"


# ---- request validation and the response builder ----------------------------------------------


def _api_error(model, body):
    from runtime.serve.protocol import ApiError, parse_body

    with pytest.raises(ApiError) as e:
        parse_body(model, body if isinstance(body, bytes) else json.dumps(body).encode())
    return e.value


def test_request_validation_names_the_field():
    from runtime.serve.protocol import ChatRequest, CompletionRequest, parse_body

    m = [{"role": "user", "content": "hi"}]
    cases = [
        (b"{not json", None, "not valid JSON"),
        (b"", None, "empty"),
        ({"messages": m, "temperature": "hot"}, "temperature", "valid number"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "'user'"),
        ({"messages": m, "n": 2}, "n", "n=1"),
        ({"messages": m, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"messages": []}, "messages", "at least 1"),
        ({}, "messages", "required"),
        ({"messages": m, "stop": ["ok", ""]}, "stop[1]", "empty"),
        ({"messages": m, "response_format": {"type": "json_object"}}, "response_format", "json_object"),
        ({"messages": m, "tool_choice": "required"}, "tool_choice", "auto"),
        ({"messages": m, "logprobs": True}, "logprobs", "not supported"),
        ({"messages": "hi"}, "messages", "array"),
    ]
    for body, param, text in cases:
        err = _api_error(ChatRequest, body)
        assert err.status == 400 and err.param == param and text in err.message, (body, err.body())
        assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    assert _api_error(CompletionRequest, {"prompt": ["a", "b"]}).param == "prompt"
    ok = parse_body(ChatRequest, json.dumps({"messages": m, "temperature": 1, "unknown_field": 1}).encode())
    assert ok.temperature == 1.0
    assert parse_body(CompletionRequest, b'{"prompt": ["abc"]}').prompt_value() == "abc"


def test_reply_builds_openai_shapes():
    from runtime.serve.app import ServerState, _Reply

    text = "<think>plan</think>Calling.<tool_call>now</tool_call>"
    stats = {"finish_reason": "eos", "generated_tokens": 9, "cached_tokens": 2, "prompt_tokens": 5}
    r = _Reply(ServerState(alias="m"), "chatcmpl-x", {"tools": TOOLS}, 5)
    deltas = [d for ch in text for d in r.feed(ch)] + r.flush()
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "plan"
    assert "".join(d.get("content", "") for d in deltas) == "Calling."
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["function"] == {"name": "now", "arguments": "{}"} and calls[0]["index"] == 0
    assert r.finish_reason(stats) == "tool_calls"
    r2 = _Reply(ServerState(alias="m"), "chatcmpl-y", {"tools": TOOLS}, 5)
    r2.feed(text)
    out = r2.final(stats)
    msg = out["choices"][0]["message"]
    assert out["object"] == "chat.completion" and out["choices"][0]["finish_reason"] == "tool_calls"
    assert msg["content"] == "Calling." and msg["reasoning_content"] == "plan"
    assert msg["tool_calls"][0]["function"]["name"] == "now"
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14,
                            "prompt_tokens_details": {"cached_tokens": 2}}
    assert out["timings"]["cache_n"] == 2 and out["timings"]["prompt_n"] == 3


def test_health_is_503_while_loading_and_auth():
    from starlette.testclient import TestClient

    from runtime.serve.app import ServerState, create_app

    c = TestClient(create_app(ServerState(alias="m", api_key="k")))
    r = c.get("/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and "retry-after" in r.headers
    assert c.post("/v1/chat/completions", json={}).status_code == 401
    r = c.post("/v1/chat/completions", json={}, headers={"Authorization": "Bearer k"})
    assert r.status_code == 503
    assert c.get("/v1/models", headers={"Authorization": "Bearer k"}).json()["data"][0]["id"] == "m"
    r = c.get("/nope", headers={"Authorization": "Bearer k"})
    assert r.status_code == 404 and "error" in r.json()


def test_plan_server_section(tmp_path):
    from placement.schema import PlanError, parse_plan_text

    p = parse_plan_text("server:\n  port: 9000\n  parallel: 4\n  ctx_size: 8192\n  alias: glm\n", "x.yaml")
    assert (p.server.port, p.server.parallel, p.server.ctx_size, p.server.alias) == (9000, 4, 8192, "glm")
    assert p.server.host == "127.0.0.1" and p.server.queue is None
    with pytest.raises(PlanError, match=r"x.yaml:2: server.parallel: expected a slot count"):
        parse_plan_text("server:\n  parallel: 0\n", "x.yaml")
    with pytest.raises(PlanError, match=r"server.prot: unknown key \(did you mean 'port'\?\)"):
        parse_plan_text("server:\n  prot: 1\n", "x.yaml")
