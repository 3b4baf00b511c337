/* Per-core speed of the fused row-dot kernels (the inner loop of cpu_kernels' MoE call), one
 * thread, no OpenMP, no Python: GB/s of weight bytes dotted against 1, 2 or 4 tokens.
 *
 *   gcc -O3 -std=gnu11 -fopenmp -fno-strict-aliasing -Icpu_kernels benchmarks/dot_rate.c -o /tmp/dot_rate -lm
 *   /tmp/dot_rate            # AVX2 path; both "hot" (rows in L2) and "dram" (a 256 MB row set)
 *
 * "hot" is the compute ceiling of the kernel (the best of many passes over ~200 KB of rows);
 * "dram" streams rows that miss every cache (best of a few passes), as a decode call does.
 * Weights are random bytes with small fp16 scales (timing does not depend on values).
 * It compares builds and types on one core; the MoE call's figures against the memory bound are
 * benchmarks/bench_kernels.py's. */
#include "moe_kernels.h"
int64_t nx_min_work_per_thread = 0;
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,bmi2")
#define NX_PATH 1
#define NX_SFX avx2
#include "moe_impl.h"
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static double rate(int type, size_t bs, size_t be, int64_t n, int nt, size_t total, int reps) {
    const size_t rowb = (size_t)(n / be) * bs, nrows = total / rowb ? total / rowb : 1;
    uint8_t *w = aligned_alloc(64, nrows * rowb + 64);
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < nrows * rowb; i++) { h = (h ^ (uint32_t)i) * 16777619u; w[i] = (uint8_t)(h >> 13); }
    for (size_t b = 0; b < nrows * rowb / bs; b++) {     /* fp16 scales 2^-7: finite, small */
        const int base = type >= 100 ? type - 100 : type;    /* a repacked type's scales stay put */
        uint8_t *p = w + b * bs + (base == NX_Q6_K ? 208 : base == NX_Q2_K ? 80 : base == NX_Q3_K ? 108 : 0);
        p[0] = 0; p[1] = 0x20;
        if (base == NX_Q4_K || base == NX_Q5_K || base == NX_Q2_K) { p[2] = 0; p[3] = 0x20; }
    }
    if (type >= 100) {                                      /* the same rows, repacked */
        uint8_t *row = malloc(rowb);
        for (size_t i = 0; i < nrows; i++) {
            memcpy(row, w + i * rowb, rowb);
            nx_repack_row(type, row, n / (type == NX_Q5_0_R8 || type == NX_Q4_0_R8 || type == NX_Q8_0_R8 || type == NX_IQ4_NL_R8 ? 32 : 256), w + i * rowb);
        }
        free(row);
    }
    const size_t ab = be == 256 ? (size_t)(n / 256) * sizeof(ak256) : (size_t)n + 8 * (size_t)(n / 32);
    uint8_t *acts[4];
    for (int t = 0; t < 4; t++) {
        acts[t] = aligned_alloc(64, ab + 64);
        for (size_t i = 0; i < ab; i++) acts[t][i] = (uint8_t)(i * 7 + t);
        if (be == 256) for (int64_t b = 0; b < n / 256; b++) ((ak256 *)acts[t])[b].d = 0.01f;
        else for (int64_t b = 0; b < 2 * n / 32; b++) ((float *)(acts[t] + n))[b] = 0.01f;
    }
    float res[4], sink = 0.0f;
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        const double t0 = now();
        for (size_t i = 0; i < nrows; i++) {
            FN(fused_dot)(type, w + i * rowb, n, (const uint8_t *const *)acts, res, nt);
            sink += res[0];
        }
        const double dt = now() - t0;
        if (dt < best) best = dt;
    }
    free(w);
    for (int t = 0; t < 4; t++) free(acts[t]);
    if (sink == 12345.0f) printf(" ");   /* keep the results alive */
    return (double)(nrows * rowb) / best / 1e9;
}

int main(void) {
    const struct { const char *name; int type; size_t bs, be; int64_t n; } ty[] = {
        {"Q4_K (Air gate/up, 4096)", NX_Q4_K, 144, 256, 4096},
        {"Q4_K repacked (r8)", NX_Q4_K_R8, 144, 256, 4096},
        {"Q5_0 (Air down, 1408)", NX_Q5_0, 22, 32, 1408},
        {"Q5_0 repacked (r8)", NX_Q5_0_R8, 22, 32, 1408},
        {"Q8_0 (1408)", NX_Q8_0, 34, 32, 1408},
        {"Q8_0 repacked (r8)", NX_Q8_0_R8, 34, 32, 1408},
        {"IQ4_NL (1408)", NX_IQ4_NL, 18, 32, 1408},
        {"IQ4_NL repacked (r8)", NX_IQ4_NL_R8, 18, 32, 1408},
        {"IQ4_XS (4096)", NX_IQ4_XS, 136, 256, 4096},
        {"IQ4_XS repacked (r8)", NX_IQ4_XS_R8, 136, 256, 4096},
        {"Q6_K (4096)", NX_Q6_K, 210, 256, 4096},
        {"Q6_K repacked (r8)", NX_Q6_K_R8, 210, 256, 4096},
        {"Q5_K (4096)", NX_Q5_K, 176, 256, 4096},
        {"Q5_K repacked (r8)", NX_Q5_K_R8, 176, 256, 4096},
        {"Q3_K (4096)", NX_Q3_K, 110, 256, 4096},
        {"Q3_K repacked (r8)", NX_Q3_K_R8, 110, 256, 4096},
        {"Q2_K (4096)", NX_Q2_K, 84, 256, 4096},
        {"Q2_K repacked (r8)", NX_Q2_K_R8, 84, 256, 4096},
    };
    printf("%-26s %6s %9s %9s\n", "type (row length)", "tokens", "hot GB/s", "dram GB/s");
    for (size_t i = 0; i < sizeof ty / sizeof ty[0]; i++)
        for (int nt = 1; nt <= 4; nt *= 2)
            printf("%-26s %6d %9.2f %9.2f\n", ty[i].name, nt,
                   rate(ty[i].type, ty[i].bs, ty[i].be, ty[i].n, nt, 200000, 4000),
                   rate(ty[i].type, ty[i].bs, ty[i].be, ty[i].n, nt, 256u << 20, 3));
    return 0;
}
#else
#include <stdio.h>
int main(void) { puts("dot_rate: x86-64 only (it times the AVX2 kernels)"); return 0; }
#endif
