"""nextn runtime: GLM-4.x MoE GGUF models on one GPU plus the CPU, with MTP speculative decoding.

    import runtime
    engine = runtime.load()                      # the bundled demo model and plan
    engine = runtime.load("plan.yaml", gpu="cpu") # a plan, with overrides
    engine = runtime.load("model.gguf")          # a model with the default placement
    print(engine.generate("def fibonacci(n):", max_tokens=64).text)
"""

from .errors import ModelFileError, NextnError, UnsupportedError

__all__ = ["load", "Engine", "GenerationResult", "NextnError", "ModelFileError", "UnsupportedError",
           "DEMO_MODEL", "DEMO_PLAN"]

_LAZY = {"load": "api", "DEMO_MODEL": "api", "DEMO_PLAN": "api", "Engine": "engine", "GenerationResult": "engine"}


def __getattr__(name):
    # torch is imported on first use, so `nextn --help` and error paths stay quick
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
