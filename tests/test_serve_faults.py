"""`nextn serve` under load and faults: the bounded queue (503 + Retry-After), SIGTERM while
streams run (they end cleanly, the process exits 0), and bad command lines (exit 2, one line)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from serve_util import ROOT, ServerProcess

pytest.importorskip("openai")


def _open_stream(client: httpx.Client, url: str, max_tokens: int):
    body = {"messages": [{"role": "user", "content": "def main():"}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    cm = client.stream("POST", url + "/v1/chat/completions", json=body)
    return cm, cm.__enter__()


def _busy(url: str) -> tuple[int, int]:
    h = httpx.get(url + "/health", timeout=10).json()
    m = httpx.get(url + "/metrics", timeout=10).text
    waiting = [ln for ln in m.splitlines() if ln.startswith("nextn_requests_waiting ")][0]
    return h["slots_processing"], int(float(waiting.split()[1]))


def test_queue_bound_then_sigterm_ends_streams_and_exits_0(tmp_path):
    s = ServerProcess("-np", "1", "--queue", "1", "-c", "1024", log=tmp_path / "serve.log")
    try:
        with httpx.Client(timeout=60) as h:
            first, r1 = _open_stream(h, s.url, 900)  # long: still running when the signal comes
            second, r2 = _open_stream(h, s.url, 900)  # waits in the queue
            assert r1.status_code == r2.status_code == 200
            deadline = time.monotonic() + 20
            while _busy(s.url) != (1, 1) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _busy(s.url) == (1, 1)
            r = h.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            err = r.json()["error"]
            assert err["code"] == "server_busy" and "1 slots are busy" in err["message"]
            s.proc.send_signal(signal.SIGTERM)
            for resp in (r1, r2):  # both streams end with a last chunk and [DONE], not a cut connection
                lines = [ln for _, ln in zip(range(5000), resp.iter_lines()) if ln.startswith("data: ")]
                assert lines[-1] == "data: [DONE]"
                last = json.loads(lines[-2][6:])
                assert last["choices"][0]["finish_reason"] == "length"
            first.__exit__(None, None, None)
            second.__exit__(None, None, None)
        assert s.proc.wait(30) == 0
        assert "stopped" in s.output()
    finally:
        s.stop()


@pytest.mark.parametrize("args, words", [
    (["/nonexistent/model.gguf"], "model.gguf"),
    (["-np", "0"], "--parallel"),
    (["-ctk", "q8_0"], "quantized KV caches"),
    (["-ctk", "f16", "-ctv", "f32"], "same for both"),
])
def test_bad_command_line_exits_2_with_one_line(args, words):
    p = subprocess.run([sys.executable, "-m", "runtime.cli", "serve", "--port", "0", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in p.stderr
