"""Evaluate the demo model (or any glm4moe GGUF with an MTP layer and a code tokenizer) on held-out
standard-library files, through the engine.

    python -m runtime.demo.evaluate [MODEL.gguf] [--prompts 20] [--tokens 64] [--windows 16] [--json OUT]

Held-out text: the files :func:`runtime.demo.train.corpus_files` holds out (never trained on), less
``pydoc_data/topics.py`` (generated documentation text in one string literal, not code) and the
modules that are mostly mapping tables, which training leaves out too
(:func:`runtime.demo.train.is_generated_table`).

1. Teacher forced (``Engine.logits`` / ``Engine.mtp_logits`` over ``--windows`` windows of 256 tokens):
   main-model next-token accuracy and loss, MTP top-1 accuracy (vs the true token after next) and how
   often the MTP argmax equals the main model's argmax at the same position (draft-1 agreement).
2. Generation (greedy, ``--prompts`` prompts of 48 held-out tokens, ``--tokens`` new tokens each),
   without MTP and with MTP at draft_max 1, 2 and 3 (adaptive drafting off, p_min 0): acceptance
   rate (accepted / drafted over all prompts), mean tokens per verify step, decode tokens/s (median
   over prompts) and its ratio to the no-MTP median measured in the same run; greedy MTP output is
   checked to equal the no-MTP output token for token.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .train import DEMO_GGUF, corpus_files, texts


# held-out files that are generated data rather than code: pydoc_data/topics.py is 0.76 MB of English
# documentation in one string literal (over half of the held-out bytes)
NOT_CODE = ("pydoc_data/topics.py",)


def held_out_ids(engine, max_files: int | None = None, code_only: bool = True) -> list[list[int]]:
    _, held = corpus_files()
    if code_only:
        held = [f for f in held if not f.as_posix().endswith(NOT_CODE)]
    docs = texts(held[:max_files] if max_files else held)
    return [engine.tokenize(d) for d in docs]


def prompts_from(docs: list[list[int]], n: int, length: int = 48) -> list[list[int]]:
    """n prompts of ``length`` tokens, spread over the held-out files (deterministic)."""
    docs = [d for d in docs if len(d) >= 4 * length]
    out = []
    for i in range(n):
        d = docs[(i * 7) % len(docs)]
        start = (len(d) - 2 * length) * ((i * 37) % 97) // 97
        out.append(d[start:start + length])
    return out


def teacher_forced(engine, docs, windows: int, width: int = 256) -> dict:
    width = min(width, engine.context)
    stream = [t for d in docs for t in d]
    step = max(width, (len(stream) - width) // max(windows - 1, 1))
    n = acc = mtp_acc = agree = 0
    nll = 0.0
    for s in range(0, len(stream) - width, step)[:windows]:
        ids = stream[s:s + width]
        lg = engine.logits(ids)
        ml = engine.mtp_logits(ids)                  # row p: (h_p, ids[p+1]) -> ids[p+2]
        tgt = np.asarray(ids[1:])
        lse = np.log(np.exp(lg[:-1] - lg[:-1].max(-1, keepdims=True)).sum(-1)) + lg[:-1].max(-1)
        nll += float((lse - lg[np.arange(len(tgt)), tgt]).sum())
        pm = lg.argmax(-1)
        pt = ml.argmax(-1)
        acc += int((pm[:-1] == tgt).sum())
        mtp_acc += int((pt[:-1] == np.asarray(ids[2:])).sum())
        agree += int((pt[:-1] == pm[1:-1]).sum())   # MTP row p vs main row p+1: both predict ids[p+2]
        n += len(tgt)
    m = n - n // width  # rows with an ids[p+2] target
    return {"tokens": n, "loss": nll / n, "acc": acc / n, "mtp_acc": mtp_acc / m, "mtp_agree": agree / m}


def generation(engine, prompts, tokens: int, drafts=(1, 2, 3)) -> dict:
    configs = [("no MTP", False, 0)] + [(f"MTP draft {k}", True, k) for k in drafts]
    engine.generate(prompts[0], max_tokens=8, mtp=False)      # warm-up
    engine.generate(prompts[0], max_tokens=8, mtp=True, draft_max=1, adaptive=False)
    rows = {name: {"speeds": [], "drafted": 0, "accepted": 0, "steps": 0, "tokens": 0, "mismatch": 0}
            for name, _, _ in configs}
    ref = {}
    for i, p in enumerate(prompts):
        for name, mtp, k in configs:  # interleaved, so load changes hit every configuration alike
            kw = dict(max_tokens=tokens, temperature=0.0, mtp=mtp)
            if mtp:
                kw.update(draft_max=k, adaptive=False, p_min=0.0)
            r = engine.generate(p, **kw)
            s = r.stats
            row = rows[name]
            row["speeds"].append(s["decode_tokens_per_s"])
            row["tokens"] += s["generated_tokens"]
            if mtp:
                row["drafted"] += s["drafted"]
                row["accepted"] += s["accepted"]
                row["steps"] += s["verify_steps"]
                row["mismatch"] += int(list(r.tokens) != ref[i])
            else:
                ref[i] = list(r.tokens)
    base = statistics.median(rows["no MTP"]["speeds"])
    out = {}
    for name, mtp, k in configs:
        row = rows[name]
        med = statistics.median(row["speeds"])
        out[name] = {
            "draft_max": k, "decode_tok_s_median": med, "speedup_vs_no_mtp": med / base,
            "acceptance_rate": row["accepted"] / row["drafted"] if row["drafted"] else None,
            "mean_tokens_per_step": (row["tokens"] / row["steps"]) if row["steps"] else 1.0,
            "drafted": row["drafted"], "accepted": row["accepted"], "outputs_differing_from_no_mtp": row["mismatch"],
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.demo.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=str(DEMO_GGUF))
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="CPU expert-kernel threads (default: the engine's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args(argv)

    import runtime
    t0 = time.time()
    kw = {"threads": a.threads} if a.threads else {}
    engine = runtime.load(a.model, progress=False, **kw)
    docs = held_out_ids(engine)
    print(f"model {a.model}: {len(docs)} held-out stdlib files, {sum(map(len, docs))} tokens")
    tf = teacher_forced(engine, docs, a.windows)
    print(f"teacher forced on {tf['tokens']} held-out tokens: loss {tf['loss']:.3f}, main next-token accuracy "
          f"{tf['acc']:.1%}, MTP top-1 accuracy {tf['mtp_acc']:.1%}, MTP argmax = main argmax {tf['mtp_agree']:.1%}")
    prompts = prompts_from(docs, a.prompts)
    gen = generation(engine, prompts, a.tokens)
    print(f"\ngreedy generation, {len(prompts)} held-out prompts x {a.tokens} tokens (adaptive drafting off):")
    print(f"{'':14s} {'acceptance':>10s} {'tokens/step':>11s} {'decode tok/s':>13s} {'vs no MTP':>9s} {'lossless':>8s}")
    for name, r in gen.items():
        acc = f"{r['acceptance_rate']:.1%}" if r["acceptance_rate"] is not None else "-"
        ok = "yes" if r["outputs_differing_from_no_mtp"] == 0 else f"{r['outputs_differing_from_no_mtp']} differ"
        print(f"{name:14s} {acc:>10s} {r['mean_tokens_per_step']:>11.2f} {r['decode_tok_s_median']:>13.1f} "
              f"{r['speedup_vs_no_mtp']:>8.2f}x {ok if r['draft_max'] else '-':>8s}")
    print(f"({time.time() - t0:.0f} s; speeds are medians over prompts, measured interleaved in this run)")
    if a.json:
        a.json.write_text(json.dumps({"model": a.model, "teacher_forced": tf, "generation": gen}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
