"""Ctrl-C (SIGINT) during load, prefill, decode and `nextn tune`: the CLI stops promptly, keeps
what was generated on stdout, exits 130 without a traceback, and leaves no half-written plan or
trace file (they are written to a temporary name, then renamed).

Each case runs the CLI in a subprocess and sends SIGINT once the run is in the phase under test:
load and prefill are held there by a patched function that sleeps in short steps (as a long kernel
call returns to Python between tensors or chunks), decode and tune by waiting for their output.
Every wait is bounded.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 60.0      # for the run to reach the phase (imports and load on a busy machine)
EXIT_S = 10.0       # from SIGINT to exit

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# Runs runtime.cli.main(argv) after `patch` (Python source) has been executed.
_DRIVER = """
import sys, time
{patch}
from runtime import cli
sys.exit(cli.main({argv!r}))
"""

# A phase held open: prints MARK to stderr once, then sleeps in 50 ms steps (signals land between)
_HOLD = """
def _hold(fn):
    def held(*a, **k):
        if not getattr(held, "done", False) and {cond}:
            held.done = True
            print("MARK", file=sys.stderr, flush=True)
            for _ in range(600):
                time.sleep(0.05)
        return fn(*a, **k)
    return held
"""


class Proc:
    def __init__(self, argv: list[str], patch: str = "", cwd: Path = ROOT):
        code = _DRIVER.format(patch=patch, argv=argv)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.p = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        self.out, self.err = b"", b""

    def read_until(self, pred, limit: float = LIMIT_S) -> None:
        end = time.monotonic() + limit
        while not pred(self) and time.monotonic() < end and self.p.poll() is None:
            r, _, _ = select.select([self.p.stdout, self.p.stderr], [], [], 0.05)
            for f in r:
                chunk = os.read(f.fileno(), 65536)
                if f is self.p.stdout:
                    self.out += chunk
                else:
                    self.err += chunk
        assert pred(self), f"the run did not reach the phase (rc={self.p.poll()}): {self.err.decode()[-2000:]}"

    def interrupt(self) -> float:
        t = time.monotonic()
        self.p.send_signal(signal.SIGINT)
        try:
            out, err = self.p.communicate(timeout=EXIT_S)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.communicate()
            pytest.fail(f"no exit within {EXIT_S} s of SIGINT")
        self.out += out
        self.err += err
        return time.monotonic() - t

    def check_clean_exit(self) -> str:
        err = self.err.decode()
        assert self.p.returncode == 130, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
        return err


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _no_partial_trace(folder: Path, trace: Path) -> None:
    """Nothing but the trace, and that one whole: a run stopped in prefill or decode writes the
    trace of what it did (renamed into place), a run stopped in its load writes none."""
    left = _leftovers(folder)
    assert left in ([], [trace.name]), left
    if left:
        import json

        assert "traceEvents" in json.loads(trace.read_text())


def test_interrupt_during_load(tmp_path):
    trace = tmp_path / "t.json"
    patch = _HOLD.format(cond="True") + "import runtime.engine as E\nE.build_model = _hold(E.build_model)\n"
    r = Proc(["run", "--trace", str(trace), "--max-tokens", "8"], patch)
    r.read_until(lambda s: b"MARK" in s.err)
    r.interrupt()
    err = r.check_clean_exit()
    assert "interrupted" in err
    assert _leftovers(tmp_path) == []


def test_interrupt_during_prefill(tmp_path):
    trace = tmp_path / "t.json"
    # the prompt's forward (more than one token): the first model call of the run
    patch = _HOLD.format(cond="len(a[1]) > 1") + \
        "import runtime.model as M\nM.GLM4Model.forward = _hold(M.GLM4Model.forward)\n"
    r = Proc(["run", "-p", "def add(a, b):", "--trace", str(trace), "--max-tokens", "8"], patch)
    r.read_until(lambda s: b"MARK" in s.err)
    r.interrupt()
    err = r.check_clean_exit()
    assert "interrupted" in err
    assert r.out.decode().startswith("def add(a, b):")  # the prompt, echoed before the run
    _no_partial_trace(tmp_path, trace)


def test_interrupt_during_decode_keeps_the_text(tmp_path):
    trace = tmp_path / "t.json"
    prompt = "def fibonacci(n):"
    # the demo's context holds ~1,000 new tokens: seconds of decoding to interrupt
    r = Proc(["run", "-p", prompt, "--trace", str(trace), "--max-tokens", "1000"])
    r.read_until(lambda s: len(s.out) > len(prompt) + 8)
    seen = r.out.decode()
    r.interrupt()
    err = r.check_clean_exit()
    assert "interrupted: the text above is what was generated so far" in err
    text = r.out.decode()
    assert text.startswith(seen) and text.endswith("\n")
    assert " tokens (" not in err  # no stats line for a run cut short
    _no_partial_trace(tmp_path, trace)


def test_interrupt_during_tune_writes_a_whole_plan_or_none(tmp_path):
    plan = tmp_path / "plan.yaml"
    r = Proc(["tune", "--time-budget", "300", "-o", str(plan)])
    r.read_until(lambda s: b"measuring" in s.err)
    r.interrupt()
    err = r.check_clean_exit()
    assert "interrupted" in err
    # the best plan so far (or the cost model's pick), whole and valid; no temporary file beside it
    assert _leftovers(tmp_path) == ["plan.yaml"]
    from placement import load_plan

    load_plan(plan)
