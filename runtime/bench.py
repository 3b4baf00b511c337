"""`nextn bench`: benchmarks that report ratios against a baseline measured in the same run.

    nextn bench model [PLAN.yaml|MODEL.gguf] [--max-tokens N] [--repeats R] [--draft 1,2,3]
                      [--oracle 0,0.3,0.6,0.9]
        plain greedy decoding vs MTP at fixed draft lengths vs adaptive, same prompts, same
        process, settings interleaved prompt by prompt; every MTP output is checked equal to
        plain greedy. Ratios to plain: "vs plain" (median of rounds), "sum" (whole run),
        "paired" (median over each prompt of each round, the settings run back to back).
        "accept", "tok/step", "experts/verify": pooled over the runs' verification steps.
        "k chosen": decode steps per draft length over all rounds (0: a plain step, including
        those after the adaptive policy turned drafting off)
    nextn bench kernels [...]
        the CPU expert kernel benchmark (benchmarks/bench_kernels.py; see BENCHMARKS.md)
    nextn bench batch [PLAN|MODEL] [--sequences 1,2,4,8] [--mtp]
        several sequences in one batched step (runtime/bench_batch.py)
    nextn bench linear [...]
        the dense quantized (and F16/BF16) linear against torch on float32 copies (benchmarks/bench_linear.py)
"""

from __future__ import annotations

import argparse
import runpy
import statistics
import sys
from pathlib import Path

from .errors import NextnError

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\ndef main(argv):",
    "class Stack:\n    def __init__(self):",
    "    for key, value in sorted(items.items()):",
]


def bench_model(argv: list[str]) -> int:
    from .api import load
    from .engine import _Run
    from .draft_policy import Oracle

    p = argparse.ArgumentParser(prog="nextn bench model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", metavar="PLAN.yaml|MODEL.gguf")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="rounds over all settings; medians are reported")
    p.add_argument("--draft", default="1,2,3", help="comma-separated fixed draft lengths")
    p.add_argument("--oracle", default=None, metavar="A1,A2,...",
                   help="oracle acceptance rates: each draft is replaced by the true next token with "
                        "probability alpha (for models whose MTP layer does not predict, e.g. synthetic files)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the built-in prompts")
    p.add_argument("--gpu", default=None)
    p.add_argument("--threads", default=None)
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--ahead", action="store_true",
                   help="also each fixed length with draft-ahead on (drafts for the next step made beside "
                        "the verification's last CPU experts)")
    a = p.parse_args(argv)
    try:
        drafts = [int(x) for x in a.draft.split(",") if x.strip()]
        alphas = [float(x) for x in a.oracle.split(",")] if a.oracle else [None]
    except ValueError:
        raise NextnError(f"--draft/--oracle: expected comma-separated numbers") from None
    kw = {k: v for k, v in (("gpu", a.gpu), ("threads", a.threads), ("overlap", a.overlap)) if v is not None}
    eng = load(a.target, progress=False, **kw)
    prompts = [eng.tokenize(t) for t in PROMPTS[:max(1, a.prompts)]]
    eng.generate(prompts[0], max_tokens=8, mtp=False)  # warm-up

    def run(ids, alpha, target, **s):
        oracle = Oracle(target, alpha, eng.cfg.n_vocab, seed=len(ids)) if alpha is not None and s["mtp"] else None
        r = _Run(eng, ids, max_tokens=a.max_tokens, temperature=0.0, oracle=oracle, **s)
        for _ in r:
            pass
        return r.result

    # plain greedy outputs: the baseline, and the oracle's "true next tokens"
    targets = [ids + eng.generate(ids, max_tokens=a.max_tokens, mtp=False).tokens for ids in prompts]
    settings = [("plain", None, dict(mtp=False))]
    if eng.has_mtp:
        for alpha in alphas:
            settings += [(f"k={k}", alpha, dict(mtp=True, draft_max=k, adaptive=False, draft_ahead=False))
                         for k in drafts]
            if a.ahead:
                settings += [(f"k={k} ahead", alpha, dict(mtp=True, draft_max=k, adaptive=False, draft_ahead=True))
                             for k in drafts]
            settings += [(f"adaptive<={max(drafts)}", alpha, dict(mtp=True, draft_max=max(drafts), adaptive=True))]
    acc = {i: {"speed": [], "stats": [], "paired": []} for i in range(len(settings))}
    # Each adaptive setting keeps its own policy across rounds, as a long-running engine keeps it
    # across generations (the first round pays the warm-up).
    policies = {i: {} for i, (_, _, s) in enumerate(settings) if s.get("adaptive")}
    ties: list[str] = []
    for rnd in range(a.repeats):
        toks = [0] * len(settings)
        secs = [0.0] * len(settings)
        # Every setting runs each prompt in turn, so machine drift (other jobs, clocks) hits them
        # alike at the scale of one generation; the order turns each round.
        order = list(range(len(settings)))
        order = order[rnd % len(order):] + order[:rnd % len(order)]
        for ids, target in zip(prompts, targets):
            dec = {}
            for i in order:
                name, alpha, s = settings[i]
                if i in policies:
                    eng._policies = policies[i]
                r = run(ids, alpha, target, **s)
                if r.tokens != target[len(ids):]:
                    ties.append(f"{name}: " + explain_divergence(eng, ids, r.tokens, target[len(ids):]))
                toks[i] += r.stats["generated_tokens"] - 1
                secs[i] += r.stats["decode_s"]
                dec[i] = r.stats["decode_s"]
                acc[i]["stats"].append(r.stats)
            for i in order:  # the same tokens as plain's: a ratio of decode times is a speed ratio
                acc[i]["paired"].append(dec[0] / max(dec[i], 1e-9))
        for i in range(len(settings)):
            acc[i]["speed"].append(toks[i] / max(secs[i], 1e-9))
    base = statistics.median(acc[0]["speed"])
    base_s = sum(x["decode_s"] for x in acc[0]["stats"])
    print(f"model: {eng.file.path.name}  gpu side: {eng.device} ({str(eng.dtype).replace('torch.', '')})  "
          f"overlap: {eng.model.overlap}  prompts: {len(prompts)} x {a.max_tokens} tokens, "
          f"median of {a.repeats} rounds")
    hdr = (f"{'oracle':>6} {'setting':<12} {'tok/s':>8} {'vs plain':>8} {'sum':>6} {'paired':>6} {'accept':>7} {'tok/step':>8} "
           f"{'experts/verify':>14} {'act MB':>7} {'w bytes':>7} {'overlap':>7} {'k chosen':<20} ahead used/made")
    print(hdr)
    for i, (name, alpha, s) in enumerate(settings):
        sp = statistics.median(acc[i]["speed"])
        st = acc[i]["stats"]
        mean = lambda key: statistics.mean(x[key] for x in st)  # noqa: E731
        ks: dict = {}
        for x in st:
            for k, n in x["draft_lengths"].items():
                ks[k] = ks.get(k, 0) + n
        busy = sum(x["gpu_busy_s"] + x["cpu_busy_s"] for x in st)
        ov = sum(x["overlap_s"] for x in st) / busy if busy else 0.0
        # "sum": plain's total decode time over every round / this setting's (same tokens): the
        # whole run's ratio, where the median column shows a typical round; "paired": the median
        # over (round, prompt) of plain's decode time / this setting's, each pair run back to back
        ratio_sum = base_s / max(sum(x["decode_s"] for x in st), 1e-9)
        paired = statistics.median(acc[i]["paired"])
        # pooled over the runs (an adaptive run that drafted nothing adds no draft, rather than
        # a 0% acceptance): drafts accepted / drafted, tokens per verification step, distinct
        # experts per verification
        drafted, accepted = sum(x["drafted"] for x in st), sum(x["accepted"] for x in st)
        verifies = sum(x["verify_steps"] for x in st)
        accept = f"{accepted / drafted:.1%}" if drafted else "-"  # '-': nothing drafted
        tok_step = (accepted + verifies) / verifies if verifies else 1.0
        experts = sum(x["distinct_experts_per_verify"] * x["verify_steps"] for x in st) / verifies if verifies else 0.0
        print(f"{'-' if alpha is None else f'{alpha:.2f}':>6} {name:<12} {sp:>8.2f} {sp / base:>7.2f}x {ratio_sum:>5.2f}x "
              f"{paired:>5.2f}x "
              f"{accept:>7} {tok_step:>8.2f} "
              f"{experts:>14.1f} {mean('activation_bytes_moved') / 1e6:>7.2f} "
              f"{max(x['weight_bytes_moved'] for x in st):>7d} {ov:>7.1%} "
              f"{' '.join(f'{k}:{n}' for k, n in sorted(ks.items())) or '-':<20} "
              + (f"{sum(x['ahead_used'] for x in st)}/{sum(x['ahead_made'] for x in st)}" if s.get("draft_ahead") else "-"))
    for line in dict.fromkeys(ties):
        print(f"# {line}")
    return 0


