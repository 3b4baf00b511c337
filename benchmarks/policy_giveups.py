"""How often the adaptive draft policy turns drafting off, and why: a log of its give-ups.

    python benchmarks/policy_giveups.py [PLAN_OR_MODEL] [--rounds 8] [--max-tokens 64] [--draft-max 3]

Runs the built-in bench prompts `--rounds` times with adaptive MTP, one policy for the whole
process (as a long-running engine keeps it), and prints one line per sequence (draft lengths
chosen, whether MTP was off) and, at each give-up, the policy's state: acceptance counts by draft
position, the recent GPU-side step times and ratios to a plain step by length, CPU time per
expert, and the rates (tokens per second) it compared. Ends with the number of give-ups.
On a model where drafting pays (the demo on a CPU: 1.5-1.7x) a give-up is the policy being fooled;
run it a few times, on a busy machine too (a CPU hog beside it).
"""
from __future__ import annotations

import argparse

from runtime.api import load
from runtime.bench import PROMPTS
from runtime.draft_policy import DraftPolicy


def describe(p: DraftPolicy) -> str:
    m = p.model
    ms = lambda d: {k: [round(x * 1e3, 2) for x in v] for k, v in sorted(d.items())}  # noqa: E731
    return (f"step {p.steps}: reached {p.reached} accepted {p.accepted}; GPU-side ms by k {ms(m.gpu_by_k)}; "
            f"ratio to plain by k { {k: [round(x, 2) for x in v] for k, v in sorted(m.ratio_by_k.items())} }; "
            f"CPU us/expert {m.per_expert() * 1e6:.1f}; "
            f"rates {[round(p.rate(k), 1) for k in range(p.draft_max + 1)]}; re-measure {p._remeasure}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?", default=None, help="PLAN.yaml or MODEL.gguf (default: the demo)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--draft-max", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    a = ap.parse_args(argv)
    eng = load(a.target, progress=False)
    if not eng.has_mtp:
        raise SystemExit(f"{eng.file.path.name}: no MTP layer")
    prompts = [eng.tokenize(t) for t in PROMPTS[:max(1, a.prompts)]]
    eng.generate(prompts[0], max_tokens=8, mtp=False)  # warm-up
    gave_up = []
    policy = eng.draft_policy(a.draft_max, True)
    orig = policy.give_up

    def logged_give_up():
        gave_up.append(describe(policy))
        print("GIVE UP at " + gave_up[-1])
        orig()

    policy.give_up = logged_give_up
    for r in range(a.rounds):
        for i, ids in enumerate(prompts):
            res = eng.generate(ids, max_tokens=a.max_tokens, mtp=True, draft_max=a.draft_max, adaptive=True)
            print(f"round {r} prompt {i}: draft lengths {dict(sorted(res.stats['draft_lengths'].items()))}"
                  f"{'  (MTP off)' if res.stats['mtp_turned_off'] else ''}")
    print(f"{len(gave_up)} give-up(s) in {a.rounds * len(prompts)} sequences")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
