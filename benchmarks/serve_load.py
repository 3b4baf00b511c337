"""Load check of `nextn serve`: N streaming clients for S seconds against a server with P slots.

    python benchmarks/serve_load.py [PLAN|MODEL] [--clients 8] [--seconds 60] [--slots 2] [--tokens 48]
                                    [--queue N] [--warmup 10]

Starts the server on a free localhost port (the demo model by default), then every client loops:
a streaming chat completion with its own prompt, timed from request to first token and to the end.
Reports requests/s, p50/p99 time to first token, tokens/s per stream, errors (503s from the queue
bound are counted apart: with more clients than slots plus queue they are expected; `--queue`
sets the server's bound, so a small one provokes them), and the server's resident memory when it
is ready, after the first `--warmup` seconds of load (allocator and caches warmed up) and at the
end, with the growth after the warm-up. Bounded: every loop stops at the deadline.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main(argv=None) -> int:
    import httpx
    from openai import APIStatusError, OpenAI

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--queue", type=int, default=None, help="the server's --queue (default: its own, 4x slots)")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the RSS baseline")
    a = ap.parse_args(argv)
    port = free_port()
    cmd = [sys.executable, "-m", "runtime.cli", "serve", *([a.target] if a.target else []), "--port", str(port),
           "-np", str(a.slots), *(["--queue", str(a.queue)] if a.queue is not None else [])]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while time.time() - t0 < 120:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                print(f"server exited: {proc.stderr.read()[-2000:]}", file=sys.stderr)
                return 1
            time.sleep(0.3)
        rss0 = rss_mb(proc.pid)
        lock = threading.Lock()
        ttft, speed, done, busy, errors = [], [], [0], [0], []
        deadline = time.time() + a.seconds

        def client(i: int):
            c = OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
            prompts = ["def fibonacci(n):", "class Stack:", "import os\ndef main():", "def parse(line):"]
            while time.time() < deadline:
                t = time.time()
                first, n = None, 0
                try:
                    s = c.chat.completions.create(model="m", stream=True, max_tokens=a.tokens, temperature=0,
                                                  messages=[{"role": "user", "content": prompts[i % 4] + f"  # {i}"}])
                    for ch in s:
                        d = ch.choices[0].delta if ch.choices else None
                        if d is not None and (d.content or getattr(d, "reasoning_content", None)):
                            n += 1
                            if first is None:
                                first = time.time()
                    end = time.time()
                    with lock:
                        done[0] += 1
                        if first is not None:
                            ttft.append(first - t)
                            if n > 1 and end > first:
                                speed.append((n - 1) / (end - first))
                except APIStatusError as e:
                    with lock:
                        if e.status_code == 503:
                            busy[0] += 1
                        else:
                            errors.append(f"{e.status_code}: {str(e)[:120]}")
                    time.sleep(0.2)
                except Exception as e:  # noqa: BLE001 - counted, and the loop goes on
                    with lock:
                        errors.append(f"{type(e).__name__}: {str(e)[:120]}")

        rss_warm = [rss0]

        def sample_rss():  # the baseline after the warm-up, when the load has run a while
            time.sleep(min(a.warmup, a.seconds / 2))
            rss_warm[0] = rss_mb(proc.pid)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        t_start = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join(a.seconds + 90)
        wall = time.time() - t_start
        rss1 = rss_mb(proc.pid)
        sampler.join(1)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"{a.clients} clients, {a.slots} slots, {a.seconds:.0f} s, {a.tokens} tokens a reply")
    print(f"requests done {done[0]} ({done[0] / wall:.2f}/s), 503 (queue full) {busy[0]}, errors {len(errors)}")
    print(f"time to first token p50 {pct(ttft, 0.5) * 1e3:.0f} ms, p99 {pct(ttft, 0.99) * 1e3:.0f} ms")
    if speed:
        print(f"tokens/s per stream (pieces after the first): median {statistics.median(speed):.1f}")
    warm = rss_warm[0]
    print(f"server RSS {rss0:.0f} MB when ready, {warm:.0f} MB after {min(a.warmup, a.seconds / 2):.0f} s of load, "
          f"{rss1:.0f} MB at end ({(rss1 / warm - 1) * 100:+.1f}% after the warm-up, "
          f"{(rss1 / rss0 - 1) * 100:+.1f}% since ready)")
    for e in errors[:5]:
        print("  error:", e)
    print(f"server exit code {proc.returncode}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
