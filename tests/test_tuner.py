"""nextn tune (placement.tuner) on small random models."""
from __future__ import annotations

import time

import pytest

from placement import load_plan
from placement.tuner import Tuner, main, parse_size
from runtime.errors import NextnError


@pytest.fixture(scope="module")
def model(make_test_model):
    from pathlib import Path

    return Path(make_test_model(types="Q8_0").gguf_path)


def test_parse_size():
    assert parse_size("24G") == parse_size("24GB") == parse_size("24GiB") == 24 << 30
    assert parse_size("512M") == 512 << 20 and parse_size("1048576") == 1 << 20 and parse_size("1.5g") == 3 << 29
    assert parse_size("0") == 0
    for bad in ("12Q", "", "G", "-1G", "1e9x", "twelve"):
        with pytest.raises(NextnError, match="cannot parse a memory size"):
            parse_size(bad)


def test_no_gpu_memory_gives_cpu_only_plan(model, tmp_path):
    import runtime

    out = tmp_path / "plan.yaml"
    t0 = time.perf_counter()
    rc = main([str(model), "--gpu-mem", "0", "--time-budget", "8", "--tokens", "8", "-o", str(out)])
    assert rc == 0 and time.perf_counter() - t0 <= 8 * 1.1
    plan = load_plan(out)
    assert plan.model_path.resolve() == model.resolve()
    eng = runtime.load(out, progress=False)
    assert eng.load_report.bytes_by_side["gpu"] == 0
    assert eng.generate("def f(x):", max_tokens=3).stats["weight_bytes_moved"] == 0


def test_room_for_some_expert_layers(model, tmp_path):
    """With gpu memory for exactly one more routed-expert layer than the default placement, the
    candidates that move more are rejected, the one that moves one is measured, and its memory
    estimate agrees with what load allocates."""
    probe = Tuner(model, tmp_path / "probe.yaml", gpu_mem=None, ram=None, context=256, threads="1", budget=60,
                  tokens=4, log=lambda s: None)
    probe.enumerate()
    L = probe.cfg.n_layers
    dt = "bfloat16" if probe.cuda else "float32"  # the first gpu dtype the tuner tries
    by_n = {c.n_cpu: c for c in probe.candidates if c.kind == "tuned" and c.est.gpu_dtype == dt}
    limit = (by_n[L - 1].est.gpu_bytes + by_n[L - 2].est.gpu_bytes) // 2
    t = Tuner(model, tmp_path / "plan.yaml", gpu_mem=limit, ram=None, context=256, threads="1", budget=60, tokens=4,
              log=lambda s: None, machine=probe.machine)
    t.enumerate()
    tuned = {c.n_cpu: c for c in t.candidates if c.kind == "tuned" and c.est.gpu_dtype == dt}
    assert tuned[L - 1].reject is None or tuned[L - 1].reject.startswith("pruned")
    for n in range(probe.cfg.n_dense, L - 1):
        assert tuned[n].reject and "gpu side needs" in tuned[n].reject
    c = tuned[L - 1]
    c.reject = None
    t.measure_job([c])
    assert c.measured and c.loaded["gpu"] > by_n[L].est.gpu_weight_bytes
    moved = c.placement.tensors[f"blk.{L - 1}.ffn_gate_exps.weight"]
    assert moved == "gpu"
    for side, est in (("gpu", c.est.gpu_weight_bytes), ("cpu", c.est.cpu_weight_bytes)):
        assert abs(c.loaded[side] - est) <= 0.05 * max(est, 1), (side, c.loaded[side], est)
    table = t.table(c)
    assert c.label in table and "why rejected" in table and "gpu side needs" in table


def test_time_budget_respected_and_table(model, tmp_path, capsys):
    import runtime

    out = tmp_path / "plan.yaml"
    t0 = time.perf_counter()
    rc = main([str(model), "--time-budget", "10", "--context", "256", "-o", str(out)])
    secs = time.perf_counter() - t0
    assert rc == 0 and secs <= 11.0, secs
    text = capsys.readouterr().out
    assert "decode pred / meas" in text and "* chosen:" in text
    assert "configs/demo.yaml" in text and "configs/cpu-only.yaml" in text
    assert out.read_text().startswith("# Written by `nextn tune`")
    eng = runtime.load(out, progress=False)
    assert eng.context == 256


def test_interrupt_writes_best_so_far(model, tmp_path, monkeypatch):
    calls = {"n": 0}
    orig = Tuner.measure_job

    def interrupting(self, job):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return orig(self, job)

    monkeypatch.setattr(Tuner, "measure_job", interrupting)
    out = tmp_path / "plan.yaml"
    rc = main([str(model), "--time-budget", "30", "--threads", "1", "-o", str(out)])
    assert rc == 130 and out.exists()
    load_plan(out)


def test_bad_input(tmp_path, model, capsys):
    from runtime.cli import main as cli

    notmodel = tmp_path / "x.gguf"
    notmodel.write_text("hello")
    assert cli(["tune", str(notmodel), "-o", str(tmp_path / "p.yaml")]) == 2
    assert "not a GGUF model file" in capsys.readouterr().err
    assert cli(["tune", str(model), "--gpu-mem", "12Q", "-o", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gpu-mem '12Q': cannot parse") and err.count("\n") == 1
    assert cli(["tune", str(model), "--ram", "lots", "-o", str(tmp_path / "p.yaml")]) == 2
    assert cli(["tune", str(model), "--time-budget", "0.01", "-o", str(tmp_path / "p.yaml")]) == 2
    assert "too small to measure anything" in capsys.readouterr().err
    assert cli(["tune", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "p.yaml")]) == 2
    assert not (tmp_path / "p.yaml").exists()


def test_f16_kv_cache_where_float32_does_not_fit_the_ram(model, tmp_path):
    """Without CUDA, a placement whose float32 KV cache does not fit --ram is tried with the F16
    cache (half the KV bytes); the plan written for it says kv_cache: float16 and loads so."""
    probe = Tuner(model, tmp_path / "probe.yaml", gpu_mem=None, ram=None, context=512, threads="1", budget=60,
                  tokens=4, log=lambda s: None)
    if probe.cuda:
        pytest.skip("on CUDA the KV cache takes gpu_dtype")
    probe.enumerate()
    c = next(c for c in probe.candidates if c.kind == "tuned" and c.est.gpu_dtype == "float32")
    need = c.est.cpu_bytes + c.est.gpu_bytes
    limit = need - c.est.kv_bytes // 4  # float32 KV misses by a quarter of itself; F16 saves half
    t = Tuner(model, tmp_path / "plan.yaml", gpu_mem=None, ram=limit, context=512, threads="1", budget=60, tokens=4,
              log=lambda s: None, machine=probe.machine)
    t.enumerate()
    same = [x for x in t.candidates if x.kind == "tuned" and x.n_cpu == c.n_cpu and x.est.gpu_dtype == "float32"]
    assert same and all(x.est.kv_dtype == "float16" and x.reject is None and "kv f16" in x.label for x in same)
    assert same[0].est.kv_bytes * 2 == c.est.kv_bytes
    text = t.plan_yaml(same[0])
    assert "kv_cache: float16" in text
    (tmp_path / "tuned.yaml").write_text(text)
    assert load_plan(tmp_path / "tuned.yaml").kv_cache == "float16"
