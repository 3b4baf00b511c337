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

/* ---- argument checks: the Python wrapper checks everything first; these catch a caller that
 * bypasses it (or a wrapper bug) before any byte is read or written. O(1) per call (the expert-id
 * and row-index scans are in the kernels / below). NX_EINVAL: Python raises ValueError. */
#define NX_EINVAL (-4)
#define NX_MAX_THREADS 4096

/* (elements, bytes) per block of a kernel type id (ggml types and their repacked layouts) */
static int nx_type_block(int type, int64_t *elems, int64_t *bytes) {
    int base = type >= 100 ? type - 100 : type;
    int64_t e, b;
    switch (base) {
    case NX_F32: e = 1; b = 4; break;
    case NX_F16: case NX_BF16: e = 1; b = 2; break;
    case NX_Q4_0: case NX_IQ4_NL: e = 32; b = 18; break;
    case NX_Q4_1: e = 32; b = 20; break;
    case NX_Q5_0: e = 32; b = 22; break;
    case NX_Q5_1: e = 32; b = 24; break;
    case NX_Q8_0: e = 32; b = 34; break;
    case NX_Q2_K: e = 256; b = 84; break;
    case NX_Q3_K: e = 256; b = 110; break;
    case NX_Q4_K: e = 256; b = 144; break;
    case NX_Q5_K: e = 256; b = 176; break;
    case NX_Q6_K: e = 256; b = 210; break;
    case NX_IQ4_XS: e = 256; b = 136; break;
    default: return -1;
    }
    if (type >= 100 && nx_repacked_bs(type) != (size_t)b) return -1;  /* no such layout */
    *elems = e; *bytes = b;
    return 0;
}

/* bytes of one row of `cols` elements of `type`, or -1 for an unknown type or a partial block */
int64_t nx_type_row_bytes(int type, int64_t cols) {
    int64_t e, b;
    if (nx_type_block(type, &e, &b) || cols < 1 || cols % e) return -1;
    return cols / e * b;
}

static int nx_check_tensor(const nx_tensor *t) {
    if (!t || !t->data || t->n_expert < 1 || t->rows < 1 || t->cols < 1) return NX_EINVAL;
    if (t->n_expert > (INT64_C(1) << 40) / t->rows) return NX_EINVAL;
    if (nx_type_row_bytes(t->type, t->cols) != t->row_bytes) return NX_EINVAL;
    return 0;
}

static int nx_check_threads(int nthreads) { return nthreads < 1 || nthreads > NX_MAX_THREADS ? NX_EINVAL : 0; }

int nx_moe_forward(int path, const float *x, int64_t T, const int32_t *ids, const float *wts, int64_t K,
                   const nx_tensor *gate, const nx_tensor *up, const nx_tensor *down, float *out,
                   int nthreads) {
    if (path < 0 || path > 2 || !((nx_cpu_paths() >> path) & 1)) return -2;
    if (T < 0 || K < 1 || K > (INT64_C(1) << 20) || nx_check_threads(nthreads)) return NX_EINVAL;
    if (nx_check_tensor(gate) || nx_check_tensor(up) || nx_check_tensor(down)) return NX_EINVAL;
    if (up->n_expert != gate->n_expert || up->rows != gate->rows || up->cols != gate->cols ||
        down->n_expert != gate->n_expert || down->rows != gate->cols || down->cols != gate->rows)
        return NX_EINVAL;
    if (T > 0 && (!x || !ids || !wts || !out)) return NX_EINVAL;
    switch (path) {
    case 0: return nx_moe_forward_ref(x, T, ids, wts, K, gate, up, down, out, nthreads);
    case 1: return nx_moe_forward_avx2(x, T, ids, wts, K, gate, up, down, out, nthreads);
    case 2: return nx_moe_forward_avx512(x, T, ids, wts, K, gate, up, down, out, nthreads);
    }
    return -2;
}

