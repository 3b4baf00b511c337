"""Does a verify batch's row get the bits a plain step gets? Largest |logit difference| between
a T-row forward and T one-row forwards from the same cache, over the positions of a greedy run.

    python benchmarks/verify_rows.py MODEL_OR_PLAN [--rows 2] [--tokens 24] [--torch-dense]

Greedy MTP is lossless only if this is 0: a difference of 1e-7 turns into 1e-3 wherever the C
kernels' 8-bit activation rounding sits near a boundary, and can flip a near-tie. --torch-dense
keeps the dense weights as float copies in torch (only the experts on the kernels).
"""
from __future__ import annotations

import argparse


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--torch-dense", action="store_true")
    a = p.parse_args(argv)
    import torch

    import runtime
    import runtime.loader as L
    from runtime.bench import PROMPTS
    from runtime.sampling import SamplingParams

    if a.torch_dense:
        keep = L.in_gguf_form
        L.in_gguf_form = lambda i, s, r, *rest: r == "routed_experts" and keep(i, s, r, *rest)
    eng = runtime.load(a.model, progress=False)
    m, T = eng.model, a.rows
    ids = eng.tokenize(PROMPTS[1])
    full = ids + eng.generate(ids, max_tokens=a.tokens, mtp=False).tokens
    worst = 0.0
    with torch.inference_mode():
        for p0 in range(len(ids), len(full) - T):
            steps = eng.new_sequence(SamplingParams(), use_mtp=False)
            steps.prefill(full[:p0])
            for q in range(p0, p0 + T):
                one = m.logits(m.forward(torch.tensor([full[q]]), steps.cache, q))[0]
            batch = eng.new_sequence(SamplingParams(), use_mtp=False)
            batch.prefill(full[:p0])
            last = m.logits(m.forward(torch.tensor(full[p0:p0 + T]), batch.cache, p0))[-1]
            worst = max(worst, float((one - last).abs().max()))
    print(f"{T}-row batch vs {T} one-row steps, {len(full) - T - len(ids)} positions: max |logit difference| {worst:.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
