"""Size a plan for a model that is not on this machine, from the real shapes alone:

    python -m placement configs/glm45-air-24gb.yaml --shapes glm45-air --gpu-free 23.5
    python -m placement PLAN.yaml --shapes glm47 --mix Q4_K_M --gpu-device cuda:0 --set n_cpu_moe=80

With a model file at hand use `nextn plan PLAN.yaml` instead.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from runtime.config import read_config
from runtime.errors import NextnError

from . import estimate_memory, format_report, load_plan, resolve
from .synthetic import GLM_SHAPES, MIXES, synthetic_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m placement", description=__doc__.split("\n\n")[0])
    p.add_argument("plan", nargs="?", help="plan YAML (default: the built-in defaults)")
    p.add_argument("--shapes", choices=sorted(GLM_SHAPES), default="glm45-air")
    p.add_argument("--mix", choices=MIXES, default="Q4_K_M")
    p.add_argument("--nextn-copies", choices=("missing", "identical", "different"), default="missing")
    p.add_argument("--gpu-device", default="cuda:0", help="what the gpu side runs on (default cuda:0)")
    p.add_argument("--gpu-free", type=float, help="free GPU memory in GiB, for the fits check")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a plan override")
    a = p.parse_args(argv)
    try:
        overrides = {}
        for kv in a.set:
            k, _, v = kv.partition("=")
            overrides[k] = yaml.safe_load(v)
        plan = load_plan(a.plan, overrides, check_model=False)
        model = synthetic_model(a.shapes, a.mix, a.nextn_copies)
        cfg = read_config(model)
        res = resolve(plan, model, cfg)
        est = estimate_memory(res, model, cfg, plan, gpu_device=a.gpu_device)
        free = int(a.gpu_free * (1 << 30)) if a.gpu_free is not None else None
        print(format_report(plan, res, est, gpu_free_bytes=free))
    except NextnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
