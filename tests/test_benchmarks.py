"""The benchmark programs build and run (their figures are in BENCHMARKS.md, not checked here)."""
from __future__ import annotations

import importlib.util
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


@pytest.mark.skipif(shutil.which("gcc") is None or platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="needs gcc on x86-64")
@pytest.mark.parametrize("prog,extra", [("dot_rate.c", []), ("omp_cost.c", []), ("lin_rate.c", []),
                                        ("moe_ab.c", ['-DNX_OLD_IMPL="%s"' % (ROOT / "cpu_kernels" / "moe_impl.h")])])
def test_c_benchmarks_compile(tmp_path, prog, extra):
    out = tmp_path / prog.replace(".c", "")
    r = subprocess.run(["gcc", "-O1", "-std=gnu11", "-fopenmp", "-fno-strict-aliasing", "-Werror=implicit-function-declaration",
                        f"-I{ROOT / 'cpu_kernels'}", *extra, str(BENCH / prog), "-o", str(out), "-lm"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    if prog == "moe_ab.c":  # bad arguments: a usage line, not a crash
        r = subprocess.run([str(out), "0"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "usage" in r.stdout


def test_repack_decode_script_runs(capsys):
    spec = importlib.util.spec_from_file_location("repack_decode", BENCH / "repack_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--pairs", "2", "--max-tokens", "4", "--prompts", "1"]) == 0   # the demo model
    out = capsys.readouterr().out
    import cpu_kernels  # the demo's Q8_0 experts are repacked where a SIMD path runs
    assert ("nothing to repack" in out) == (cpu_kernels.active_path() == "ref")
    assert "repacked / ggml decode time" in out


def test_layout_ab_script_runs(capsys):
    import cpu_kernels

    mod = _script("layout_ab")
    assert mod.main(["--mix", "Q4_K,Q5_0", "--cases", "1,3s", "--calls", "2", "--experts", "8"]) == 0
    out = capsys.readouterr().out
    if cpu_kernels.active_path() == "ref":
        assert "the GGUF layout alone" in out and "T=   1: ggml" in out
    else:
        assert "q4_k_r8" in out and "T=   1:" in out and "T=  3s:" in out and "paired speed-up" in out
    with pytest.raises(SystemExit, match="--mix"):
        mod.main(["--mix", "Q9_9"])
    # another checkout (here: this one): its cpu_kernels, and a mix without a repacked layout
    assert mod.main(["--checkout", str(ROOT), "--mix", "Q4_1,Q4_1", "--cases", "1", "--calls", "1",
                     "--experts", "8"]) == 0
    out = capsys.readouterr().out
    assert "the GGUF layout alone" in out and "T=   1: ggml" in out and "paired" not in out


def test_gpu_profile_script_runs_on_the_cpu(capsys):
    """benchmarks/gpu_profile.py is meant for a lent GPU machine: it must not rot between loans."""
    from runtime.api import DEMO_MODEL

    spec = importlib.util.spec_from_file_location("gpu_profile", BENCH / "gpu_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(DEMO_MODEL), "--gpu", "cpu", "--tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "===== plain: 3 tokens" in out and "===== mtp k=1: 3 tokens" in out and "aten::" in out


def test_divergence_explained_only_at_a_rounding_tie():
    """`nextn bench model` tells a bfloat16 near-tie (argmax flipped by rounding) from a real bug."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from runtime.bench import explain_divergence
    from runtime.errors import NextnError

    row = np.zeros(8, np.float32)
    row[3], row[5] = 10.0, 9.99  # 0.01 apart: inside bfloat16 rounding at |logit| 10, not float32's
    seen = []

    def logits(ids):
        seen.append(list(ids))
        return np.stack([row] * len(ids))

    want, got = [1, 2, 3, 4], [1, 2, 5, 4]
    bf16 = SimpleNamespace(logits=logits, dtype=torch.bfloat16)
    msg = explain_divergence(bf16, [7, 7], got, want)
    assert "near-tie" in msg and "generated token 2" in msg
    assert seen == [[7, 7, 1, 2]]  # plain's logits at the first differing position
    with pytest.raises(NextnError, match="a bug"):
        explain_divergence(SimpleNamespace(logits=logits, dtype=torch.float32), [7, 7], got, want)
    row[5] = 8.0  # clearly apart: a bug in any dtype
    with pytest.raises(NextnError, match="not a rounding tie"):
        explain_divergence(bf16, [7, 7], got, want)
    with pytest.raises(NextnError, match="length differs"):
        explain_divergence(bf16, [7, 7], want[:3], want)


def test_bench_linear_runs_through_the_cli(capsys):
    """`nextn bench linear`: one small weight, one type, one size; every row prints both timings."""
    from runtime.bench import main
    assert main("linear", ["--weights", "shexp_down", "--types", "q8_0", "--tokens", "1,2", "--repeats", "1",
                           "--copies", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("shexp_down")]
    assert [r[2] for r in rows] == ["1", "2"] and all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    # "vs 1 row": each T's kernel time over T=1's (the cost of the extra rows)
    assert rows[0][7] == "1.00x" and float(rows[1][7].rstrip("x")) > 0
    # the floor: the larger of the bytes over the read bandwidth and the multiply-adds over the
    # multiply rate; no kernel beats it by much (timing noise), and the floor grows with T
    for r in rows:
        floor, x = float(r[8]), float(r[9].rstrip("x"))
        assert floor > 0 and x > 0.5 and abs(float(r[3]) / floor - x) < 0.01 * x + 0.01
    assert float(rows[1][8]) >= float(rows[0][8])
    # a half type on both sides of the runtime's GEMM threshold, with the runtime path's column
    assert main("linear", ["--weights", "shexp_down", "--types", "bf16", "--tokens", "1,64", "--repeats", "1",
                           "--copies", "1", "--runtime-path"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("shexp_down")]
    assert [r[1:3] for r in rows] == [["bf16", "1"], ["bf16", "64"]] and all(float(r[-1]) > 0 for r in rows)


def test_peak_rates_probe():
    """The multiply-rate probe behind bench linear's floor: positive on the SIMD paths (its chains'
    sums are checked in C), 0 on the reference path."""
    import cpu_kernels as ck

    if ck.active_path() == "ref":
        assert ck.peak_rates(threads=1) == {"int8_macs": 0.0, "f32_fmas": 0.0}
        return
    one = ck.peak_rates(threads=1, steps=1 << 16)
    assert one["int8_macs"] > 1e9 and one["f32_fmas"] > 1e8


def _script(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_verify_rows_script_finds_no_difference_on_the_demo(capsys):
    from runtime.api import DEMO_PLAN
    assert _script("verify_rows").main([str(DEMO_PLAN), "--rows", "3", "--tokens", "4"]) == 0
    assert capsys.readouterr().out.strip().endswith("max |logit difference| 0")


def test_decode_ab_script_runs(capsys):
    from runtime.api import DEMO_PLAN
    assert _script("decode_ab").main([str(ROOT), str(DEMO_PLAN), "--tokens", "2", "--repeats", "1"]) == 0
    assert "plain" in capsys.readouterr().out


def test_step_costs_script_runs_on_the_demo(capsys):
    assert _script("step_costs").main([str(ROOT), "--reps", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "x plain" in line]
    assert len(rows) == 5 and rows[0].split()[-1] == "1.00"


def test_bench_dequant_script_checks_every_tensor_of_the_demo(capsys):
    from runtime.api import DEMO_MODEL
    assert _script("bench_dequant").main([str(DEMO_MODEL), "--experts"]) == 0
    out = capsys.readouterr().out
    assert "every tensor equal" in out and "Q8_0" in out and "F16" in out


def test_cuda_graph_probe_says_so_without_cuda(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the probe is run by benchmarks/gpu_check.sh")
    assert _script("cuda_graph_probe").main([]) == 0
    assert "no CUDA" in capsys.readouterr().out
    # the eager segment it would capture, on the CPU: the probe's own code runs
    assert _script("cuda_graph_probe").main(["--dry-run", "--reps", "3"]) == 0
    assert "eager:" in capsys.readouterr().out


def test_policy_giveups_script_runs_and_describes_the_policy(capsys):
    from runtime.draft_policy import DraftPolicy, StepSample
    mod = _script("policy_giveups")
    assert mod.main(["--rounds", "1", "--prompts", "1", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "round 0 prompt 0: draft lengths" in out and out.strip().endswith("give-up(s) in 1 sequences")
    p = DraftPolicy(draft_max=1, adaptive=True, total_experts=0)
    for k in (0, 1, 0, 1):
        p.observe(k, k, 0, StepSample(k, 0.002 if k else 0.001, 0.0, 0))
    text = mod.describe(p)
    assert "ratio to plain by k {1: [2.0, 2.0]}" in text and "rates [" in text


def test_min_work_ab_script_runs_and_restores_the_threshold(capsys):
    import cpu_kernels as ck
    before = ck._set_min_work_per_thread(12345)
    try:
        assert _script("min_work_ab").main(["--settings", "1048576,0", "--reps", "2", "--rounds", "1",
                                            "--max-tokens", "4"]) == 0
        out = capsys.readouterr().out
        assert "fused block call" in out and "generate_batch" in out
        assert len([line for line in out.splitlines() if line.split()[:1] == ["0"]]) == 2
        assert ck._set_min_work_per_thread(before) == 12345
    finally:
        ck._set_min_work_per_thread(before)


def test_replay_ab_script_runs_two_checkouts(capsys):
    # this checkout against itself: the table has a ratio per run and the median line
    assert _script("replay_ab").main([str(ROOT), str(ROOT), "--rows", "1,2", "--reps", "3", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "median new/base: 1 rows" in out and "2 rows" in out
    assert len([line for line in out.splitlines() if line.split()[:1] == ["0"]]) == 1


def test_attention_context_script_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("attention_context", BENCH / "attention_context.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--contexts", "16,40", "--rows", "1,2", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("GLM-4.5-Air attention shape") and len(out) == 2 + 2 * 3  # L x (1 seq, 2 seq, 2 dist)
    # the two KV cache types side by side, with the F16 cache's time over the float32 cache's
    assert mod.main(["--contexts", "16", "--rows", "1", "--kv", "float32,float16", "--runs", "1",
                     "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "f16/f32" in out[1] and len(out) == 3 and out[2].split()[-1].endswith("x")
    with pytest.raises(SystemExit, match="--kv"):
        mod.main(["--kv", "int8", "--dir", str(tmp_path)])


def test_bench_batch_runs_and_checks_every_output(capsys):
    """`nextn bench batch` on the demo: one row per (batch size, MTP setting) with the rows and
    experts per forward, the MTP acceptance over every round's drafts, the on/off ratios, and
    every sequence checked equal to its lone run."""
    from runtime.bench_batch import main

    assert main(["--sequences", "1,2", "--mtp", "--rounds", "2", "--max-tokens", "12", "--kv-cache", "f16"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out if line.split()[:1] in (["1"], ["2"])]
    assert [r[:2] for r in rows] == [["1", "off"], ["2", "off"], ["1", "on"], ["2", "on"]]
    for r in rows:
        n, seqs, fwd_rows, experts = int(r[0]), float(r[7]), float(r[8]), float(r[9])
        assert float(r[2]) > 0 and 0 < seqs <= n and fwd_rows >= seqs and experts > 0
        # acceptance only with MTP: a percentage, or "-" when the policy drafted nothing
        assert r[-1] == "-" if r[1] == "off" else (r[-1] == "-" or 0 <= float(r[-1].rstrip("%")) <= 100)
    assert any(line.startswith("# 2 sequences: MTP on / off = ") for line in out)
    assert out[-1] == "# outputs equal to each prompt decoded alone: all"


def test_peer_demo_reference_decodes_in_float64_and_finds_routing_ties():
    """peer_demo --reference: its float64 greedy tokens with a KV cache are the argmax chain of
    whole-sequence logits, its margins are top-1 less top-2, and the routing tie is a margin of a
    routed block's router (checked against its own scores here)."""
    import torch

    from runtime.api import DEMO_MODEL

    mod = _script("peer_demo")
    assert mod.departs([1, 2, 3], [1, 2, 3, 4]) is None and mod.departs([1, 5], [1, 2]) == 1
    assert mod.departs([1, 2, 3], [1, 2]) == 2
    model = mod.reference_model(Path(DEMO_MODEL))
    assert next(model.parameters()).dtype == torch.float64
    prompt = [5, 17, 99, 3]
    toks, margins = mod.reference_tokens(model, [prompt], 4)
    ids = list(prompt)
    with torch.no_grad():
        for t, m in zip(toks[0], margins[0]):
            row = model(input_ids=torch.tensor([ids])).logits[0, -1]
            top = torch.topk(row, 2).values
            assert t == int(torch.argmax(row)) and abs(m - float(top[0] - top[1])) < 1e-6  # its router runs in float32
            ids.append(t)
    block, margin = mod.routing_tie(model, ids)
    n_dense = model.config.first_k_dense_replace
    assert n_dense <= block < model.config.num_hidden_layers and 0.0 <= margin < 1.0
