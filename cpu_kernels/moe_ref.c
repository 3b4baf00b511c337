/* Portable C reference path: always built, used on any CPU (and on non-x86 builds). */
#include "moe_kernels.h"
#define NX_PATH 0
#define NX_SFX ref
#include "moe_impl.h"
