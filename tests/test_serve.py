"""`nextn serve` end to end: the real server in a subprocess (demo model, 4 slots of 512 tokens, an
API key), spoken to with the `openai` client and raw httpx. Every expected text is the engine's own
greedy (or seeded) output for the same prompt, computed here in-process, never a fixed string.
Every request loop is bounded in count, and every wait in time."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("openai")

from runtime.serve import chat  # noqa: E402
from serve_util import ServerProcess  # noqa: E402

KEY = "sk-test-key"
N = 24  # tokens per reply: small, the whole module runs in well under a minute on 2 cores
PROMPTS = ["def fibonacci(n):", "import os\n\ndef list_files(path):", "class Stack:\n    def __init__(self):",
           "def parse_args(argv):\n    parser ="]


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """Fixed draft length (--no-adaptive), so every MTP request drafts whatever this machine's
    load: the test is of exactness, and of MTP really running."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    s = ServerProcess("-np", "4", "-c", "2048", "--no-adaptive", log=log, api_key=KEY, ready_within=None)
    yield s
    rc = s.stop()
    assert rc == 0, s.output()[-2000:]


@pytest.fixture(scope="module")
def server(started, ref):
    started.wait_ready()  # the references are computed while the server loads
    return started


@pytest.fixture(scope="module")
def engine():
    import runtime

    return runtime.load(progress=False)


def chat_ids(engine, messages, **kw) -> list[int]:
    return engine.tokenize(engine.tokenizer.apply_chat_template(chat.template_messages(messages), **kw))


@pytest.fixture(scope="module")
def ref(engine):
    """prompt -> the engine's greedy reply alone, MTP off: (chat content, completion text)."""
    out = {}
    for p in PROMPTS:
        c = engine.generate(chat_ids(engine, [{"role": "user", "content": p}]), max_tokens=N, mtp=False).text
        t = engine.generate(engine.tokenize(p), max_tokens=N, mtp=False).text
        out[p] = (chat.parse(c).content, t)
    return out


def ask(client, prompt, **extra):
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": prompt}],
                                       max_tokens=N, temperature=0, extra_body=extra or None)
    return r


