"""nextn against llama.cpp on the bundled demo model: the same prompts, greedy, interleaved.

    python benchmarks/peer_demo.py [--tokens 128] [--rounds 2] [--threads 2] [--draft 1,2,3] [--kv-cache f16]
                                   [--llama-kv f32] [--reference]
    python benchmarks/peer_demo.py --build-only

llama.cpp is built once from the llama-cpp-python 0.3.36 source distribution (its vendor/llama.cpp,
CMake, CPU only, GGML_NATIVE=ON; ~12 minutes on 2 cores) into a cache outside the repository
(--cache, default ~/.cache/nextn/llama.cpp-0.3.36). One `llama-server` runs per setting (plain,
and `--spec-type draft-mtp --spec-draft-n-max N` for each N), all started before the first request,
so that every round visits every setting of both engines prompt by prompt.

Greedy, no repetition penalty on either side (the demo plan's 1.15 is switched off here).
Prompts: the first lines of 6 files the demo model was never trained on (its held-out standard
library files, runtime/demo/train.py). Both engines get the same token ids. Reported per setting:
decode tokens/s (median over prompts and rounds; llama.cpp's own `timings.predicted_per_second`,
nextn's `decode_tokens_per_s`), acceptance, the ratio to llama.cpp's plain speed, and whether the
generated tokens equal each engine's own plain output and nextn's plain output equals llama.cpp's.

--llama-kv sets llama-server's cache type (-ctk/-ctv; default f16, llama.cpp's own default). On the
CPU llama.cpp runs flash attention, which with an F16 cache rounds each query to F16 and sums the
weighted V rows in an F16 accumulator (ggml-cpu/ops.cpp, flash_attn_ext_f16_one_chunk); with f32
both stay in float32. --reference adds the file's model decoded greedily in float64 (transformers,
the GGUF's weights dequantized exactly: `runtime.testmodel.hf_from_gguf`) and prints, per engine,
on how many runs its tokens equal that reference's and where each prompt's output first departs
from it: which engine's rounding a disagreement between the two comes from.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VERSION = "0.3.36"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nextn" / f"llama.cpp-{VERSION}"


def build(cache: Path, jobs: int) -> Path:
    """llama-server from the sdist's vendor/llama.cpp; returns the binary (built once)."""
    binary = cache / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / "src"
    if not (src / "CMakeLists.txt").exists():
        sdists = list(cache.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
        if not sdists:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={VERSION}", "-d", str(cache)], check=True)
            sdists = list(cache.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
        with tarfile.open(sdists[0]) as tf:
            prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
            members = [m for m in tf.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tf.extractall(src, members=[m for m in members if m.name], filter="data")
    bdir = cache / "build"
    subprocess.run(["cmake", "-S", str(src), "-B", str(bdir), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(bdir), "--target", "llama-server", "-j", str(jobs)], check=True)
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, binary: Path, model: Path, threads: int, ctx: int, draft: int, kv: str = "f16"):
        self.port = free_port()
        args = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port), "-t", str(threads),
                "-tb", str(threads), "-c", str(ctx), "-np", "1", "--no-webui", "-ctk", kv, "-ctv", kv]
        if draft:
            args += ["--spec-type", "draft-mtp", "--spec-draft-n-max", str(draft)]
        self.draft = draft
        self.log = open(Path("/tmp") / f"peer_demo_llama_{self.port}.log", "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 120.0) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}); see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"llama-server on port {self.port} not ready after {timeout:.0f} s")

    def complete(self, ids: list[int], n: int) -> dict:
        body = {"prompt": ids, "n_predict": n, "temperature": 0.0, "top_k": 1, "cache_prompt": False,
                "return_tokens": True, "stream": False, "ignore_eos": False}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())

    def top2(self, ids: list[int]) -> tuple[int, float]:
        """The next token after ids with the whole sequence run as one prompt (prefill), and the
        margin of its log-probability (= logit) over the next best one."""
        body = {"prompt": ids, "n_predict": 1, "temperature": 0.0, "n_probs": 2, "post_sampling_probs": False,
                "cache_prompt": False}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            top = json.loads(r.read())["completion_probabilities"][0]["top_logprobs"]
        return int(top[0]["id"]), float(top[0]["logprob"] - top[1]["logprob"])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def held_out_prompts(n: int, tok) -> list[list[int]]:
    """The first ~12 lines (at most 64 tokens) of n held-out standard library files."""
    from runtime.demo.train import corpus_files, read_text, texts

    _, held = corpus_files()
    out = []
    for f in held:
        t = read_text(f)
        if not t or not texts([f]):
            continue
        lines = [ln for ln in t.splitlines() if ln.strip()][:12]
        ids = tok.encode("\n".join(lines) + "\n")[:64]
        if len(ids) >= 16:
            out.append(ids)
        if len(out) == n:
            break
    return out