int nx_linear(int path, const float *x, int64_t T, const nx_tensor *w, float *out, int64_t ld, int nthreads) {
    if (path < 0 || path > 2 || !((nx_cpu_paths() >> path) & 1)) return -2;
    if (T < 0 || nx_check_threads(nthreads) || nx_check_tensor(w) || w->n_expert != 1 || ld < w->rows) return NX_EINVAL;
    if (T > 0 && (!x || !out)) return NX_EINVAL;
    switch (path) {
    case 0: return nx_linear_ref(x, T, w, out, ld, nthreads);
    case 1: return nx_linear_avx2(x, T, w, out, ld, nthreads);
    case 2: return nx_linear_avx512(x, T, w, out, ld, nthreads);
    }
    return -2;
}

/* x [T, E, K] -> out [T, E, N], head e through matrix e of w (E matrices [N, K]) */
int nx_linear_heads(int path, const float *x, int64_t T, const nx_tensor *w, float *out, int nthreads) {
    if (path < 0 || path > 2 || !((nx_cpu_paths() >> path) & 1)) return -2;
    if (T < 0 || nx_check_threads(nthreads) || nx_check_tensor(w)) return NX_EINVAL;
    if (T > 0 && (!x || !out)) return NX_EINVAL;
    switch (path) {
    case 0: return nx_linear_heads_ref(x, T, w, out, nthreads);
    case 1: return nx_linear_heads_avx2(x, T, w, out, nthreads);
    case 2: return nx_linear_heads_avx512(x, T, w, out, nthreads);
    }
    return -2;
}

int nx_dequant_rows(int path, const nx_tensor *w, const int64_t *rows, int64_t n, float *out, int nthreads) {
    if (path < 0 || path > 2 || !((nx_cpu_paths() >> path) & 1)) return -2;
    if (n < 0 || nx_check_threads(nthreads) || nx_check_tensor(w)) return NX_EINVAL;
    if (n > 0 && !out) return NX_EINVAL;
    if (rows) {  /* an index past the rows: nothing written (-3, as an expert id out of range) */
        const int64_t total = w->n_expert * w->rows;
        for (int64_t i = 0; i < n; i++)
            if (rows[i] < 0 || rows[i] >= total) return -3;
    } else if (n != w->n_expert * w->rows) {
        return NX_EINVAL;
    }
    switch (path) {
    case 0: return nx_dequant_rows_ref(w, rows, n, out, nthreads);
    case 1: return nx_dequant_rows_avx2(w, rows, n, out, nthreads);
    case 2: return nx_dequant_rows_avx512(w, rows, n, out, nthreads);
    }
    return -2;
}

int nx_blocks_forward(int path, const nx_dims *d, const nx_block *blocks, int32_t n_blocks, void **kc, void **vc,
                      int64_t pool_len, int32_t kv_type, float *x, int64_t T, const int64_t *pos, const int64_t *lslot,
                      const int32_t *const *maps, const float *final_norm, double *stats, int nthreads) {
    if (path < 0 || path > 2 || !((nx_cpu_paths() >> path) & 1)) return -2;
    switch (path) {
    case 0: return nx_blocks_forward_ref(d, blocks, n_blocks, kc, vc, pool_len, kv_type, x, T, pos, lslot, maps, final_norm, stats, nthreads);
    case 1: return nx_blocks_forward_avx2(d, blocks, n_blocks, kc, vc, pool_len, kv_type, x, T, pos, lslot, maps, final_norm, stats, nthreads);
    case 2: return nx_blocks_forward_avx512(d, blocks, n_blocks, kc, vc, pool_len, kv_type, x, T, pos, lslot, maps, final_norm, stats, nthreads);
    }
    return -2;
}

double nx_peak_rate(int path, int kind, int64_t n, int nthreads) {
    if (path < 0 || path > 2 || !((nx_cpu_paths() >> path) & 1) || nx_check_threads(nthreads)) return -1.0;
    switch (path) {
    case 1: return nx_peak_rate_avx2(kind, n, nthreads);
    case 2: return nx_peak_rate_avx512(kind, n, nthreads);
    }
    return 0.0;   /* the reference path: no SIMD rate */
}

