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
@pytest.mark.parametrize("prog,extra", [("dot_rate.c", []),
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
    assert "nothing to repack" in out and "repacked / ggml decode time" in out
