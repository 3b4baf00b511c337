"""Bad input gets a one-line NextnError naming the problem, and the CLI prints it without a traceback."""

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import runtime
from runtime.errors import NextnError

_HERE = Path(__file__).resolve()
# beside the repository (a worktree's own shared/ link first), as conftest looks for it
FIX = next((p for p in (b / "shared" / "fixtures" / "glm4moe-tiny" / "glm4moe-tiny-f32.gguf"
                        for b in (_HERE.parents[1], _HERE.parents[2])) if p.exists()),
           _HERE.parents[2] / "shared" / "fixtures" / "glm4moe-tiny" / "glm4moe-tiny-f32.gguf")
pytestmark = pytest.mark.skipif(not FIX.exists(), reason="shared fixtures not present")


def rewrite(src: Path, dst: Path, *, arch=None, drop=None, reshape=None, retype=None):
    """Copy a GGUF with one change: another architecture, a tensor dropped, reshaped or retyped."""
    r = gguf.GGUFReader(src)
    a = arch or "glm4moe"
    w = gguf.GGUFWriter(dst, a)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        v = f.contents()
        k2 = k.replace("glm4moe.", f"{a}.")
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_array(k2, v)
        else:
            w.add_key_value(k2, v, vt)
    for t in r.tensors:
        if t.name == drop:
            continue
        data = np.array(t.data)
        if t.name == reshape:
            data = np.zeros((data.shape[0] + 1,) + data.shape[1:], data.dtype)
        if t.name == retype:
            # same bytes, declared as Q8_1 (a real ggml type nextn does not accept)
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
            n = int(np.prod([int(x) for x in t.shape]))
            raw = np.zeros((n // int(t.shape[0]), int(t.shape[0]) // block * size), np.uint8)
            w.add_tensor(t.name, raw,
                         raw_dtype=gguf.GGMLQuantizationType.Q8_1)
            continue
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def err(path, **kw) -> str:
    with pytest.raises(NextnError) as e:
        runtime.load(path, progress=False, use_kernels=False, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_path(tmp_path):
    m = err(tmp_path / "nope.gguf")
    assert "nope.gguf" in m and ("no such file" in m or "does not exist" in m)


def test_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_text("hello, I am not a model" * 10)
    assert "not a GGUF file" in err(p)


def test_truncated(tmp_path):
    p = tmp_path / "t.gguf"
    p.write_bytes(FIX.read_bytes()[: FIX.stat().st_size // 2])
    assert "truncated" in err(p)


def test_truncated_header(tmp_path):
    p = tmp_path / "t.gguf"
    p.write_bytes(FIX.read_bytes()[:2000])
    assert "truncated" in err(p)


def test_other_architecture(tmp_path):
    p = rewrite(FIX, tmp_path / "llama.gguf", arch="llama")
    assert "architecture is 'llama'" in err(p)


def test_glm4moe_tensors_under_deepseek2_are_named(tmp_path):
    """A deepseek2 (GLM-4.7-Flash) file must hold latent attention: a GQA model relabelled so
    fails on the first latent key it lacks (tests/test_flash.py has the real ones)."""
    p = rewrite(FIX, tmp_path / "flash.gguf", arch="deepseek2")
    assert "missing metadata key deepseek2.attention.q_lora_rank" in err(p)


def test_missing_tensor(tmp_path):
    p = rewrite(FIX, tmp_path / "m.gguf", drop="blk.1.ffn_up_exps.weight")
    assert "missing tensor blk.1.ffn_up_exps.weight" in err(p)


def test_wrong_shape(tmp_path):
    p = rewrite(FIX, tmp_path / "s.gguf", reshape="blk.0.attn_q.weight")
    m = err(p)
    assert "blk.0.attn_q.weight" in m and "shape" in m


def test_unsupported_type(tmp_path):
    p = rewrite(FIX, tmp_path / "u.gguf", retype="blk.2.attn_output.weight")
    m = err(p)
    assert "blk.2.attn_output.weight" in m and "Q8_1" in m


@pytest.fixture(scope="module")
def eng():
    return runtime.load(FIX, progress=False, use_kernels=False, context=64)


def test_prompt_longer_than_context(eng):
    with pytest.raises(NextnError, match="longer than the context"):
        eng.generate(list(range(10, 80)), max_tokens=4)


@pytest.mark.parametrize("kw,word", [
    (dict(temperature=-1), "temperature"), (dict(top_k=-3), "top_k"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(min_p=1.0), "min_p"), (dict(max_tokens=-1), "max_tokens"),
    (dict(draft_max=-1), "draft_max"), (dict(p_min=2.0), "p_min"), (dict(stop=[""]), "stop"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_invalid_sampling_values(eng, kw, word):
    with pytest.raises(NextnError, match=word):
        eng.generate("hi", **kw)


def test_token_id_out_of_range(eng):
    with pytest.raises(NextnError, match="out of range"):
        eng.logits([1, 10**6])


def test_cli_prints_one_line_error(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_text("nope")
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "run", str(p), "--prompt", "hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "not a GGUF file" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd", [["--help"], ["run", "--help"], ["plan", "--help"], ["bench", "model", "--help"],
                                 ["tune", "--help"]])
def test_cli_help_for_every_command(cmd):
    r = subprocess.run([sys.executable, "-m", "runtime.cli", *cmd], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout


def test_stream_checks_its_settings_when_called(eng):
    """A bad setting raises from stream() itself, before any text: a caller that prints the prompt
    and then iterates (nextn run) never shows a prompt followed by an error."""
    with pytest.raises(NextnError, match="draft_max"):
        eng.stream("hi", draft_max=17)


def test_cli_bad_draft_max_prints_no_prompt(capsys):
    from runtime.cli import main
    assert main(["run", str(FIX), "--prompt", "hello there", "--draft-max", "17", "--max-tokens", "2"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.strip().startswith("error:") and "draft" in out.err
