"""Host calls per decoded token: torch operations (every op that reaches torch's dispatcher, counted
with a TorchDispatchMode) plus calls into the C kernels, on the bundled demo model or any plan.

    python benchmarks/host_calls.py [PLAN|MODEL] [--tokens 64] [--draft 1,2,3]

Decode only: the calls of a 1-token generation (prefill and the first token) are subtracted from
those of an N-token one, over N-1 tokens. Fixed draft lengths (no adaptive policy), greedy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


class CountKernelCalls:
    """Wraps the C entry points the Python wrappers call (module globals of cpu_kernels, and each
    block stack's own reference)."""

    NAMES = ("_c_forward", "_c_linear", "_c_dequant")

    def __init__(self, engine):
        import cpu_kernels

        self.n = 0
        self.mod, self.saved = cpu_kernels, {k: getattr(cpu_kernels, k) for k in self.NAMES}
        fused = engine.model.fused
        self.stacks = [s for s in ((fused.main, fused.mtp) if fused is not None else ()) if s is not None]

    def _wrap(self, f):
        def w(*a):
            self.n += 1
            return f(*a)
        return w

    def __enter__(self):
        for k, f in self.saved.items():
            setattr(self.mod, k, self._wrap(f))
        for s in self.stacks:
            s._orig_fn, s._fn = s._fn, self._wrap(s._fn)
        return self

    def __exit__(self, *exc):
        for k, f in self.saved.items():
            setattr(self.mod, k, f)
        for s in self.stacks:
            s._fn = s._orig_fn
        return False


def calls_per_token(engine, prompt: str, tokens: int, **kw) -> tuple[float, float, int]:
    """(torch ops, kernel calls) per decoded token, and the tokens decoded."""
    counts = []
    for n in (1, tokens):
        engine.generate(prompt, max_tokens=n, **kw)  # warm: first-use work is not per-token work
        with CountOps() as ops, CountKernelCalls(engine) as kc:
            r = engine.generate(prompt, max_tokens=n, **kw)
        counts.append((ops.n, kc.n, r.stats["generated_tokens"]))
    (o1, k1, g1), (on, kn, gn) = counts
    d = max(1, gn - g1)
    return (on - o1) / d, (kn - k1) / d, d


def main(argv=None) -> int:
    import runtime

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--draft", default="1,2,3")
    ap.add_argument("--prompt", default="def fibonacci(n):")
    ap.add_argument("--repeat-penalty", type=float, default=None,
                    help="override the plan's (the demo plan's 1.15 adds a few ops per row; 1: off)")
    a = ap.parse_args(argv)
    eng = runtime.load(a.target, progress=False)
    print(f"{eng.file.path.name}: fused blocks {eng.load_report.fused_blocks}")
    print(f"{'setting':10} {'torch ops/token':>16} {'C calls/token':>14} {'host calls/token':>17}")
    for k in [0] + [int(x) for x in a.draft.split(",") if x.strip()]:
        kw = dict(mtp=False) if k == 0 else dict(mtp=True, draft_max=k, adaptive=False)
        if a.repeat_penalty is not None:
            kw["repeat_penalty"] = a.repeat_penalty
        ops, kc, _ = calls_per_token(eng, a.prompt, a.tokens, **kw)
        print(f"{('plain' if k == 0 else f'mtp k={k}'):10} {ops:16.1f} {kc:14.1f} {ops + kc:17.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
