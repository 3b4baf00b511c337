"""Damaged GGUF files load or fail with one short NextnError line naming the file (benchmarks/fuzz_gguf.py).

A few hundred seeded cases of the fuzzer run here (the full run is `benchmarks/fuzz_gguf.py --cases
5000`), in a worker process so that a crash is a failed case rather than a dead test run; and the
findings the fuzzer made, each as a case of its own.
"""
from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.api import DEMO_MODEL
from runtime.errors import NextnError

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fuzz_gguf", ROOT / "benchmarks" / "fuzz_gguf.py")
fz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fz)

SEEDED_CASES = 300


@pytest.fixture(scope="module")
def sources(make_test_model, glm4moe_fixture_dir):
    split = make_test_model(split_max_tensors=20)  # the split set test_parity checks for parity
    assert len(split.gguf_paths) > 1
    return [[DEMO_MODEL], [glm4moe_fixture_dir / "glm4moe-tiny-q8_0.gguf"], list(split.gguf_paths)]


def test_seeded_fuzz_cases(sources):
    groups = [[str(p) for p in g] for g in sources]
    results = fz.run_cases([fz.case_seed(7, i) for i in range(SEEDED_CASES)], groups, jobs=1)
    assert len(results) == SEEDED_CASES
    text, n_fail = fz.summarize(results)
    assert n_fail == 0, text
    outcomes = {r["outcome"] for r in results}
    assert outcomes == {"ok", "error"}, text  # both kinds occur: the mutations reach past the header


def test_harness_sees_a_crash_and_a_hang(tmp_path, monkeypatch):
    """The runner's own guarantees: a case that kills its worker is a crash, one that stalls a hang,
    and the cases after it still run (a worker that segfaults is replaced)."""
    monkeypatch.setattr(fz, "TIMEOUT_S", 2.0)
    boom = tmp_path / "w.py"
    boom.write_text("import os, sys, time, json\n"
                    "for line in sys.stdin:\n"
                    "    cs = int(line); print(json.dumps({'start': cs}), flush=True)\n"
                    "    if cs == 1: os.abort()\n"
                    "    if cs == 2: time.sleep(60)\n"
                    "    print(json.dumps({'seed': cs, 'outcome': 'ok', 'seconds': 0}), flush=True)\n")
    import subprocess
    import sys

    real = subprocess.Popen

    def popen(args, **kw):
        return real([sys.executable, str(boom)], **kw)

    monkeypatch.setattr(fz.subprocess, "Popen", popen)
    res = {r["seed"]: r["outcome"] for r in fz.run_cases([0, 1, 3, 2, 4], [["x"]], jobs=1)}
    assert res == {0: "ok", 1: "crash", 3: "ok", 2: "hang", 4: "ok"}


def _rewrite(src: Path, dst: Path, edit) -> Path:
    p = fz.Parsed(src.read_bytes())
    pad = edit(p)
    dst.write_bytes(fz.serialize(p, pad_align=pad))
    return dst


def _load_error(path) -> str:
    with pytest.raises(NextnError) as e:
        runtime.load(path, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) <= fz.MAX_MESSAGE and Path(path).name in msg
    return msg


def test_alignment_one_loads_and_matches(tmp_path, glm4moe_fixture_dir):
    """general.alignment 1 is legal GGUF: tensors at odd addresses are copied for the kernels and
    the model computes what the original does."""
    src = glm4moe_fixture_dir / "glm4moe-tiny-q8_0.gguf"

    def align1(p):
        p.kvs.append(["general.alignment", 4, 1, None])
        return 1

    odd = _rewrite(src, tmp_path / "a1.gguf", align1)
    ids = [1, 5, 9, 13]
    want = runtime.load(src, progress=False).logits(ids)
    got = runtime.load(odd, progress=False).logits(ids)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("align", [0, 3, 2**31])
def test_bad_alignment(tmp_path, glm4moe_fixture_dir, align):
    def edit(p):
        p.kvs.append(["general.alignment", 4, align, None])
        return 32

    m = _load_error(_rewrite(glm4moe_fixture_dir / "glm4moe-tiny-q8_0.gguf", tmp_path / "a.gguf", edit))
    assert "general.alignment" in m


def test_merge_out_of_vocabulary(tmp_path):
    """The tokenizers library's bare "Error while initializing BPE" becomes a line naming the merge."""
    def edit(p):
        merges = fz._kv(p, "tokenizer.ggml.merges")
        merges[2][0] = "zzq \u4e2d\u4e2d"

    m = _load_error(_rewrite(DEMO_MODEL, tmp_path / "m.gguf", edit))
    assert "tokenizer.ggml.merges" in m and "zzq" in m and "BPE" not in m


def test_lying_array_count_is_refused_before_allocating(tmp_path):
    """An array count of 2**40 float64s (8 TiB) fails on the file's size, not on a MemoryError."""
    data = bytearray(DEMO_MODEL.read_bytes())
    p = fz.Parsed(bytes(data))
    kind, start, end = next(r for r in p.regions if r[0] == "int:array_count")
    struct.pack_into("<Q", data, start, 2**40)
    struct.pack_into("<I", data, start - 4, 12)  # item type float64
    path = tmp_path / "c.gguf"
    path.write_bytes(bytes(data))
    m = _load_error(path)
    assert "array of 1099511627776 items" in m


def test_long_damaged_strings_are_cut_in_messages(tmp_path, glm4moe_fixture_dir):
    def edit(p):
        p.kvs = [kv for kv in p.kvs if kv[0] != "general.architecture"] + [
            ["general.architecture", 8, "x" * 100_000, None]]

    m = _load_error(_rewrite(glm4moe_fixture_dir / "glm4moe-tiny-q8_0.gguf", tmp_path / "s.gguf", edit))
    assert "architecture is 'xxx" in m and "(100000 chars)" in m


def test_wrong_metadata_types(tmp_path, glm4moe_fixture_dir):
    def edit(p):
        fz._kv(p, "glm4moe.attention.head_count_kv")[1:3] = [8, "eight"]

    m = _load_error(_rewrite(glm4moe_fixture_dir / "glm4moe-tiny-q8_0.gguf", tmp_path / "t.gguf", edit))
    assert "glm4moe.attention.head_count_kv is 'eight'" in m


def test_split_count_disagreeing_with_names(make_test_model, tmp_path):
    split = make_test_model(split_max_tensors=20)
    import shutil

    for p in split.gguf_paths:
        shutil.copy(p, tmp_path / p.name)
    first = tmp_path / split.gguf_paths[0].name

    def edit(p):
        fz._kv(p, "split.count")[2] = 9999

    _rewrite(first, first, edit)
    m = _load_error(first)
    assert "split.count is 9999 but the name says" in m
