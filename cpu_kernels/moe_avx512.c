/* AVX-512 (F/BW/VL/DQ) + VNNI path (x86-64 only); chosen at run time when the CPU reports them. */
#include "moe_kernels.h"
#include "block.h"
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")
#define NX_PATH 2
#define NX_SFX avx512
#include "moe_impl.h"
#else
int nx_moe_forward_avx512(const float *x, int64_t T, const int32_t *ids, const float *wts, int64_t K,
                          const nx_tensor *gate, const nx_tensor *up, const nx_tensor *down, float *out,
                          int nthreads) {
    (void)x; (void)T; (void)ids; (void)wts; (void)K; (void)gate; (void)up; (void)down; (void)out; (void)nthreads;
    return -2;
}
int nx_linear_avx512(const float *x, int64_t T, const nx_tensor *w, float *out, int64_t ld, int nthreads) {
    (void)x; (void)T; (void)w; (void)out; (void)ld; (void)nthreads;
    return -2;
}
int nx_dequant_rows_avx512(const nx_tensor *w, const int64_t *rows, int64_t n, float *out, int nthreads) {
    (void)w; (void)rows; (void)n; (void)out; (void)nthreads;
    return -2;
}
int nx_blocks_forward_avx512(const nx_dims *d, const nx_block *blocks, int32_t n_blocks, void **kc, void **vc,
                          int64_t pool_len, int32_t kv_type, float *x, int64_t T, const int64_t *pos,
                          const int64_t *lslot, const int32_t *const *maps, const float *final_norm, double *stats,
                          int nthreads) {
    (void)d; (void)blocks; (void)n_blocks; (void)kc; (void)vc; (void)pool_len; (void)kv_type; (void)x; (void)T;
    (void)pos; (void)lslot; (void)maps; (void)final_norm; (void)stats; (void)nthreads;
    return -2;
}
int nx_to_f16_avx512(const float *x, uint16_t *out, int64_t n) {
    (void)x; (void)out; (void)n;
    return -2;
}
double nx_peak_rate_avx512(int kind, int64_t n, int nthreads) {
    (void)kind; (void)n; (void)nthreads;
    return -1.0;
}
#endif