def test_health_models_and_startup_line(server):
    h = httpx.get(server.url + "/health", timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["demo"]
    line = [ln for ln in server.output().splitlines() if "listening on" in ln][0]
    assert f"127.0.0.1:{server.port}" in line and "4 slot(s)" in line and "512 per slot" in line
    assert "MTP on" in line


def test_chat_and_completion_equal_the_engine(server, ref):
    c = server.client()
    for p in PROMPTS[:1]:
        r = ask(c, p)
        assert r.choices[0].message.content == ref[p][0]
        assert r.choices[0].finish_reason in ("length", "stop")
        assert r.usage.completion_tokens <= N and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        t = c.completions.create(model="demo", prompt=p, max_tokens=N, temperature=0)
        assert t.choices[0].text == ref[p][1]
        assert t.usage.completion_tokens == N or t.choices[0].finish_reason == "stop"
        raw = httpx.post(server.url + "/v1/chat/completions", headers=server.headers, timeout=60, json={
            "messages": [{"role": "user", "content": p}], "max_tokens": N}).json()
        assert {"prompt_n", "predicted_per_second", "draft_n", "draft_n_accepted"} <= set(raw["timings"])


def test_greedy_mtp_on_equals_off_alone_and_concurrent_cache_on_and_off(server, ref):
    """The lossless claim, per request: MTP on, MTP off, prompt caching off, each alone and as 4
    concurrent clients, all give the engine's own greedy reply."""
    c = server.client()
    modes = [{}, {"mtp": False}, {"cache_prompt": False}, {"cache_prompt": False, "mtp": False}]
    drafted = {0: 0, 1: 0}
    for mode in modes:
        for p in PROMPTS[:2]:
            r = ask(c, p, **mode)
            assert r.choices[0].message.content == ref[p][0], (mode, p)
    with ThreadPoolExecutor(4) as ex:
        for i, mode in enumerate(modes):
            for p, r in zip(PROMPTS, ex.map(lambda p: ask(c, p, **mode).model_dump(), PROMPTS)):
                assert r["choices"][0]["message"]["content"] == ref[p][0], (mode, p)
                drafted[int(mode.get("mtp", True))] += r["timings"]["draft_n"]
    assert drafted[0] == 0 and drafted[1] > 0  # MTP really ran where asked, and only there


def test_four_concurrent_streams_get_their_own_text(server, ref):
    c = server.client()

    def stream(p):
        chunks = list(c.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": p}], max_tokens=N, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        return text, finish, chunks[-1].usage

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(stream, PROMPTS))
    for p, (text, finish, usage) in zip(PROMPTS, results):
        assert text == ref[p][0]
        assert len(finish) == 1 and finish[0] in ("length", "stop")
        assert usage is not None and usage.completion_tokens >= 1


def test_prompt_cache_second_turn(server):
    c = server.client()
    m1 = [{"role": "user", "content": "def merge_sort(items):"}]
    r1 = c.chat.completions.create(model="demo", messages=m1, max_tokens=N, temperature=0)
    m2 = m1 + [{"role": "assistant", "content": r1.choices[0].message.content},
               {"role": "user", "content": "def quick_sort(items):"}]
    hot = c.chat.completions.create(model="demo", messages=m2, max_tokens=N, temperature=0)
    cold = c.chat.completions.create(model="demo", messages=m2, max_tokens=N, temperature=0,
                                     extra_body={"cache_prompt": False})
    assert hot.usage.prompt_tokens_details.cached_tokens > 0
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert hot.choices[0].message.content == cold.choices[0].message.content
    assert hot.usage.prompt_tokens == cold.usage.prompt_tokens


def test_seeded_sampling_is_reproducible_and_is_the_engines(server, engine):
    c = server.client()
    p = PROMPTS[0]

    def sample(seed):
        return c.chat.completions.create(model="demo", messages=[{"role": "user", "content": p}], max_tokens=N,
                                         temperature=1.0, seed=seed, extra_body={"mtp": False, "top_k": 40}
                                         ).choices[0].message.content

    a, b, other = sample(1234), sample(1234), sample(99)
    want = engine.generate(chat_ids(engine, [{"role": "user", "content": p}]), max_tokens=N, mtp=False,
                           temperature=1.0, top_k=40, seed=1234).text
    assert a == b == chat.parse(want).content
    assert other != a


def test_tool_round_trip_and_thinking_switch(server, engine):
    """Tools, an assistant tool call and the tool's result go through the template; the reply is
    the engine's for exactly that rendered prompt. (The demo model does not emit tool calls: their
    parsing is tested on the real GLM templates in test_serve_chat.py.)"""
    c = server.client()
    tools = [{"type": "function", "function": {"name": "now", "description": "the time",
                                               "parameters": {"type": "object", "properties": {}}}}]
    msgs = [{"role": "system", "content": "You write Python."},
            {"role": "user", "content": "What time is it?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "def now():"}]
    r = c.chat.completions.create(model="demo", messages=msgs, tools=tools, max_tokens=N, temperature=0)
    ids = chat_ids(engine, msgs, tools=tools)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == chat.parse(engine.generate(ids, max_tokens=N, mtp=False).text).content
    off = c.chat.completions.create(model="demo", messages=msgs[:2], max_tokens=4, temperature=0,
                                    extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.usage.prompt_tokens == len(chat_ids(engine, msgs[:2], enable_thinking=False))
    assert off.usage.prompt_tokens > len(chat_ids(engine, msgs[:2]))


def _status(server):
    return httpx.get(server.url + "/health", timeout=10).json()["slots_processing"]


def test_disconnect_frees_the_slot(server, ref):
    """Four long streams fill the slots; one client goes away and its slot is free while the
    other three still run; a new request is served; closing the rest frees everything."""
    body = {"messages": [{"role": "user", "content": "def main():"}], "max_tokens": 450, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=60, headers=server.headers) as h:
        streams = []
        for _ in range(4):
            cm = h.stream("POST", server.url + "/v1/chat/completions", json=body)
            r = cm.__enter__()
            lines = r.iter_lines()
            for _, line in zip(range(50), lines):  # bounded: until the first generated text
                if line.startswith("data: ") and '"content": ""' not in line and "role" not in line:
                    break
            streams.append((cm, lines))  # keep the iterator: dropping it closes the response
        assert _status(server) == 4
        streams[0][0].__exit__(None, None, None)
        deadline = time.monotonic() + 15
        while _status(server) > 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _status(server) == 3  # the other three are far from their 450 tokens
        r = ask(server.client(), PROMPTS[0])
        assert r.choices[0].message.content == ref[PROMPTS[0]][0]
        for cm, _ in streams[1:]:
            cm.__exit__(None, None, None)
        deadline = time.monotonic() + 15
        while _status(server) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _status(server) == 0
    m = httpx.get(server.url + "/metrics", headers=server.headers, timeout=10).text
    assert float(re.search(r"^nextn_requests_cancelled_total (\S+)$", m, re.M)[1]) >= 4


def test_errors_are_openai_shaped_400s(server, engine):
    u = server.url + "/v1/chat/completions"
    hd = {**server.headers, "Content-Type": "application/json"}
    msg = [{"role": "user", "content": "hi"}]

    def post(body, path=u, headers=hd):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(path, content=data, headers=headers, timeout=30)

    cases = [
        (b"{oops", None), (b"[]", None), (b"null", None), (b"", None),
        ({"messages": msg, "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": msg, "n": 3}, "n"),
        ({"messages": [{"role": "user", "content": {"a": 1}}]}, "messages[0].content"),
        ({"messages": msg, "tools": [{"type": "function"}]}, "tools[0].function"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]},
         "messages[0].tool_calls[0].function.arguments"),
        ({"messages": msg, "response_format": {"type": "json_schema"}}, "response_format"),
        ({"messages": msg, "max_tokens": -1}, "max_tokens"),
        ({"messages": msg, "top_p": 0}, "top_p"),
        ({"messages": msg, "stream": "yes"}, "stream"),
        ({"messages": msg, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ]
    for body, param in cases:
        r = post(body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, (body, err)
        assert "\n" not in err["message"]
    r = post({"prompt": [10**9]}, path=server.url + "/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[0]"
    long = "x = 1\n" * 600
    r = post({"messages": [{"role": "user", "content": long}], "max_tokens": 4})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded"
    n_prompt = len(chat_ids(engine, [{"role": "user", "content": long}]))
    assert f"{n_prompt} tokens" in err["message"] and "512" in err["message"], err
    # auth: every route but /health
    for path, method in (("/v1/models", "GET"), ("/v1/chat/completions", "POST"), ("/metrics", "GET")):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, server.url + path, headers=headers, json={}, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    r = httpx.get(server.url + "/v2/nothing", headers=hd, timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    # tokenize / detokenize round trip
    ids = httpx.post(server.url + "/tokenize", headers=hd, json={"content": "def f(x):"}, timeout=10).json()["tokens"]
    back = httpx.post(server.url + "/detokenize", headers=hd, json={"tokens": ids}, timeout=10).json()["content"]
    assert back == "def f(x):"
    assert httpx.post(server.url + "/detokenize", headers=hd, json={"tokens": [-1]}, timeout=10).status_code == 400
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # still alive after all that
