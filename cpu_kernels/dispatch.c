/* Run-time path selection, OpenMP thread control, a read-bandwidth probe and build info. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "moe_kernels.h"
#include "dispatch.h"

#ifndef NX_BUILD_FLAGS
#define NX_BUILD_FLAGS "unknown"
#endif

/* bit 0: ref, bit 1: avx2, bit 2: avx512 (with vnni) */
int nx_cpu_paths(void) {
    int m = 1;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) m |= 2;
    if ((m & 2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni"))
        m |= 4;
#endif
    return m;
}

int nx_moe_forward(int path, const float *x, int64_t T, const int32_t *ids, const float *wts, int64_t K,
                   const nx_tensor *gate, const nx_tensor *up, const nx_tensor *down, float *out,
                   int nthreads) {
    if (!((nx_cpu_paths() >> path) & 1)) return -2;
    switch (path) {
    case 0: return nx_moe_forward_ref(x, T, ids, wts, K, gate, up, down, out, nthreads);
    case 1: return nx_moe_forward_avx2(x, T, ids, wts, K, gate, up, down, out, nthreads);
    case 2: return nx_moe_forward_avx512(x, T, ids, wts, K, gate, up, down, out, nthreads);
    }
    return -2;
}

int nx_linear(int path, const float *x, int64_t T, const nx_tensor *w, float *out, int64_t ld, int nthreads) {
    if (!((nx_cpu_paths() >> path) & 1)) return -2;
    switch (path) {
    case 0: return nx_linear_ref(x, T, w, out, ld, nthreads);
    case 1: return nx_linear_avx2(x, T, w, out, ld, nthreads);
    case 2: return nx_linear_avx512(x, T, w, out, ld, nthreads);
    }
    return -2;
}

int nx_dequant_rows(int path, const nx_tensor *w, const int64_t *rows, int64_t n, float *out, int nthreads) {
    if (!((nx_cpu_paths() >> path) & 1)) return -2;
    switch (path) {
    case 0: return nx_dequant_rows_ref(w, rows, n, out, nthreads);
    case 1: return nx_dequant_rows_avx2(w, rows, n, out, nthreads);
    case 2: return nx_dequant_rows_avx512(w, rows, n, out, nthreads);
    }
    return -2;
}

int nx_blocks_forward(int path, const nx_dims *d, const nx_block *blocks, int32_t n_blocks, float **kc, float **vc,
                      int64_t pool_len, float *x, int64_t T, const int64_t *pos, const int64_t *lslot,
                      const int32_t *const *maps, const float *final_norm, double *stats, int nthreads) {
    if (!((nx_cpu_paths() >> path) & 1)) return -2;
    switch (path) {
    case 0: return nx_blocks_forward_ref(d, blocks, n_blocks, kc, vc, pool_len, x, T, pos, lslot, maps, final_norm, stats, nthreads);
    case 1: return nx_blocks_forward_avx2(d, blocks, n_blocks, kc, vc, pool_len, x, T, pos, lslot, maps, final_norm, stats, nthreads);
    case 2: return nx_blocks_forward_avx512(d, blocks, n_blocks, kc, vc, pool_len, x, T, pos, lslot, maps, final_norm, stats, nthreads);
    }
    return -2;
}

int64_t nx_min_work_per_thread = 1 << 20;
int64_t nx_set_min_work(int64_t bytes) { int64_t old = nx_min_work_per_thread; nx_min_work_per_thread = bytes; return old; }

int nx_omp_max_threads(void) { return omp_get_max_threads(); }
int nx_omp_num_procs(void) { return omp_get_num_procs(); }
const char *nx_build_flags(void) { return NX_BUILD_FLAGS; }

/* STREAM-like read: sum of n int64 words with `nthreads` OpenMP threads (the expert threads).
 * Returns the sum so the compiler cannot drop the loads. */
int64_t nx_read_bw(const int64_t *p, int64_t n, int nthreads) {
    int64_t s = 0;
#pragma omp parallel for num_threads(nthreads) reduction(+ : s) schedule(static)
    for (int64_t i = 0; i < n; i++) s += p[i];
    return s;
}

/* A row in ggml blocks -> a repacked layout (`type` is the layout's kernel id, moe_kernels.h);
 * rows are independent, so threads split them. Returns 0, or -2 for a type without a layout. */
int nx_repack(int type, const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t nb, int nthreads) {
    const size_t rb = nx_repacked_bs(type) * (size_t)nb;
    if (!rb) return -2;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n_rows; r++) nx_repack_row(type, src + rb * (size_t)r, nb, dst + rb * (size_t)r);
    return 0;
}

/* block i of a repacked row back in ggml form (for tests) */
void nx_repacked_block(int type, const uint8_t *row, int64_t nb, int64_t i, uint8_t *out) {
    const uint8_t *blk = row + nx_repacked_bs(type) * (size_t)i;
    switch (type) {
    case NX_Q5_0_R8: nx_r8_block(row, nb, i, out); break;
    case NX_Q4_K_R8: case NX_Q5_K_R8: case NX_IQ4_XS_R8: nx_k4r_block(type, blk, out); break;
    case NX_Q2_K_R8: case NX_Q3_K_R8: nx_k16r_block(type, blk, out); break;
    case NX_Q6_K_R8: nx_q6kr_block(blk, out); break;
    default: nx_b32r_block(type, row, nb, i, out); break;
    }
}
