#!/usr/bin/env bash
# The prepared GPU check (issue 7): on a machine with CUDA, install what it needs from wheels carried
# with it, build the CPU kernels, write a synthetic GLM-4.5-Air-shaped file of a few layers, and run
# the benchmark with the GPU plan (MTP layer, attention, shared experts on the GPU; routed experts on
# the CPU kernels). Budget: under 8 minutes on a 16-core H100/H200 machine.
#
# Prepare the wheels here once (the device has torch, numpy, pyyaml, jinja2, tokenizers, tqdm, pytest):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl gguf==0.19.0 cffi==2.0.0 pycparser
# then run it with the device tool: command `bash benchmarks/gpu_check.sh`, carry [".whl"] (and
# "cpu_kernels/_moe.abi3.so", a build made here, used only if the in-place build fails there).
#
# Stages run one after another; a failing stage is reported and the next one still runs, so one
# call gives everything it can. Environment: GPU (default cuda:0), LAYERS (4), VOCAB, TOKENS (32),
# TESTS (test paths), STAGES (a subset of "kernels bench trace demo profile tests kbench", in the
# order they run; "steps", "graphs" and "flash" are not in the default list), OUT (where logs go). On an H200: every stage, 372 s;
# "bench trace demo profile tests" with a test subset, 389 s, and "bench trace demo tests", 354 s;
# results in BENCHMARKS.md, "GPU check". A fresh machine takes ~35 s to start.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nextn-gpu-check}
GPU=${GPU:-cuda:0}
LAYERS=${LAYERS:-4}
VOCAB=${VOCAB:-}
TOKENS=${TOKENS:-32}
STAGES=${STAGES:-"kernels bench trace demo profile tests kbench"}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
T0=$SECONDS
stage() {  # stage NAME LIMIT_S CMD... : run one stage under a time limit, say how it ended
  local name=$1 limit=$2; shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  echo "=== stage $name (limit ${limit}s, at $((SECONDS - T0))s)"
  timeout "$limit" "$@"
  local rc=$?
  echo "=== stage $name: rc=$rc after $((SECONDS - T0))s"
  return $rc
}

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
lscpu | grep -E "Model name|^CPU\(s\)|Thread|L3" || true
grep -o -w -E "avx2|avx512f|avx512bw|avx512vl|avx512_vnni|avx512_bf16|avx_vnni" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# Build the cffi extension in place (no pip install: nothing can be fetched there). A
# version-specific build wins over a carried abi3 one at import.
python3 cpu_kernels/build.py >"$OUT/build.log" 2>&1 || { echo "in-place build failed (tail below); using a carried build if any"; tail -5 "$OUT/build.log"; }
python3 -m cpu_kernels || { echo "cpu_kernels does not import: stopping"; exit 1; }
# pytest-xdist and pytest-timeout are in the device image; used when present.
PX=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
PT=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120")

# Every kernel path this CPU has (AVX-512 too), against gguf's dequantize + float64.
# If a path fails here, the later stages use the AVX2 one, so that they still say something.
stage kernels 90 python3 -m pytest -q -p no:cacheprovider -x tests/test_cpu_kernels.py ${PX/8/4} \
  || { [[ " $STAGES " != *" kernels "* ]] || { echo "kernel tests failed: forcing avx2"; export NEXTN_KERNEL_PATH=avx2; }; }

if [[ " $STAGES " == *" bench "* || " $STAGES " == *" trace "* || " $STAGES " == *" profile "* || " $STAGES " == *" steps "* || " $STAGES " == *" graphs "* ]]; then
  python3 -m runtime.synthetic /tmp/air.gguf --shape glm45-air --layers "$LAYERS" --mix q4k_q5_0 ${VOCAB:+--vocab $VOCAB}
  python3 -m runtime.cli plan /tmp/air.gguf --gpu "$GPU" | tee "$OUT/plan.txt"
fi
# Plain vs fixed draft lengths (without and with draft-ahead) vs adaptive, oracle acceptance
# 0..0.9, in one process; then the same with the CPU/GPU overlap switched off, for the overlap share.
stage bench 180 python3 -m runtime.cli bench model /tmp/air.gguf --gpu "$GPU" --oracle 0,0.3,0.6,0.9 \
  --draft 1,2 --ahead --max-tokens "$TOKENS" --repeats 2 --prompts 2
