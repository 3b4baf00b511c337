"""cffi (API mode) build script for the CPU expert kernels: module ``cpu_kernels._moe``.

Built by ``pip install -e .`` through setup.py's ``cffi_modules``; by hand:
``python cpu_kernels/build.py`` (writes the extension next to this file).

One build runs on any x86-64: no -march=native. The AVX2 and AVX-512 paths are compiled from the
same template under ``#pragma GCC target`` in their own source files and picked at run time
(``__builtin_cpu_supports``); the portable C path is always present.
"""
import os
import platform
import re
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

# cffi's cdef: the tensor struct (defined in moe_kernels.h among block structs and static asserts
# that cffi cannot parse; keep the two the same), the block structs (read from block.h) and the
# exported functions (read from dispatch.h), so those are declared once.
_STRUCT = """
typedef struct {
    const uint8_t *data;
    int32_t type;
    int64_t n_expert, rows, cols, row_bytes;
} nx_tensor;
"""


def _block_structs() -> str:
    """block.h's typedefs, comments dropped and NX_MAX_PARTS spelled out (cffi takes no macros)."""
    with open(os.path.join(HERE, "block.h")) as f:
        text = f.read()
    parts = re.search(r"#define NX_MAX_PARTS (\d+)", text).group(1)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    body = text[text.index("typedef struct"):text.index("#define NX_DECL_BLOCKS")]
    return body.replace("NX_MAX_PARTS", parts)


def _exported_declarations() -> str:
    with open(os.path.join(HERE, "dispatch.h")) as f:
        return "".join(line for line in f if line.strip() and not line.lstrip().startswith(("#", "/*", "*")))


CDEF = _STRUCT + _block_structs() + _exported_declarations()

SOURCES = ["dispatch.c", "moe_ref.c", "moe_avx2.c", "moe_avx512.c"]
COMPILE_ARGS = ["-O3", "-fopenmp", "-std=gnu11", "-fno-strict-aliasing"]
LINK_ARGS = ["-fopenmp"]
if platform.machine().lower() in ("x86_64", "amd64"):
    COMPILE_ARGS.append("-mtune=generic")

# NEXTN_SANITIZE=address,undefined (any of gcc's -fsanitize= names): a checking build for CI
# (.ci/sanitize.sh). Python must then run with the ASan runtime preloaded:
#   LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 python ...
# -O1 keeps reports readable and the run short; UB aborts (no recovery) so a test run fails on it.
SANITIZE = os.environ.get("NEXTN_SANITIZE", "").strip()
if SANITIZE:
    if not all(part.replace("-", "").isalnum() for part in SANITIZE.split(",")):
        sys.exit(f"NEXTN_SANITIZE={SANITIZE!r}: expected comma-separated sanitizer names, e.g. address,undefined")
    COMPILE_ARGS = [a for a in COMPILE_ARGS if not a.startswith("-O")] + [
        "-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={SANITIZE}", "-fno-sanitize-recover=all"]
    LINK_ARGS = LINK_ARGS + [f"-fsanitize={SANITIZE}"]

_flags = " ".join(COMPILE_ARGS) + " | link: " + " ".join(LINK_ARGS)

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "cpu_kernels._moe",
    '#include "dispatch.h"\n',
    # relative paths: setuptools requires them (the build runs from the repo root)
    sources=[os.path.relpath(os.path.join(HERE, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    # the kernels live in headers (moe_impl.h is compiled once per path): list them so that an
    # edit to a header rebuilds the extension (setuptools only compares the .c files otherwise)
    depends=[os.path.relpath(os.path.join(HERE, h)) for h in ("moe_impl.h", "linear_impl.h", "moe_kernels.h", "dispatch.h", "block.h", "block_impl.h")],
    extra_compile_args=COMPILE_ARGS,
    extra_link_args=LINK_ARGS,
    define_macros=[("NX_BUILD_FLAGS", '"%s"' % _flags)],
)

if __name__ == "__main__":
    os.chdir(os.path.dirname(HERE))
    ffibuilder.compile(verbose=True)
