#!/usr/bin/env bash
# The C kernels under AddressSanitizer + UndefinedBehaviorSanitizer: build them that way in a
# temporary copy of the tree (the working tree's own build is left alone) and run the kernel tests
# with each SIMD path this CPU has forced in turn (NEXTN_KERNEL_PATH). Any out-of-bounds access,
# use after free or undefined behaviour aborts the run.
#   .ci/sanitize.sh            # tests/test_kernel_args.py, test_fused.py, test_kv_cache.py and test_flash.py per path, test_cpu_kernels.py once
#   SANITIZE_FULL=1 .ci/sanitize.sh   # tests/test_cpu_kernels.py per path too (its own `path`
#                                     # fixture already runs every path: ~3x longer, same coverage
#                                     # of the SIMD code)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TMP=$(mktemp -d "${TMPDIR:-/tmp}/nextn-sanitize.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
t0=$(date +%s)
# the tree without builds or VCS data
tar -C "$ROOT" --exclude=.git --exclude='*.so' --exclude='*.o' --exclude='cpu_kernels/_moe*.c' \
    --exclude=build --exclude='__pycache__' --exclude=shared -cf - . | tar -C "$TMP" -xf -
cd "$TMP"
NEXTN_SANITIZE=address,undefined python cpu_kernels/build.py > build.log 2>&1 || { tail -40 build.log; exit 1; }
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
python - <<'PY'
import cpu_kernels
flags = cpu_kernels.build_info()["build_flags"]
assert "-fsanitize=address,undefined" in flags, flags
import os
assert cpu_kernels.__file__.startswith(os.getcwd()), cpu_kernels.__file__  # the copy, not an installed tree
print("sanitizer build:", flags)
PY
paths=$(python -c "import cpu_kernels; print(' '.join(cpu_kernels.available_paths()))")
for p in $paths; do
    echo "== path $p"
    tests="tests/test_kernel_args.py tests/test_fused.py tests/test_kv_cache.py tests/test_flash.py"  # the fused block call takes the forced path too
    [ -n "${SANITIZE_FULL:-}" ] && tests="$tests tests/test_cpu_kernels.py"
    NEXTN_KERNEL_PATH=$p python -m pytest -q -x -p no:cacheprovider $tests
done
if [ -z "${SANITIZE_FULL:-}" ]; then
    echo "== tests/test_cpu_kernels.py (every path through its fixture)"
    python -m pytest -q -x -p no:cacheprovider tests/test_cpu_kernels.py
fi
echo "sanitizer stage: $(( $(date +%s) - t0 )) s"
