"""Shared pytest fixtures.

- ``make_test_model(types="F32", split_max_tensors=None, match_hf=False, **spec_overrides) -> TestModel``:
  builds a small random GLM-4.x MoE (``runtime.testmodel``) once per distinct arguments per session,
  in a session tmp dir. The returned objects are shared between tests: treat them as read-only.
- ``test_model``: the default spec, F32.
- ``glm4moe_fixture_dir``: ../shared/fixtures/glm4moe-tiny (the llama.cpp-converted file); skips if absent.
"""
from __future__ import annotations

from pathlib import Path

import pytest


def _freeze(x):
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return x


@pytest.fixture(scope="session")
def make_test_model(tmp_path_factory):
    from runtime.testmodel import TestModelSpec, write_test_model

    cache: dict = {}

    def make(types="F32", split_max_tensors=None, match_hf=False, **spec_overrides):
        spec = TestModelSpec(**spec_overrides)
        key = (spec, _freeze(types), split_max_tensors, bool(match_hf))
        if key not in cache:
            d = tmp_path_factory.mktemp("testmodel")
            cache[key] = write_test_model(spec, d, types=types, split_max_tensors=split_max_tensors,
                                          match_hf=match_hf)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def test_model(make_test_model):
    return make_test_model()


def _find_fixture_dir() -> Path | None:
    here = Path(__file__).resolve()
    for base in (here.parents[2] / "shared", here.parents[1] / "shared"):
        d = base / "fixtures" / "glm4moe-tiny"
        if d.exists():
            return d
    return None


@pytest.fixture(scope="session")
def glm4moe_fixture_dir() -> Path:
    d = _find_fixture_dir()
    if d is None:
        pytest.skip("shared fixtures (glm4moe-tiny) not present")
    return d


@pytest.fixture(scope="session", autouse=True)
def _float32_gpu_side():
    """The tests compare against float32/float64 references (transformers, gguf's dequantize) with
    float32 tolerances, and check greedy outputs token for token. On a CUDA machine the gpu side's
    default dtype is bfloat16; the tests run it in float32 there (the GPU code path, float32
    numerics). bfloat16 on the GPU is measured by benchmarks/gpu_check.sh."""
    import torch
    from runtime import engine

    if not torch.cuda.is_available():
        yield
        return
    real = engine.resolve_dtype
    engine.resolve_dtype = lambda name, device: real("float32" if name in (None, "auto") else name, device)
    yield
    engine.resolve_dtype = real


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Test models are tiny: torch's intra-op threads only add OpenMP hand-off cost (and on a
    shared 2-core machine, spin-waiting against other processes). The CPU expert kernels set
    their own thread count."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
