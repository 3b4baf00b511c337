/* Declarations exported to Python through cffi: build.py reads them from here for its cdef. */
#ifndef NX_DISPATCH_H
#define NX_DISPATCH_H
#include "moe_kernels.h"
#include "block.h"
int nx_cpu_paths(void);
int nx_moe_forward(int path, const float *x, int64_t T, const int32_t *ids, const float *wts, int64_t K,
                   const nx_tensor *gate, const nx_tensor *up, const nx_tensor *down, float *out,
                   int nthreads);
int nx_linear(int path, const float *x, int64_t T, const nx_tensor *w, float *out, int64_t ld, int nthreads);
int nx_linear_heads(int path, const float *x, int64_t T, const nx_tensor *w, float *out, int nthreads);
int nx_dequant_rows(int path, const nx_tensor *w, const int64_t *rows, int64_t n, float *out, int nthreads);
int nx_blocks_forward(int path, const nx_dims *d, const nx_block *blocks, int32_t n_blocks, void **kc, void **vc,
                      int64_t pool_len, int32_t kv_type, float *x, int64_t T, const int64_t *pos, const int64_t *lslot,
                      const int32_t *const *maps, const float *final_norm, double *stats, int nthreads);
int nx_to_f16(int path, const float *x, uint16_t *out, int64_t n);
double nx_peak_rate(int path, int kind, int64_t n, int nthreads);
int nx_omp_max_threads(void);
int64_t nx_set_min_work(int64_t bytes);
int nx_omp_num_procs(void);
const char *nx_build_flags(void);
int64_t nx_read_bw(const int64_t *p, int64_t n, int nthreads);
int nx_repack(int type, const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t nb, int nthreads);
int nx_repacked_block(int type, const uint8_t *row, int64_t nb, int64_t i, uint8_t *out);
int64_t nx_type_row_bytes(int type, int64_t cols);
#endif
