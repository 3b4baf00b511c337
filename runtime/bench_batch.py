"""`nextn bench batch`: several sequences decoded in one batched step against one at a time.

    nextn bench batch [PLAN.yaml|MODEL.gguf] [--sequences 1,2,4,8] [--mtp] [--max-tokens N]
                      [--rounds R] [--kv-cache float16]

For each batch size n, `Engine.generate_batch` decodes the first n of 8 code prompts (greedy),
settings interleaved round by round (MTP off and, with --mtp, on). Reported per setting (medians
over rounds): aggregate tokens/s (all sequences' generated tokens over the wall time of the whole
batch, prefill included) and decode tokens/s (tokens after the first over the time after every
sequence had its first token), their ratios to n=1 with the same MTP setting, tokens/s per
sequence, and
per main-model forward: sequences, rows, distinct routed experts and the weight bytes read
(non-expert weights once, plus each distinct expert once). Every sequence's output is checked
equal to its output decoded alone (n=1 and MTP off), bit for bit.
"""
from __future__ import annotations

import argparse
import statistics
import time

from .errors import NextnError

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\ndef main(argv):",
    "class Stack:\n    def __init__(self):",
    "    for key, value in sorted(items.items()):",
    "def read_config(path):\n    with open(path) as f:",
    "x = [i * i for i in range(",
    "def quicksort(items):\n    if len(items) <= 1:",
    "class Point:\n    def __init__(self, x, y):",
]


def _weight_bytes(eng) -> tuple[int, float]:
    """(bytes of the weights every forward reads once: attention, dense and shared FFNs, head;
    bytes of one routed expert of one layer, averaged over the routed layers)."""
    m = eng.model

    def nb(w) -> int:
        if w is None:
            return 0
        n = getattr(w, "nbytes", None)
        if isinstance(n, int):
            return n
        return w.numel() * w.element_size()

    dense, expert, layers = 0, 0.0, 0
    for b in m.blocks:
        a = b.attn
        mats = (a.wq_a, a.wq_b, a.wkv_a, a.k_b, a.v_b, a.wo) if hasattr(a, "wkv_a") else (a.wqkv, a.wo)
        dense += sum(nb(w) for w in mats)
        ffn = b.ffn
        if hasattr(ffn, "gate_up"):
            dense += nb(ffn.gate_up) + nb(ffn.down)
            continue
        if ffn.shared is not None:
            dense += nb(ffn.shared.gate_up) + nb(ffn.shared.down)
        ex = ffn.routed.experts
        parts = [getattr(ex, n, None) for n in ("gate", "up", "down")]
        total = sum(getattr(p, "nbytes", 0) for p in parts if p is not None)
        if total:
            expert += total / eng.cfg.n_experts
            layers += 1
    dense += nb(m.head.weight)
    return dense, (expert / layers if layers else 0.0)


