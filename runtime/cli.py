"""The `nextn` command line: run, plan, bench.

Every user error is a NextnError (or a tokenizer/plan error derived from it) and is printed as one
line, `error: ...`, with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys

from .errors import NextnError

DEFAULT_PROMPT = "def fibonacci(n):"


def _placement_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("placement (override the plan)")
    g.add_argument("--model", help="model file (overrides the plan's model:)")
    g.add_argument("--gpu", help="auto | cpu | cuda:N (auto falls back to the CPU without CUDA)")
    g.add_argument("--gpu-dtype", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of weights and KV cache on the GPU side")
    g.add_argument("--threads", help="CPU expert threads (N or auto)")
    g.add_argument("--repack", choices=["auto", "true", "false"],
                   help="copy CPU experts into a faster layout at load where one exists (Q2_K..Q6_K IQ4_XS Q4_0 "
                        "Q5_0 Q8_0 IQ4_NL; auto: when the SIMD kernels are active and the copy fits in free memory)")
    g.add_argument("--ctx", "--context", dest="context", type=int, help="context length (KV cache size)")
    g.add_argument("--cpu-moe", action="store_true", default=None, help="all routed experts on the CPU side")
    g.add_argument("--n-cpu-moe", type=int, help="routed experts of blocks 0..N-1 on the CPU, the rest on the GPU (llama.cpp semantics: "
                        "dense blocks count; N past the main layers includes the MTP layer's experts)")
    g.add_argument("-ot", "--override-tensor", action="append", metavar="REGEX=DEVICE",
                   help="place tensors whose name matches REGEX on gpu or cpu (first match wins; repeatable)")


def _overrides(a: argparse.Namespace, keys) -> dict:
    return {k: getattr(a, k) for k in keys if getattr(a, k, None) is not None}


PLACEMENT_KEYS = ("model", "gpu", "gpu_dtype", "threads", "repack", "context", "cpu_moe", "n_cpu_moe", "override_tensor")


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

    pl = sub.add_parser("plan", help="validate a plan and print the resolved placement and memory",
                        description="Validate PLAN.yaml (default: the demo plan) and print where every tensor "
                                    "group lives, bytes per device, KV cache bytes, and whether it fits the GPU.")
    pl.add_argument("target", nargs="?", metavar="PLAN.yaml|MODEL.gguf")
    _placement_args(pl)

    b = sub.add_parser("bench", help="benchmarks (kernels: the CPU expert kernels; model: decode with/without MTP)",
                       description="Benchmarks. `nextn bench kernels [...]` runs the CPU expert kernel benchmark; "
                                   "`nextn bench model [PLAN|MODEL]` compares decoding with and without MTP.")
    b.add_argument("what", choices=["kernels", "linear", "model"])
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
    gen = _overrides(a, ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "mtp", "draft_max",
                         "p_min", "adaptive", "draft_ahead", "stop", "trace"))
    prompt = a.prompt if a.prompt is not None else DEFAULT_PROMPT
    run_stream = eng.stream(prompt, chat=a.chat, **gen)
    out = sys.stdout
    if not a.quiet:
        out.write(prompt if not a.chat else "")
    for piece in run_stream:
        out.write(piece)
        out.flush()
    out.write("\n")
    if not a.quiet:
        res = eng.last_result
        s = res.stats
        lines = [f"-- {s['generated_tokens']} tokens ({s['finish_reason']}), prompt {s['prompt_tokens']} tokens at "
                 f"{s['prompt_tokens_per_s']:.1f} tok/s, decode {s['decode_tokens_per_s']:.1f} tok/s"]
        if s["mtp"]:
            pos = ", ".join(f"{r:.0%}" for r in s["acceptance_by_position"])
            ks = " ".join(f"{k}:{n}" for k, n in s["draft_lengths"].items())
            lines.append(f"-- MTP draft_max {s['draft_max']}{' adaptive' if s['adaptive'] else ''}: "
                         f"drafted {s['drafted']}, accepted {s['accepted']} ({s['acceptance_rate']:.1%}; "
                         f"by position {pos}), {s['mean_tokens_per_step']:.2f} tokens/step, "
                         f"draft {s['draft_s']:.2f}s verify {s['verify_s']:.2f}s, steps by draft length {ks}"
                         + (f", drafted ahead {s['ahead_made']} used {s['ahead_used']}" if s["draft_ahead"] else ""))
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
        if a.trace:
            lines.append(f"-- trace written to {a.trace} (open in ui.perfetto.dev or chrome://tracing)")
        print("\n".join(lines), file=sys.stderr)
    return 0


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
        return {"run": cmd_run, "plan": cmd_plan, "bench": cmd_bench, "tune": cmd_tune}[a.command](a)
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
