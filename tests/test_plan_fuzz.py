"""Damaged plans, overrides and CLI flags: a valid result or one PlanError/NextnError line.

Seeded mutations of the shipped plans (keys misspelt, values of the wrong type, huge, negative or
non-finite, lines dropped, doubled or re-indented, bytes flipped, the file cut short) are read and,
for the demo plan, resolved against the demo model with their memory estimated, as `nextn plan`
does. An error must be one line that names the plan file and, for a problem inside the file, its
line. Tensor-name patterns that would backtrack for ever are refused at 100 ms.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

import placement
from placement import schema
from runtime import cli
from runtime.api import DEMO_MODEL, DEMO_PLAN
from runtime.config import read_config
from runtime.errors import NextnError
from runtime.gguf_file import GGUFFile

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BAD_VALUES = ["-1", "0", "-0", "1e400", "-1e400", ".nan", ".inf", str(10**30), str(-10**30), "2.5", "'x'",
              "'" + "y" * 100_000 + "'", "[]", "[1, 2]", "{}", "{a: 1}", "null", "true", "auto", "'1e3'", "cpu",
              "'((a+)+)+$=cpu'", "'[=cpu'", "&a x", "*a", "!!binary aGk=", "!!python/object:os.system x"]
KEY_RE = re.compile(r"^(\s*-?\s*)([A-Za-z_][\w.]*|\d+(?:-\d+)?)(\s*:)(.*)$")


def mutate(text: str, rng: random.Random) -> str:
    lines = text.splitlines()
    op = rng.randrange(8)
    i = rng.randrange(len(lines))
    m = KEY_RE.match(lines[i])
    if op in (0, 1, 2) and m:  # a bad value
        lines[i] = f"{m[1]}{m[2]}{m[3]} {rng.choice(BAD_VALUES)}"
    elif op == 3 and m:  # a misspelt or unknown key
        k = m[2]
        k2 = (k[:-1] if len(k) > 1 and rng.random() < 0.5 else k + rng.choice(["x", "_", "s"]))
        lines[i] = f"{m[1]}{k2}{m[3]}{m[4]}"
    elif op == 4:
        del lines[i]
    elif op == 5:
        lines.insert(i, lines[i])
    elif op == 6:
        lines[i] = " " * rng.choice([1, 2, 3, 5]) + lines[i]
    else:
        b = bytearray("\n".join(lines).encode())
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b[:rng.randint(len(b) // 2, len(b))]).decode("utf-8", errors="replace")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def demo():
    f = GGUFFile(DEMO_MODEL)
    return f, read_config(f)


def _check_message(msg: str, plan_path: Path):
    assert "\n" not in msg and len(msg) <= 600, msg[:700]
    assert str(plan_path) in msg or msg.startswith("override"), msg


def test_seeded_plan_mutations(tmp_path, demo):
    f, cfg = demo
    sources = [DEMO_PLAN] + sorted(CONFIGS.glob("*.yaml"))
    rng = random.Random(19)
    outcomes = {"ok": 0, "error": 0}
    for case in range(300):
        src = sources[case % len(sources)]
        text = mutate(src.read_text(), rng)
        p = tmp_path / f"p{case}.yaml"
        p.write_text(text)
        if src == DEMO_PLAN:
            text = text.replace("model: ../runtime/demo/demo.gguf", f"model: {DEMO_MODEL}")
            p.write_text(text)
        try:
            plan = placement.load_plan(p, check_model=src == DEMO_PLAN)
            if src == DEMO_PLAN and plan.model_path == DEMO_MODEL:
                res = placement.resolve(plan, f, cfg)
                placement.estimate_memory(res, f, cfg, plan)
            outcomes["ok"] += 1
        except NextnError as e:
            _check_message(str(e), p)
            outcomes["error"] += 1
    assert outcomes["ok"] > 20 and outcomes["error"] > 100, outcomes


@pytest.mark.parametrize("key,value", [
    ("threads", 10**9), ("threads", -3), ("threads", 2.5), ("context", 10**12), ("context", -1), ("n_cpu_moe", -2),
    ("temperature", float("inf")), ("top_p", float("nan")), ("top_k", 10**40), ("max_tokens", 10**15),
    ("seed", 2**70), ("seed", -5), ("draft_max", 10**6), ("p_min", -0.5), ("gpu", "cuda:x"), ("gpu_dtype", 3),
    ("model", ""), ("override_tensor", 5), ("override_tensor", ["noequals"]), ("cpu_moe", "maybe"),
    ("repack", []), ("draft_maxx", 1),
])
def test_bad_overrides(key, value):
    with pytest.raises(NextnError) as e:
        schema.apply_overrides(schema.Plan(), {key: value})
    msg = str(e.value)
    assert msg.startswith(f"override '{key}'") and "\n" not in msg and len(msg) < 300, msg


def test_plan_that_cannot_be_read(tmp_path):
    p = tmp_path / "locked.yaml"
    p.write_text("gpu: cpu\n")
    p.chmod(0)
    try:
        if p.read_text():  # root reads anything: nothing to check
            pytest.skip("running as root")
    except PermissionError:
        with pytest.raises(NextnError, match="cannot read the plan"):
            placement.load_plan(p)
    finally:
        p.chmod(0o644)


def test_plan_pointing_at_a_wrong_file(tmp_path, demo):
    notgguf = tmp_path / "model.gguf"
    notgguf.write_text("just text")
    p = tmp_path / "plan.yaml"
    p.write_text("model: model.gguf\n")
    plan = placement.load_plan(p)
    with pytest.raises(NextnError, match=r"model\.gguf: not a GGUF file"):
        GGUFFile(plan.model_path)
    p.write_text("model: missing.gguf\n")
    with pytest.raises(NextnError, match=rf"^{re.escape(str(p))}:1: model: model file .*missing\.gguf does not exist"):
        placement.load_plan(p)


# `re` never finishes this against a tensor name (2**27 ways to split the name); the `regex`
# module's matcher does it at once, so it is accepted
def test_regex_that_hangs_python_re_is_fine():
    plan = schema.apply_overrides(schema.Plan(), {"override_tensor": [r"^([a-z._0-9]|[a-z._0-9])*!=cpu"]})
    assert plan.overrides[0].search("blk.10.ffn_gate_exps.weight") is None


def test_regex_over_budget_is_refused(monkeypatch, tmp_path, demo):
    """A pattern that does not finish against a name within the budget is refused with the entry's
    file and line. (The budget is made tiny here: patterns slow enough for 100 ms are hard to find
    for the `regex` module's matcher.)"""
    f, cfg = demo
    p = tmp_path / "plan.yaml"
    # only the slow pattern: with a budget this small, any pattern may run over it on a busy machine
    p.write_text(f"model: {DEMO_MODEL}\noverrides:\n  - 'blk\\.1\\.=cpu'\n  - '(\\w+\\.?)+\\d$=cpu'\n")
    p2 = tmp_path / "slow.yaml"
    p2.write_text(f"model: {DEMO_MODEL}\noverrides:\n  - '(\\w+\\.?)+\\d$=cpu'\n")
    placement.load_plan(p)  # 0.1 s: fine
    plan = placement.load_plan(p2)
    monkeypatch.setattr(schema, "REGEX_TIMEOUT_S", 1e-5)
    with pytest.raises(NextnError) as e:
        placement.resolve(plan, f, cfg)
    msg = str(e.value)
    assert msg.startswith(f"{p2}:3: overrides[0]: regular expression") and "did not finish" in msg, msg
    with pytest.raises(NextnError, match="did not finish"):  # and when the plan is read
        placement.load_plan(p2)


@pytest.mark.parametrize("argv,word", [
    (["run", "--ctx", "abc"], "invalid int value"), (["run", "-n", "1.5"], "invalid int value"),
    (["run", "--gpu-dtype", "fp8"], "invalid choice"), (["run", "--bogus"], "unrecognized arguments"),
    (["run", "--threads", "0"], "thread count"), (["run", "--threads", "99999999"], "thread count"),
    (["run", "--ctx", "-4"], "context length"), (["run", "--n-cpu-moe", "-1"], "layer count"),
    (["run", "-ot", "([=cpu"], "invalid regular expression"), (["run", "-ot", "x=tpu"], "unknown device"),
    (["run", "--trace", "/nonexistent-dir/t.json"], "does not exist"),
    (["run", "/nonexistent.gguf"], "does not exist"), (["plan", "/nonexistent.yaml"], "no such plan file"),
    (["run", "--temp", "inf"], "temperature"), (["run", "--top-p", "nan"], "top_p"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_flags_one_line(capsys, argv, word):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error:") and err.count("\n") == 1 and word in err, err
