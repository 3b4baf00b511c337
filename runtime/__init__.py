"""nextn runtime: GLM-4.x MoE GGUF models on one GPU plus the CPU, with MTP speculative decoding.

    import runtime
    engine = runtime.load()                      # the bundled demo model and plan
    engine = runtime.load("plan.yaml", gpu="cpu") # a plan, with overrides
    engine = runtime.load("model.gguf")          # a model with the default placement
    print(engine.generate("def fibonacci(n):", max_tokens=64).text)
"""

from .api import DEMO_MODEL, DEMO_PLAN, load
from .engine import Engine, GenerationResult
from .errors import ModelFileError, NextnError, UnsupportedError

__all__ = ["load", "Engine", "GenerationResult", "NextnError", "ModelFileError", "UnsupportedError",
           "DEMO_MODEL", "DEMO_PLAN"]