def main(argv: list[str]) -> int:
    from .api import load

    p = argparse.ArgumentParser(prog="nextn bench batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", metavar="PLAN.yaml|MODEL.gguf")
    p.add_argument("--sequences", default="1,2,4,8", help="comma-separated batch sizes (at most 8)")
    p.add_argument("--mtp", action="store_true", help="also every batch size with MTP on (adaptive)")
    p.add_argument("--draft-max", type=int, default=None, help="with --mtp: a fixed draft length instead of adaptive")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gpu", default=None)
    p.add_argument("--threads", default=None)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--kv-cache", default=None, help="auto | float32 | float16 (the plan's kv_cache)")
    a = p.parse_args(argv)
    try:
        sizes = [int(x) for x in a.sequences.split(",") if x.strip()]
    except ValueError:
        raise NextnError(f"--sequences {a.sequences!r}: expected comma-separated whole numbers") from None
    if not sizes or any(not 1 <= n <= len(PROMPTS) for n in sizes):
        raise NextnError(f"--sequences: batch sizes must be in 1..{len(PROMPTS)}")
    over = {k: v for k, v in (("gpu", a.gpu), ("threads", a.threads), ("context", a.context),
                              ("kv_cache", a.kv_cache)) if v is not None}
    eng = load(a.target, progress=False, **over)
    mtps = [False, True] if a.mtp and eng.has_mtp else [False]
    base = dict(max_tokens=a.max_tokens, temperature=0.0, repeat_penalty=1.0)
    spec = {True: dict(mtp=True, **({"draft_max": a.draft_max, "adaptive": False} if a.draft_max else {})),
            False: dict(mtp=False)}
    # the reference: every prompt alone, MTP off (also warms the engine and the policies)
    alone = {i: eng.generate(PROMPTS[i], **base, mtp=False).tokens for i in range(max(sizes))}
    for mtp in mtps:
        eng.generate(PROMPTS[0], **base, **spec[mtp])
    dense, per_expert = _weight_bytes(eng)
    rows: dict[tuple[int, bool], list[dict]] = {}
    mismatches = 0
    for _ in range(a.rounds):
        for n in sizes:
            for mtp in mtps:
                t0 = time.perf_counter()
                res = eng.generate_batch(PROMPTS[:n], **base, **spec[mtp])
                t_end = time.perf_counter()
                wall = t_end - t0
                bs = eng.last_batch.stats
                t_dec = eng.last_batch.t_decode or t0
                mismatches += sum(r.tokens != alone[i] for i, r in enumerate(res))
                gen = sum(len(r.tokens) for r in res)
                rows.setdefault((n, mtp), []).append({
                    "agg": gen / wall,
                    "dec": (gen - n) / max(t_end - t_dec, 1e-9),
                    "per_seq": statistics.median(r.stats["decode_tokens_per_s"] for r in res),
                    "seqs": bs.sequences / max(bs.steps, 1),
                    "rows": bs.rows / max(bs.steps, 1),
                    "experts": bs.distinct_experts / max(bs.steps, 1),
                    "drafted": sum(r.stats["drafted"] for r in res) if mtp else 0,
                    "accepted": sum(r.stats["accepted"] for r in res) if mtp else 0,
                })
    print(f"# {eng.file.path.name}: {a.rounds} rounds, {a.max_tokens} tokens per sequence, greedy; "
          f"weights read per forward: {dense / 1e6:.1f} MB + {per_expert / 1e6:.2f} MB per distinct expert")
    print(f"{'seqs':>4} {'mtp':>4} {'agg tok/s':>10} {'vs 1 seq':>8} {'decode':>8} {'vs 1 seq':>8} "
          f"{'tok/s/seq':>10} {'seqs/fwd':>8} {'rows/fwd':>8} {'experts/fwd':>11} {'MB/fwd':>8} {'accept':>7}")
    med = lambda xs: statistics.median(xs)  # noqa: E731
    for mtp in mtps:
        one = med(r["agg"] for r in rows[(sizes[0], mtp)]) if sizes[0] == 1 else None
        one_d = med(r["dec"] for r in rows[(sizes[0], mtp)]) if sizes[0] == 1 else None
        for n in sizes:
            rs = rows[(n, mtp)]
            agg = med(r["agg"] for r in rs)
            dec = med(r["dec"] for r in rs)
            ex = med(r["experts"] for r in rs)
            # acceptance over every round's drafts (after the first rounds the policy may have
            # turned drafting off: "-" when nothing was drafted)
            drafted = sum(r["drafted"] for r in rs)
            acc = sum(r["accepted"] for r in rs) / drafted if mtp and drafted else None
            print(f"{n:>4} {'on' if mtp else 'off':>4} {agg:>10.1f} "
                  f"{(f'{agg / one:.2f}x' if one else '-'):>8} {dec:>8.1f} "
                  f"{(f'{dec / one_d:.2f}x' if one_d else '-'):>8} {med(r['per_seq'] for r in rs):>10.1f} "
                  f"{med(r['seqs'] for r in rs):>8.2f} {med(r['rows'] for r in rs):>8.2f} {ex:>11.1f} "
                  f"{(dense + ex * per_expert) / 1e6:>8.1f} {(f'{acc:.1%}' if acc is not None else '-'):>7}")
    if len(mtps) == 2:
        for n in sizes:
            off, on = med(r["agg"] for r in rows[(n, False)]), med(r["agg"] for r in rows[(n, True)])
            doff, don = med(r["dec"] for r in rows[(n, False)]), med(r["dec"] for r in rows[(n, True)])
            print(f"# {n} sequences: MTP on / off = {on / off:.2f}x (decode {don / doff:.2f}x)")
    print(f"# outputs equal to each prompt decoded alone: "
          f"{'all' if not mismatches else f'{mismatches} sequences differ'}")
    return 0 if not mismatches else 1
