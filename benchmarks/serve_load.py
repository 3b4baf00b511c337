"""Load check of `nextn serve` (not a test): C streaming clients for D seconds against S slots.

    python benchmarks/serve_load.py [--clients 8] [--seconds 60] [--slots 2] [--max-tokens 48] [MODEL|PLAN]

Starts the server (demo model by default) on a free port, warms it up, then each client sends
streamed chat requests back to back (prompts drawn in turn from a fixed list). Reports requests/s,
time to first token (p50/p99), decode tokens/s per stream, errors, and the server's RSS after the
warm-up and at the end. Afterwards a burst of more requests than slots + queue provokes 503s on
purpose; those are counted apart (they must all carry Retry-After) and are not errors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from serve_util import ServerProcess  # noqa: E402

PROMPTS = ["def fibonacci(n):", "import os\n\ndef list_files(path):", "class Stack:\n    def __init__(self):",
           "def parse_args(argv):", "import json\n\ndef load(path):", "def merge_sort(items):",
           "class Parser:\n    def parse(self, text):", "def main():\n    args ="]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_request(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> dict:
    """A streamed chat request: TTFT (first generated text), tokens and decode rate."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    usage = None
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return {"status": r.status_code, "retry_after": r.headers.get("retry-after")}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                return {"status": 500, "error": ev["error"]["message"]}
            if ev.get("usage"):
                usage = ev["usage"]
            ch = ev.get("choices") or []
            if first is None and ch and (ch[0]["delta"].get("content") or ch[0]["delta"].get("reasoning_content")):
                first = time.perf_counter()
    t1 = time.perf_counter()
    n = usage["completion_tokens"] if usage else 0
    out = {"status": 200, "tokens": n, "ttft": (first or t1) - t0, "total": t1 - t0}
    if first is not None and n > 1 and t1 > first:
        out["tok_s"] = (n - 1) / (t1 - first)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", nargs="?", help="PLAN.yaml or MODEL.gguf (default: the demo)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--ctx-size", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--burst", type=int, default=24, help="requests sent at once after the run (to provoke 503s)")
    a = ap.parse_args(argv)

    log = Path("/tmp") / f"serve_load_{int(time.time())}.log"
    args = [*(a.target and [a.target] or []), "-np", str(a.slots), "-c", str(a.ctx_size)]
    srv = ServerProcess(*args, log=log)
    try:
        with httpx.Client(timeout=120) as c:  # warm-up: one request per slot
            for p in PROMPTS[:a.slots]:
                one_request(c, srv.url, p, 8)
        rss0 = rss_mib(srv.proc.pid)
        results: list[dict] = []
        lock = threading.Lock()
        stop_at = time.perf_counter() + a.seconds

        def client(i: int):
            k = i
            with httpx.Client(timeout=300) as c:
                while time.perf_counter() < stop_at:
                    try:
                        r = one_request(c, srv.url, PROMPTS[k % len(PROMPTS)], a.max_tokens)
                    except httpx.HTTPError as e:
                        r = {"status": -1, "error": repr(e)}
                    k += a.clients
                    with lock:
                        results.append(r)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss1 = rss_mib(srv.proc.pid)

        # the burst: more at once than slots + queue (default 4x slots) hold
        burst: list[dict] = []

        def burst_one(i):
            with httpx.Client(timeout=300) as c:
                r = one_request(c, srv.url, PROMPTS[i % len(PROMPTS)], 4)
            with lock:
                burst.append(r)

        bt = [threading.Thread(target=burst_one, args=(i,)) for i in range(a.burst)]
        for t in bt:
            t.start()
        for t in bt:
            t.join()
        rss2 = rss_mib(srv.proc.pid)
        metrics = httpx.get(srv.url + "/metrics", timeout=30).text
    finally:
        rc = srv.stop()

    ok = [r for r in results if r["status"] == 200]
    errors = [r for r in results if r["status"] != 200]
    ttft = sorted(r["ttft"] for r in ok)
    rates = [r["tok_s"] for r in ok if "tok_s" in r]

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")

    acc = [ln for ln in metrics.splitlines() if ln.startswith("nextn_draft_acceptance_rate ")]
    b503 = [r for r in burst if r["status"] == 503]
    print(f"nextn serve load: {a.clients} clients x {wall:.0f} s against {a.slots} slots "
          f"(ctx {a.ctx_size}), max_tokens {a.max_tokens}, target {a.target or 'demo'}")
    print(f"  requests          {len(ok)} ok, {len(errors)} errors -> {len(ok) / wall:.2f} req/s")
    print(f"  tokens generated  {sum(r['tokens'] for r in ok)} -> {sum(r['tokens'] for r in ok) / wall:.1f} tok/s total")
    print(f"  TTFT              p50 {pct(ttft, .5) * 1e3:.0f} ms, p99 {pct(ttft, .99) * 1e3:.0f} ms")
    print(f"  decode per stream median {statistics.median(rates) if rates else float('nan'):.1f} tok/s "
          f"(p10 {pct(sorted(rates), .1):.1f}, p90 {pct(sorted(rates), .9):.1f})")
    print(f"  MTP acceptance    {acc[0].split()[1] if acc else '?'}")
    print(f"  server RSS        {rss0:.0f} MiB after warm-up, {rss1:.0f} MiB at the end "
          f"({(rss1 / rss0 - 1) * 100:+.1f}%), {rss2:.0f} MiB after the burst")
    print(f"  burst of {a.burst}       {len(b503)} x 503 (all with Retry-After: "
          f"{all(r.get('retry_after') for r in b503)}), {sum(r['status'] == 200 for r in burst)} x 200, "
          f"{sum(r['status'] not in (200, 503) for r in burst)} other")
    print(f"  server exit code  {rc} (SIGTERM)")
    for r in errors[:5]:
        print("  error:", r)
    return 0 if not errors and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