def explain_divergence(eng, ids: list[int], got: list[int], want: list[int]) -> str:
    """An MTP run's greedy output `got` differs from plain greedy `want`. Lossless speculation
    means the same argmax at every position, but a verify batch's matmuls round differently from
    single-token steps (in bfloat16 on a GPU by far more than in float32), so where plain's top two
    logits are within rounding of each other the argmax may flip. Returns a description of such a
    near-tie; raises NextnError where the two tokens are clearly apart (a real bug)."""
    import torch

    i = next((j for j, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
    if i >= min(len(got), len(want)):
        raise NextnError(f"output length differs from plain greedy decoding ({len(got)} vs {len(want)} tokens): a bug")
    row = eng.logits(ids + want[:i])[-1]
    gap = float(row[want[i]] - row[got[i]])
    tol = 4 * torch.finfo(eng.dtype).eps * float(abs(row).max())
    where = f"prompt of {len(ids)} tokens, generated token {i}: plain {want[i]}, MTP {got[i]}"
    if abs(gap) > tol:
        raise NextnError(f"output differs from plain greedy decoding ({where}; logit gap {gap:.4g} > "
                         f"{tol:.3g}, not a rounding tie): a bug")
    return (f"differs from plain greedy at a near-tie ({where}; logit gap {gap:.3g} <= {tol:.3g}, "
            f"{str(eng.dtype).replace('torch.', '')} rounding), not a bug")


def _run_script(name: str, argv: list[str]) -> int:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / name
    if not script.exists():
        raise NextnError(f"this benchmark ships with the source tree (benchmarks/{name})")
    sys.argv = [str(script)] + list(argv)
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:  # the script's own exit status
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def main(what: str, argv: list[str]) -> int:
    if what == "model":
        return bench_model(argv)
    if what == "batch":
        from .bench_batch import main as bench_batch

        return bench_batch(argv)
    return _run_script({"kernels": "bench_kernels.py", "linear": "bench_linear.py"}[what], argv)
