"""GLM-4.7-Flash shapes (a deepseek2 file, latent attention) on the CPU: nextn against llama.cpp,
same file, same prompt, same threads, interleaved rounds; medians of decode and prefill tokens/s.

    python -m runtime.synthetic /tmp/bench/flash3.gguf --shape glm47-flash --layers 3 --vocab 16384
    python benchmarks/flash_peer.py /tmp/bench/flash3.gguf [--rounds 5] [--tokens 32] [--prompt 64]

llama.cpp runs through llama-cpp-python 0.3.36 (the source distribution DESIGN names for the
peers, built here: CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36 diskcache),
F32 KV cache as nextn's default, one token per eval for decode, the prompt in batches of 512.
Greedy decoding, MTP off on both (llama.cpp has no MTP for deepseek2 files). Synthetic files say
expert_gating_func 2 (sigmoid) so llama.cpp runs the same router as nextn.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens a round")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed (see this script's docstring)", file=sys.stderr)
        return 2
    import runtime

    eng = runtime.load(a.model, progress=False, gpu="cpu", threads=a.threads)
    lm = Llama(model_path=a.model, n_ctx=a.prompt + a.tokens + 16, n_batch=512, n_threads=a.threads,
               verbose=False, type_k=0, type_v=0)
    V = eng.cfg.n_vocab
    ids = [300 + (7 * i) % (V - 400) for i in range(a.prompt)]
    kw = dict(max_tokens=a.tokens, mtp=False, temperature=0.0, repeat_penalty=1.0)

    def run_nextn():
        r = eng.generate(ids, **kw)
        return r.stats["decode_tokens_per_s"], r.stats["prompt_tokens_per_s"]

    def run_llama():
        lm.reset()
        t = time.perf_counter()
        lm.eval(ids)
        prefill = len(ids) / (time.perf_counter() - t)
        t = time.perf_counter()
        # as nextn: the first token comes with the prefill. The bindings keep logits only with
        # logits_all (a copy of every row), so the tokens fed are the prompt's again, not
        # llama.cpp's greedy choices: the same work a token
        for i in range(a.tokens - 1):
            lm.eval([ids[i % len(ids)]])
        return (a.tokens - 1) / (time.perf_counter() - t), prefill

    run_nextn(), run_llama()  # warm-up
    res = {"nextn": [], "llama.cpp": []}
    for _ in range(a.rounds):
        res["nextn"].append(run_nextn())
        res["llama.cpp"].append(run_llama())
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in res.items()}
    print(f"# {Path(a.model).name}: {a.rounds} interleaved rounds, prompt {a.prompt}, {a.tokens} tokens, "
          f"{a.threads} threads, CPU only")
    print(f"{'engine':<10} {'decode tok/s':>12} {'prefill tok/s':>13}")
    for k, (d, pf) in med.items():
        print(f"{k:<10} {d:>12.1f} {pf:>13.1f}")
    n, l = med["nextn"], med["llama.cpp"]
    print(f"nextn / llama.cpp: decode {n[0] / l[0]:.2f}x, prefill {n[1] / l[1]:.2f}x")
    eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