def reference_model(path: Path):
    """The file's model in float64 (transformers, the GGUF's weights dequantized exactly; its
    router's scores alone are float32, as transformers computes them in any dtype)."""
    import warnings

    from runtime.testmodel import hf_from_gguf

    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
    model, _ = hf_from_gguf(path)
    model = model.double()
    for m in model.modules():  # the grouped-GEMM experts take no float64: the per-expert loop does
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_experts_implementation"):
            cfg._experts_implementation = "eager"
    return model


def reference_tokens(model, prompts: list[list[int]], n: int) -> tuple[list[list[int]], list[list[float]]]:
    """n greedy tokens after each prompt from the reference model, with no stop at end of text (an
    engine that stopped is compared with the reference's first tokens); and at each token the
    margin of its logit over the next best one (how near a tie the choice was)."""
    import torch

    out, margins = [], []
    with torch.no_grad():
        for ids in prompts:
            res = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=True)
            toks, ms = [], []
            for _ in range(n):
                top = torch.topk(res.logits[0, -1], 2)
                toks.append(int(top.indices[0]))
                ms.append(float(top.values[0] - top.values[1]))
                res = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=res.past_key_values, use_cache=True)
            out.append(toks)
            margins.append(ms)
    return out, margins


def routing_tie(model, ids: list[int]) -> tuple[int, float]:
    """At the last of ids, the block whose router came nearest a tie in the reference model, and
    that margin: the k-th chosen expert's biased score over the best one left out (sigmoid units).
    A margin near the engines' rounding means a different expert, and so different logits, is a
    coin toss there."""
    import torch

    k = model.config.num_experts_per_tok
    found = []

    def hook(mod, inp, _out):
        h = inp[0].reshape(-1, inp[0].shape[-1])[-1]
        s = torch.sigmoid(h.double() @ mod.weight.double().T) + mod.e_score_correction_bias.double()
        v = torch.sort(s, descending=True).values
        found.append(float(v[k - 1] - v[k]))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if type(m).__name__.endswith("TopkRouter")]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids], dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    i = min(range(len(found)), key=found.__getitem__)
    return i + int(getattr(model.config, "first_k_dense_replace", 0) or 0), found[i]  # the block's index


