/* The dense linear's multi-token kernels (cpu_kernels/linear_impl.h) on one core: nanoseconds per
 * (weight row, token) of GLM-4.5-Air's 4096 columns, for 1..16 tokens, with the rows in L2 ("hot":
 * the kernels' compute ceiling) and streamed from DRAM ("cold": 14,336 rows, attn_qkv's size), and
 * the machine's floor: one row-token is 128 VNNI dots (vpdpbusd, 32 int8 multiplies each), timed
 * here on 12 independent chains.  It tells how far a kernel is from its multiplies and how much of
 * the DRAM time it hides behind them (cold = hot + DRAM: no overlap; cold = hot: full).
 *
 *   gcc -O3 -std=gnu11 -fopenmp -fno-strict-aliasing -Icpu_kernels benchmarks/lin_rate.c -o /tmp/lin_rate -lm
 *   /tmp/lin_rate            # needs AVX-512 VNNI (the path the kernels take on such CPUs)
 *   gcc ... -DLIN_AVX2 ... -o /tmp/lin_rate2    # the AVX2 path (floor: maddubs + madd pairs)
 *
 * Weights are random bytes with small fp16 scales (timing does not depend on values). One thread
 * (nx_linear with nthreads = 1); the 2-thread, whole-call figures are `nextn bench linear`'s. */
#include "moe_kernels.h"
#include "block.h"
int64_t nx_min_work_per_thread = 0;
#if defined(__x86_64__)
#ifdef LIN_AVX2
#pragma GCC target("avx2,fma,f16c,bmi2")
#define NX_PATH 1
#define NX_SFX avx2
#define LIN_CALL nx_linear_avx2
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")
#define NX_PATH 2
#define NX_SFX avx512
#define LIN_CALL nx_linear_avx512
#endif
#include "moe_impl.h"
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* int8 dots of 32 bytes (ymm) per second on one core, 12 independent accumulators: vpdpbusd, or
 * on the AVX2 path the maddubs + madd + add it stands for */
static double vnni_rate(void) {
    __m256i a[12];
    const __m256i u = _mm256_set1_epi8(3), s = _mm256_set1_epi8(5);
    for (int i = 0; i < 12; i++) a[i] = _mm256_setzero_si256();
    const long n = 20000000;
    const double t0 = now();
    for (long k = 0; k < n; k++) {
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) a[i] = NX_DP(a[i], u, s);
        __asm__ volatile("" : : "x"(u), "x"(s));
    }
    const double dt = now() - t0;
    __m256i z = a[0];
    for (int i = 1; i < 12; i++) z = _mm256_add_epi32(z, a[i]);
    if (_mm256_extract_epi32(z, 0) == 12345) printf(" ");
    return 12.0 * (double)n / dt;
}

/* N rows of `type` (a repacked type or F16), 4096 columns: best seconds of a call per T */
static void call_times(int type, int64_t N, const int *Ts, int nT, double *best) {
    const int64_t H = 4096;
    const int base = type >= 100 ? type - 100 : type;
    const size_t bs = base == NX_Q8_0 ? 34 : base == NX_F16 ? 2 : 144, be = base == NX_Q8_0 ? 32 : base == NX_F16 ? 1 : 256;
    const size_t rowb = (size_t)(H / be) * bs;
    uint8_t *w = aligned_alloc(64, (size_t)N * rowb + 64);
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < (size_t)N * rowb; i++) { h = (h ^ (uint32_t)i) * 16777619u; w[i] = (uint8_t)(h >> 13); }
    if (base == NX_F16)
        for (size_t i = 0; i < (size_t)N * rowb; i += 2) w[i + 1] &= 0x3b;    /* finite halves below 1 */
    else
        for (size_t b = 0; b < (size_t)N * rowb / bs; b++) {   /* fp16 scales 2^-7: finite, small */
            uint8_t *p = w + b * bs;
            p[0] = 0; p[1] = 0x20;
            if (base == NX_Q4_K) { p[2] = 0; p[3] = 0x20; }
        }
    if (type >= 100) {
        uint8_t *row = malloc(rowb);
        for (int64_t i = 0; i < N; i++) { memcpy(row, w + i * rowb, rowb); nx_repack_row(type, row, (int64_t)(H / be), w + i * rowb); }
        free(row);
    }
    const nx_tensor t = {w, type, 1, N, H, (int64_t)rowb};
    float *x = malloc(16 * H * sizeof(float)), *out = malloc(16 * (size_t)N * sizeof(float));
    for (int64_t i = 0; i < 16 * H; i++) x[i] = (float)((i * 37) % 101 - 50) / 50.0f;
    for (int k = 0; k < nT; k++) {
        const int T = Ts[k];
        const int reps = N > 1000 ? 7 : 4000 / T;
        best[k] = 1e30;
        for (int r = 0; r < reps; r++) {
            const double t0 = now();
            LIN_CALL(x, T, &t, out, N, 1);
            const double dt = now() - t0;
            if (dt < best[k]) best[k] = dt;
        }
    }
    free(w); free(x); free(out);
}

/* hot: the difference of two L2-resident row counts (the call's own work, activation
 * quantization and set-up, cancels); cold: one call over 14,336 rows */
static void rate(const char *name, int type, size_t rowb, const int *Ts, int nT) {
    const int64_t n2 = (int64_t)(768 * 1024 / rowb), n1 = n2 / 3, nc = 14336;
    double a[8], b[8], c[8];
    call_times(type, n1, Ts, nT, a);
    call_times(type, n2, Ts, nT, b);
    call_times(type, nc, Ts, nT, c);
    printf("%-8s hot ", name);
    for (int k = 0; k < nT; k++) printf(" %7.1f", (b[k] - a[k]) * 1e9 / (double)((n2 - n1) * Ts[k]));
    printf("   cold ");
    for (int k = 0; k < nT; k++) printf(" %7.1f", c[k] * 1e9 / (double)(nc * Ts[k]));
    printf("\n");
}

int main(void) {
#ifdef LIN_AVX2
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
        printf("lin_rate: this CPU has no AVX2\n");
        return 0;
    }
#else
    if (!__builtin_cpu_supports("avx512vnni") || !__builtin_cpu_supports("avx512vl")) {
        printf("lin_rate: this CPU has no AVX-512 VNNI (build with -DLIN_AVX2 for the AVX2 path)\n");
        return 0;
    }
#endif
    const int Ts[] = {1, 2, 4, 8, 16};
    const double v = vnni_rate();
    printf("int8 dot (32 bytes): %.2f G/s per core; floor %.1f ns per 4096-column int8 row-token\n", v / 1e9, 128.0 / v * 1e9);
    printf("ns per row-token, one thread, T = 1, 2, 4, 8, 16\n");
    const struct { const char *name; int type; size_t rowb; } ty[] = {
        {"q8_0_r8", NX_Q8_0_R8, 4096 / 32 * 34}, {"q4_k_r8", NX_Q4_K_R8, 4096 / 256 * 144}, {"f16", NX_F16, 4096 * 2}};
    for (int i = 0; i < 3; i++) rate(ty[i].name, ty[i].type, ty[i].rowb, Ts, 5);
    return 0;
}
#else
#include <stdio.h>
int main(void) { printf("lin_rate: x86-64 only\n"); return 0; }
#endif