# One traced run: busy/overlap figures and weight_bytes_moved (must be 0).
stage trace 90 python3 -m runtime.cli run /tmp/air.gguf --gpu "$GPU" --max-tokens "$TOKENS" --draft-max 2 \
  --trace "$OUT/trace_air.json" --prompt "def main():"
stage bench 90 python3 -m runtime.cli bench model /tmp/air.gguf --gpu "$GPU" --oracle 0.6 --draft 1 \
  --max-tokens "$TOKENS" --repeats 2 --prompts 2 --no-overlap
# GLM-4.7-Flash (deepseek2, latent attention): the fixture's references on CUDA (float32 gpu
# side), then a synthetic 4-block Flash with its routed experts on the CPU: plain and MTP speed.
# Not in the default list: STAGES=flash (never run on a GPU yet).
stage flash 60 python3 -m pytest -q -p no:cacheprovider tests/test_flash.py
if [[ " $STAGES " == *" flash "* ]]; then
  python3 -m runtime.synthetic /tmp/flash.gguf --shape glm47-flash --layers 4 --mix q4k_q5_0 --vocab 16384
fi
stage flash 120 python3 -m runtime.cli bench model /tmp/flash.gguf --gpu "$GPU" --oracle 0,0.9 --draft 1 \
  --max-tokens "$TOKENS" --repeats 2 --prompts 2
# The bundled demo model on the GPU (its real acceptance).
stage demo 45 python3 -m runtime.cli bench model --gpu "$GPU" --max-tokens 64 --repeats 2
# Verify batches and drafts as ratios to a plain step (medians from one cache state): the
# synthetic Air, then the demo model.
stage steps 60 bash -c "python3 benchmarks/step_costs.py . /tmp/air.gguf --reps 20 && python3 benchmarks/step_costs.py . --reps 100"
# Whether one layer's GPU segment captures in a CUDA graph, and its host time eager vs replayed:
# the probe's own capture, then runtime/graphs.py's Segment (what NEXTN_CUDA_GRAPHS=1 replays),
# 1 and 4 rows, with its capture check (syncs, allocations) on the device. Then plain and MTP
# tokens/s with graphs off and on, interleaved off/on: the synthetic Air (hybrid plan, oracle
# acceptance 0.9, fixed drafts 1-2 and adaptive) and the demo model (its real acceptance), and the
# graph tests on CUDA. Not in the default list: run it as STAGES=graphs (~6 min on an H200 with the
# setup; each part under its own limit, 420 s in all).
stage graphs 60 python3 benchmarks/cuda_graph_probe.py /tmp/air.gguf --gpu "$GPU"
for g in 0 1; do
  NEXTN_CUDA_GRAPHS=$g stage graphs 90 python3 -m runtime.cli bench model /tmp/air.gguf --gpu "$GPU" \
    --oracle 0.9 --draft 1,2 --max-tokens "$TOKENS" --repeats 2 --prompts 2 | sed "s/^/[graphs=$g air] /"
done
for g in 0 1; do
  NEXTN_CUDA_GRAPHS=$g stage graphs 45 python3 -m runtime.cli bench model --gpu "$GPU" --max-tokens 64 \
    --repeats 2 | sed "s/^/[graphs=$g demo] /"
done
NEXTN_CUDA_GRAPHS=1 stage graphs 60 python3 -m runtime.cli run /tmp/air.gguf --gpu "$GPU" --max-tokens "$TOKENS" \
  --draft-max 2 --trace "$OUT/trace_air_graphs.json" --prompt "def main():"
stage graphs 30 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py
# torch.profiler over plain and 2-row verify steps (where a step's time goes).
stage profile 75 python3 benchmarks/gpu_profile.py /tmp/air.gguf --gpu "$GPU"
# The whole test suite with CUDA present (engines default to gpu: auto there).
stage tests 100 python3 -m pytest -q -p no:cacheprovider $PX $PT ${TESTS:-tests}
# The kernel benchmark on this machine's cores, Air shape, decode and verification sizes.
stage kbench 45 python3 benchmarks/bench_kernels.py --shapes air --mixes q4k_q5_0 --tokens 1,2,4,8,512 --same 4 \
  --interleave --repeats 5
echo "gpu check done after $((SECONDS - T0))s"
