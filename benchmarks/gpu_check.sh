#!/usr/bin/env bash
# The prepared GPU check (issue 7): on a machine with CUDA, install what it needs from wheels carried
# with it, build the CPU kernels, write a synthetic GLM-4.5-Air-shaped file of a few layers, and run
# the benchmark with the GPU plan (MTP layer, attention, shared experts on the GPU; routed experts on
# the CPU kernels). Budget: under 8 minutes on a 16-core H100 machine.
#
# Prepare the wheels here once (the device has torch, numpy, pyyaml, jinja2, tokenizers, tqdm):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl gguf==0.19.0 cffi==2.0.0 pycparser
# then run it with the device tool: command `bash benchmarks/gpu_check.sh`, carry [".whl"].
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nextn-gpu-check}
mkdir -p "$OUT"
LAYERS=${LAYERS:-6}
exec > >(tee "$OUT/gpu_check.log") 2>&1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# Build the cffi extension in place (no pip install: nothing can be fetched there).
python3 cpu_kernels/build.py >/dev/null
python3 -m cpu_kernels

python3 -m runtime.synthetic /tmp/air.gguf --shape glm45-air --layers "$LAYERS" --mix q4k_q5_0
python3 -m runtime.cli plan /tmp/air.gguf --gpu cuda:0 | tee "$OUT/plan.txt"

# Plain vs fixed draft lengths (without and with draft-ahead) vs adaptive, oracle acceptance
# 0..0.9, in one process.
python3 -m runtime.cli bench model /tmp/air.gguf --gpu cuda:0 --oracle 0,0.3,0.6,0.9 --draft 1,2 --ahead \
  --max-tokens 32 --repeats 2 --prompts 2 | tee "$OUT/bench_air.txt"
# The same with the CPU experts overlapped against the GPU side switched off, for the overlap share.
python3 -m runtime.cli bench model /tmp/air.gguf --gpu cuda:0 --oracle 0.6 --draft 1 \
  --max-tokens 32 --repeats 2 --prompts 2 --no-overlap | tee "$OUT/bench_air_no_overlap.txt"
# One traced run: busy/overlap figures and weight_bytes_moved (must be 0).
python3 -m runtime.cli run /tmp/air.gguf --gpu cuda:0 --max-tokens 32 --draft-max 2 \
  --trace "$OUT/trace_air.json" --prompt "def main():" | tee "$OUT/run_air.txt"
# The bundled demo model on the GPU.
python3 -m runtime.cli bench model --gpu cuda:0 --max-tokens 64 --repeats 2 | tee "$OUT/bench_demo.txt"
echo "gpu check done"