int nx_to_f16(int path, const float *x, uint16_t *out, int64_t n) {
    if (path < 0 || path > 2 || !((nx_cpu_paths() >> path) & 1)) return -2;
    switch (path) {
    case 0: return nx_to_f16_ref(x, out, n);
    case 1: return nx_to_f16_avx2(x, out, n);
    case 2: return nx_to_f16_avx512(x, out, n);
    }
    return -2;
}

/* Calls with less work than this per thread (bytes read plus a share of the multiplies) use fewer
 * threads.  16 KiB: libgomp's team spins between regions, so a region costs a few microseconds.
 * On the demo model (matrices of 32-200 KB) the former 1 MiB ran every call on one thread; at
 * 16 KiB the fused call of a 4- or 8-sequence decode step is 16-21% faster and 1 row is unchanged
 * within noise (benchmarks/min_work_ab.py; BENCHMARKS.md, "Small calls on every thread"). */
int64_t nx_min_work_per_thread = 16 << 10;
/* a negative size changes nothing and returns NX_EINVAL (the old value is never negative) */
int64_t nx_set_min_work(int64_t bytes) {
    if (bytes < 0) return NX_EINVAL;
    int64_t old = nx_min_work_per_thread;
    nx_min_work_per_thread = bytes;
    return old;
}

int nx_omp_max_threads(void) { return omp_get_max_threads(); }
int nx_omp_num_procs(void) { return omp_get_num_procs(); }
const char *nx_build_flags(void) { return NX_BUILD_FLAGS; }

/* STREAM-like read: sum of n int64 words with `nthreads` OpenMP threads (the expert threads).
 * Returns the sum so the compiler cannot drop the loads (unsigned arithmetic: any words may be
 * summed without overflow UB), or NX_EINVAL for a bad count, pointer or thread count. */
int64_t nx_read_bw(const int64_t *p, int64_t n, int nthreads) {
    if (n < 0 || (n > 0 && !p) || nx_check_threads(nthreads)) return NX_EINVAL;
    uint64_t s = 0;
#pragma omp parallel for num_threads(nthreads) reduction(+ : s) schedule(static)
    for (int64_t i = 0; i < n; i++) s += (uint64_t)p[i];
    return (int64_t)s;
}

/* A row in ggml blocks -> a repacked layout (`type` is the layout's kernel id, moe_kernels.h);
 * rows are independent, so threads split them. Returns 0, or -2 for a type without a layout. */
int nx_repack(int type, const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t nb, int nthreads) {
    if (n_rows < 0 || nb < 0 || nx_check_threads(nthreads) || (n_rows > 0 && nb > 0 && (!src || !dst)))
        return NX_EINVAL;
    const size_t rb = nx_repacked_bs(type) * (size_t)nb;
    if (!nx_repacked_bs(type)) return -2;
    if (!rb) return 0;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n_rows; r++) nx_repack_row(type, src + rb * (size_t)r, nb, dst + rb * (size_t)r);
    return 0;
}

/* block i of a repacked row of nb blocks back in ggml form (for tests); 0, -2 for a type without
 * a layout, NX_EINVAL for a block index outside the row or a NULL buffer */
int nx_repacked_block(int type, const uint8_t *row, int64_t nb, int64_t i, uint8_t *out) {
    if (!nx_repacked_bs(type)) return -2;
    if (!row || !out || nb < 1 || i < 0 || i >= nb) return NX_EINVAL;
    const uint8_t *blk = row + nx_repacked_bs(type) * (size_t)i;
    switch (type) {
    case NX_Q5_0_R8: nx_r8_block(row, nb, i, out); break;
    case NX_Q4_K_R8: case NX_Q5_K_R8: case NX_IQ4_XS_R8: nx_k4r_block(type, blk, out); break;
    case NX_Q2_K_R8: case NX_Q3_K_R8: nx_k16r_block(type, blk, out); break;
    case NX_Q6_K_R8: nx_q6kr_block(blk, out); break;
    default: nx_b32r_block(type, row, nb, i, out); break;
    }
    return 0;
}