def departs(tokens: list[int], ref: list[int]) -> int | None:
    """The first index where tokens differ from ref (None: tokens are ref's first len(tokens))."""
    for i, (a, b) in enumerate(zip(tokens, ref)):
        if a != b:
            return i
    return None if len(tokens) <= len(ref) else len(ref)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft", default="1,2,3")
    ap.add_argument("--kv-cache", default="auto", help="nextn's KV cache: auto (float32 on the CPU) or float16 "
                    "(llama.cpp's default cache type, which llama-server keeps here)")
    ap.add_argument("--llama-kv", default="f16", choices=["f16", "f32"], help="llama-server's cache type (-ctk/-ctv)")
    ap.add_argument("--reference", action="store_true", help="compare both engines with the model decoded in float64")
    a = ap.parse_args(argv)
    if not shutil.which("cmake"):
        print("cmake is needed to build llama.cpp", file=sys.stderr)
        return 2
    binary = build(a.cache, a.jobs)
    if a.build_only:
        print(binary)
        return 0
    import cpu_kernels
    import runtime

    cpu_kernels.set_threads(a.threads)
    drafts = [int(x) for x in a.draft.split(",") if x.strip()]
    eng = runtime.load(progress=False, kv_cache=a.kv_cache)
    model = Path(eng.file.path)
    prompts = held_out_prompts(a.prompts, eng.tokenizer)
    ref_model = reference_model(model) if a.reference else None
    ref, ref_margin = reference_tokens(ref_model, prompts, a.tokens) if a.reference else (None, None)
    servers = {k: LlamaServer(binary, model, a.threads, 1024, k, a.llama_kv) for k in [0] + drafts}
    for s in servers.values():
        s.wait()
    rows: dict = {}  # (engine, k) -> list of (tok/s, drafted, accepted, tokens) per (round, prompt)
    try:
        for p in prompts:  # warm-up, not counted
            eng.generate(p, max_tokens=8, mtp=False)
            servers[0].complete(p, 8)
        for rnd in range(a.rounds):
            for i, p in enumerate(prompts):
                for k in [0] + drafts:
                    r = servers[k].complete(p, a.tokens)
                    t = r.get("timings", {})
                    rows.setdefault(("llama.cpp", k), []).append(
                        (t.get("predicted_per_second", 0.0), t.get("draft_n", 0), t.get("draft_n_accepted", 0),
                         r.get("tokens", [])))
                    g = eng.generate(p, max_tokens=a.tokens, mtp=k > 0, draft_max=k or None, adaptive=False, repeat_penalty=1.0)
                    st = g.stats
                    rows.setdefault(("nextn", k), []).append(
                        (st["decode_tokens_per_s"], st["drafted"], st["accepted"], g.tokens))
                if drafts:  # the adaptive policy up to the longest length (what `nextn run` does)
                    g = eng.generate(p, max_tokens=a.tokens, mtp=True, draft_max=max(drafts), adaptive=True,
                                     repeat_penalty=1.0)
                    st = g.stats
                    rows.setdefault(("nextn", "adaptive"), []).append(
                        (st["decode_tokens_per_s"], st["drafted"], st["accepted"], g.tokens))
        # where the plain outputs part (first round): what llama.cpp picks there when the same
        # tokens are one prompt (its prefill path) rather than decoded one by one
        parts = []
        for i, (x, y) in enumerate(zip(rows[("nextn", 0)][:len(prompts)], rows[("llama.cpp", 0)])):
            at = departs(x[3], y[3])
            if at is not None and at < min(len(x[3]), len(y[3])):
                parts.append((i, at, x[3][at], y[3][at], *servers[0].top2(prompts[i] + y[3][:at])))
    finally:
        for s in servers.values():
            s.close()
    base = statistics.median(x[0] for x in rows[("llama.cpp", 0)])
    print(f"demo model, {len(prompts)} held-out prompts x {a.rounds} rounds, {a.tokens} tokens, greedy, "
          f"{a.threads} threads; nextn fused blocks: {eng.load_report.fused_blocks}; KV cache: nextn "
          f"{eng.kv_dtype}, llama.cpp {a.llama_kv}")
    print(f"{'engine':10} {'setting':8} {'tok/s':>8} {'vs llama plain':>15} {'accept':>7} {'= own plain':>12} "
          f"{'= llama plain':>14}" + (f" {'= f64 ref':>10}" if ref else ""))
    for (e, k), rs in rows.items():
        speed = statistics.median(x[0] for x in rs)
        d, acc = sum(x[1] for x in rs), sum(x[2] for x in rs)
        own = rows[(e, 0)]
        same_own = sum(x[3] == y[3] for x, y in zip(rs, own))
        same_llama = sum(x[3] == y[3] for x, y in zip(rs, rows[("llama.cpp", 0)]))
        name = "plain" if k == 0 else k if isinstance(k, str) else f"mtp k={k}"
        line = (f"{e:10} {name:8} {speed:8.1f} {speed / base:14.2f}x "
                f"{(f'{acc / d:.1%}' if d else '-'):>7} {same_own:>6}/{len(rs):<5} {same_llama:>7}/{len(rs):<6}")
        if ref:  # runs go round by round, prompt by prompt
            same_ref = sum(departs(x[3], ref[j % len(prompts)]) is None for j, x in enumerate(rs))
            line += f" {same_ref:>5}/{len(rs):<4}"
        print(line)
    if ref:
        print("first token where each prompt's plain output departs from the float64 reference (-: none), "
              "first round:")
        for e in ("nextn", "llama.cpp"):
            at = [departs(x[3], r) for x, r in zip(rows[(e, 0)], ref)]
            print(f"  {e:10} " + " ".join(f"{'-' if i is None else i:>4}" for i in at))
    for i, at, nx, ll, pre, pre_m in parts:
        line = (f"prompt {i + 1}: plain outputs part at token {at}: nextn {nx}, llama.cpp {ll} (decoding); "
                f"llama.cpp prefilling the same tokens picks {pre} by {pre_m:.5f} logits")
        if ref and departs(rows[("llama.cpp", 0)][i][3][:at], ref[i]) is None:
            layer, m = routing_tie(ref_model, prompts[i] + ref[i][:at])
            line += (f"; float64 picks {ref[i][at]} by {ref_margin[i][at]:.5f}, its nearest routing tie there: "
                     f"block {layer}'s k-th expert by {m:.2g}")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
