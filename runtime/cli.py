"""The `nextn` command line: run, serve, plan, bench, tune.

Every user error is a NextnError (or a tokenizer/plan error derived from it) and is printed as one
line, `error: ...`, with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys

from .errors import NextnError

DEFAULT_PROMPT = "def fibonacci(n):"


def _placement_args(p: argparse.ArgumentParser, context: bool = True) -> None:
    g = p.add_argument_group("placement (override the plan)")
    g.add_argument("--model", help="model file (overrides the plan's model:)")
    g.add_argument("--gpu", help="auto | cpu | cuda:N (auto falls back to the CPU without CUDA)")
    g.add_argument("--gpu-dtype", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of weights and KV cache on the GPU side")
    g.add_argument("--kv-cache", choices=["auto", "float32", "f32", "float16", "f16"],
                   help="KV cache element type: auto (float32 on the CPU, gpu_dtype on CUDA) | float16 "
                        "(half the KV memory; on the CPU half the bytes attention reads; llama.cpp's default)")
    g.add_argument("--threads", help="CPU expert threads (N or auto)")
    g.add_argument("--repack", choices=["auto", "true", "false"],
                   help="copy CPU experts into a faster layout at load where one exists (Q2_K..Q6_K IQ4_XS Q4_0 "
                        "Q5_0 Q8_0 IQ4_NL; auto: when the SIMD kernels are active and the copy fits in free memory)")
    if context:  # `serve` has llama-server's -c/--ctx-size instead
        g.add_argument("--ctx", "--context", dest="context", type=int, help="context length (KV cache size)")
    g.add_argument("--cpu-moe", action="store_true", default=None, help="all routed experts on the CPU side")
    g.add_argument("--n-cpu-moe", type=int, help="routed experts of blocks 0..N-1 on the CPU, the rest on the GPU (llama.cpp semantics: "
                        "dense blocks count; N past the main layers includes the MTP layer's experts)")
    g.add_argument("-ot", "--override-tensor", action="append", metavar="REGEX=DEVICE",
                   help="place tensors whose name matches REGEX on gpu or cpu (first match wins; repeatable)")


def _overrides(a: argparse.Namespace, keys) -> dict:
    return {k: getattr(a, k) for k in keys if getattr(a, k, None) is not None}


PLACEMENT_KEYS = ("model", "gpu", "gpu_dtype", "kv_cache", "threads", "repack", "context", "cpu_moe", "n_cpu_moe", "override_tensor")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line, like every other nextn error (exit status 2)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="nextn",
        description="Run GLM-4.x MoE GGUF models on one GPU plus the CPU, with MTP (nextn) speculative decoding. "
                    "Wherever a model or plan is left out, the bundled demo model and its plan are used.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="generate text from a plan or a GGUF model",
                       description="Generate text. PLAN.yaml or MODEL.gguf (default: the bundled demo).")
    r.add_argument("target", nargs="?", metavar="PLAN.yaml|MODEL.gguf")
    r.add_argument("-p", "--prompt", default=None, help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    r.add_argument("-n", "--max-tokens", type=int, dest="max_tokens", help="tokens to generate")
    r.add_argument("--temp", "--temperature", type=float, dest="temperature", help="0 = greedy")
    r.add_argument("--top-k", type=int, dest="top_k")
    r.add_argument("--top-p", type=float, dest="top_p")
    r.add_argument("--min-p", type=float, dest="min_p")
    r.add_argument("--seed", type=int)
    r.add_argument("--repeat-penalty", type=float, dest="repeat_penalty",
                   help="divide the logits of tokens among the last --repeat-last-n by this (1 = off)")
    r.add_argument("--repeat-last-n", type=int, dest="repeat_last_n", help="tokens the repeat penalty looks back")
    r.add_argument("--stop", action="append", help="stop string (repeatable)")
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    r.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=None,
                   help="MTP speculative decoding with the model's nextn layer (default: on when present)")
    r.add_argument("--draft-max", type=int, dest="draft_max", help="most drafted tokens per step")
    r.add_argument("--draft-p-min", type=float, dest="p_min", help="stop drafting below this draft probability")
    r.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                   help="choose each step's draft length (0..draft-max) from measured costs (default: on)")
    r.add_argument("--draft-ahead", action=argparse.BooleanOptionalAction, default=None, dest="draft_ahead",
                   help="draft the next step's tokens beside the verification's last CPU experts, used when "
                        "every draft is accepted (default: off; it lost in the GPU check)")
    r.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="run CPU experts beside the shared expert (default: on with CUDA)")
    r.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace (JSON) of the run")
    r.add_argument("--quiet", action="store_true", help="print only the generated text")
    _placement_args(r)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions, tools, reasoning)",
                       description="Serve PLAN.yaml or MODEL.gguf (default: the bundled demo) over OpenAI's HTTP API: "
                                   "/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics. Flags "
                                   "override the plan's server: section.")
    s.add_argument("target", nargs="?", metavar="PLAN.yaml|MODEL.gguf")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8080)")
    s.add_argument("-np", "--parallel", type=int, help="slots: requests decoded concurrently, each with MTP (default 1)")
    s.add_argument("-c", "--ctx-size", type=int, dest="ctx_size",
                   help="context of all slots together, split evenly (default: the plan's context)")
    s.add_argument("--api-key", dest="api_key", help="require Authorization: Bearer KEY on every route but /health")
    s.add_argument("--alias", help="the model id clients see (default: the model file's name)")
    s.add_argument("--queue", type=int, help="requests waiting for a slot before a 503 (default 4x slots)")
    s.add_argument("-n", "--max-tokens", type=int, dest="max_tokens",
                   help="tokens per reply when a request gives none (default: the plan's, else the rest of the context)")
    s.add_argument("--temp", "--temperature", type=float, dest="temperature", help="default temperature (0 = greedy)")
    s.add_argument("--top-k", type=int, dest="top_k")
    s.add_argument("--top-p", type=float, dest="top_p")
    s.add_argument("--min-p", type=float, dest="min_p")
    s.add_argument("--seed", type=int)
    s.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=None,
                   help="MTP speculative decoding in every slot (default: on when the model has a nextn layer)")
    s.add_argument("--draft-max", type=int, dest="draft_max", help="most drafted tokens per step")
    s.add_argument("--draft-p-min", type=float, dest="p_min", help="stop drafting below this draft probability")
    s.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                   help="choose each step's draft length from measured costs (default: on)")
    s.add_argument("--draft-ahead", action=argparse.BooleanOptionalAction, default=None, dest="draft_ahead")
    s.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="run CPU experts beside the shared expert (default: on with CUDA)")
    # llama-server's names for the KV cache type (one type for K and V here: f32 or f16)
    s.add_argument("-ctk", "--cache-type-k", dest="cache_type_k", metavar="TYPE",
                   help="KV cache type as llama-server names it: f16 or f32 (the same as --kv-cache)")
    s.add_argument("-ctv", "--cache-type-v", dest="cache_type_v", metavar="TYPE", help="must equal -ctk")
    _placement_args(s, context=False)

    pl = sub.add_parser("plan", help="validate a plan and print the resolved placement and memory",
                        description="Validate PLAN.yaml (default: the demo plan) and print where every tensor "
                                    "group lives, bytes per device, KV cache bytes, and whether it fits the GPU.")
    pl.add_argument("target", nargs="?", metavar="PLAN.yaml|MODEL.gguf")
    _placement_args(pl)

    b = sub.add_parser("bench", help="benchmarks (kernels: the CPU expert kernels; model: decode with/without MTP)",
                       description="Benchmarks. `nextn bench kernels [...]` runs the CPU expert kernel benchmark; "
                                   "`nextn bench model [PLAN|MODEL]` compares decoding with and without MTP.")
    b.add_argument("what", choices=["kernels", "linear", "model", "batch"])
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for that benchmark")

    t = sub.add_parser("tune", help="measure candidate placements on this machine and write the best plan",
                       description="nextn tune [MODEL.gguf] [--gpu-mem SIZE] [--ram SIZE] [--context N] "
                                   "[--threads N|auto] [--time-budget SECONDS] -o PLAN.yaml "
                                   "(`nextn tune -h` for every option)", add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER, help="tuner arguments")
    return p


def cmd_run(a: argparse.Namespace) -> int:
    from .api import load

    overrides = _overrides(a, PLACEMENT_KEYS + ("overlap",))
    if a.trace:  # before the load: a run should not end on an unwritable trace path
        from .trace import check_writable

        check_writable(a.trace, "--trace")
    eng = load(a.target, **overrides)
    gen = _overrides(a, ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "repeat_penalty",
                         "repeat_last_n", "mtp", "draft_max",
                         "p_min", "adaptive", "draft_ahead", "stop", "trace"))
    prompt = a.prompt if a.prompt is not None else DEFAULT_PROMPT
    run_stream = eng.stream(prompt, chat=a.chat, **gen)
    out = sys.stdout
    if not a.quiet:
        out.write(prompt if not a.chat else "")
    try:
        for piece in run_stream:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        # Ctrl-C in prefill or decode: what was generated is already on stdout (each piece is
        # flushed as it comes); end its line, stop the run (its trace, if asked for, is written
        # whole: a temporary file renamed) and exit 130.
        run_stream.close()
        out.write("\n")
        out.flush()
        print("-- interrupted: the text above is what was generated so far", file=sys.stderr)
        if a.trace:
            print(f"-- trace of the interrupted run written to {a.trace}", file=sys.stderr)
        return 130
    out.write("\n")
    if not a.quiet:
        res = eng.last_result
        s = res.stats
        lines = [f"-- {s['generated_tokens']} tokens ({s['finish_reason']}), prompt {s['prompt_tokens']} tokens at "
                 f"{s['prompt_tokens_per_s']:.1f} tok/s, decode {s['decode_tokens_per_s']:.1f} tok/s"]
        if s["mtp"]:
            ks = " ".join(f"{k}:{n}" for k, n in s["draft_lengths"].items())
            if s["acceptance_rate"] is None:
                drafts = "no drafts"
            else:
                pos = ", ".join(f"{r:.0%}" for r in s["acceptance_by_position"])
                drafts = (f"drafted {s['drafted']}, accepted {s['accepted']} ({s['acceptance_rate']:.1%}; "
                          f"by position {pos}), {s['mean_tokens_per_step']:.2f} tokens/step, "
                          f"draft {s['draft_s']:.2f}s verify {s['verify_s']:.2f}s")
            lines.append(f"-- MTP draft_max {s['draft_max']}{' adaptive' if s['adaptive'] else ''}: {drafts}, "
                         f"steps by draft length {ks or '-'}"
                         + (f", drafted ahead {s['ahead_made']} used {s['ahead_used']}" if s["draft_ahead"] else ""))
            lines.append(f"-- {s['draft_policy']}")
        else:
            lines.append("-- MTP off")
        lines.append(f"-- bytes moved between sides: weights {s['weight_bytes_moved']}, "
                     f"activations {s['activation_bytes_moved']}; busy: gpu side {s['gpu_busy_s']:.2f}s, "
                     f"cpu experts {s['cpu_busy_s']:.2f}s, both {s['overlap_s']:.2f}s, idle {s['idle_wait_s']:.2f}s")
        rep = eng.load_report
        if rep.repacked_bytes or rep.repack_skipped:
            lines.append(f"-- CPU kernel weights repacked at load: {rep.repacked_bytes / 2**30:.2f} GiB"
                         + (f" ({rep.repack_skipped})" if rep.repack_skipped else ""))
        if rep.kernel_weights:
            lines.append(f"-- dense weights run by the CPU kernels in GGUF form: {rep.kernel_weights}")
        if eng.cfg.gating_assumed:
            lines.append("-- router: sigmoid assumed (the file has no expert_gating_func, as GLM-4.7-Flash's GGUFs)")
        kv = sum(pool.nbytes for pool in eng.pools if pool is not None)
        lines.append(f"-- KV cache{' (latent rows)' if eng.cfg.mla else ''}: {str(eng.kv_dtype).replace('torch.', '')}, {kv / 2**20:.2f} MiB for "
                     f"{eng.kv_slots} positions (main model and MTP layer)")
        if rep.fused_blocks:
            lines.append(f"-- decode steps as one C call for all blocks: {rep.fused_blocks}")
        if getattr(rep, "cuda_graphs", ""):
            lines.append(f"-- MoE layers' GPU segments as CUDA graphs: {rep.cuda_graphs}")
        if a.trace:
            lines.append(f"-- trace written to {a.trace} (open in ui.perfetto.dev or chrome://tracing)")
        print("\n".join(lines), file=sys.stderr)
    return 0


def _cache_type(k: str | None, v: str | None, kv_cache: str | None) -> str | None:
    """llama-server's -ctk/-ctv as nextn's one kv_cache type (f16 or f32 for both K and V)."""
    if k is None and v is None:
        return None
    given = [(f, t.strip().lower()) for f, t in (("-ctk", k), ("-ctv", v)) if t is not None]
    for flag, t in given:
        if t not in ("f16", "f32"):
            raise NextnError(f"{flag} {t}: nextn's KV cache is f16 or f32 (quantized KV caches are not supported)")
    if len({t for _, t in given}) > 1:
        raise NextnError(f"-ctk {k} -ctv {v}: K and V take one type here; give the same for both")
    t = given[0][1]
    if kv_cache is not None:
        from placement.schema import check_kv_cache  # the plan's names (f16 = float16, ...)

        if check_kv_cache(kv_cache, "--kv-cache") != check_kv_cache(t, given[0][0]):
            raise NextnError(f"--kv-cache {kv_cache} and {given[0][0]} {t} disagree")
    return t


def cmd_serve(a: argparse.Namespace) -> int:
    from .serve.server import serve

    keys = PLACEMENT_KEYS + ("temperature", "top_k", "top_p", "min_p", "seed", "mtp", "draft_max", "p_min",
                             "adaptive", "draft_ahead")
    overrides = _overrides(a, tuple(k for k in keys if k != "context"))
    kv = _cache_type(a.cache_type_k, a.cache_type_v, a.kv_cache)
    if kv is not None:
        overrides["kv_cache"] = kv
    server = {k: getattr(a, k) for k in ("host", "port", "parallel", "ctx_size", "api_key", "alias", "queue")}
    for k in ("parallel", "ctx_size"):
        if server[k] is not None and server[k] < 1:
            raise NextnError(f"--{k.replace('_', '-')} {server[k]}: expected a positive number")
    if a.max_tokens is not None and a.max_tokens < 1:
        raise NextnError(f"--max-tokens {a.max_tokens}: expected a positive number")
    engine_kw = {"overlap": a.overlap, "max_tokens": a.max_tokens}
    return serve(a.target, overrides=overrides, server=server, engine_kw=engine_kw)


def cmd_plan(a: argparse.Namespace) -> int:
    from pathlib import Path

    import placement

    from .api import DEMO_PLAN
    from .config import read_config
    from .engine import resolve_device
    from .gguf_file import GGUFFile

    overrides = _overrides(a, PLACEMENT_KEYS)
    target = Path(a.target) if a.target else DEMO_PLAN
    if target.suffix == ".gguf":
        plan = placement.load_plan(None, {**overrides, "model": str(target)})
    else:
        plan = placement.load_plan(target, overrides)
    if plan.model_path is None:
        raise NextnError(f"{plan.source}: no model given (set `model:` in the plan or pass --model)")
    f = GGUFFile(plan.model_path)
    cfg = read_config(f)
    res = placement.resolve(plan, f, cfg)
    est = placement.estimate_memory(res, f, cfg, plan)
    free = None
    dev = resolve_device(plan.gpu)
    if dev.type == "cuda":
        import torch

        free = torch.cuda.mem_get_info(dev)[0]
    print(placement.format_report(plan, res, est, gpu_free_bytes=free))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from . import bench

    return bench.main(a.what, a.rest)


def cmd_tune(a: argparse.Namespace) -> int:
    from placement import tuner

    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    return tuner.main(rest)


def main(argv=None) -> int:
    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tune"]:  # the tuner parses its own arguments (argparse.REMAINDER drops a leading -h)
        argv = ["tune", "--", *argv[1:]]
    a = p.parse_args(argv)
    if a.command is None:
        p.print_help()
        return 0
    try:
        return {"run": cmd_run, "serve": cmd_serve, "plan": cmd_plan, "bench": cmd_bench, "tune": cmd_tune}[a.command](a)
    except NextnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
