/* Paired A/B of two versions of the MoE kernel in one process: the working tree's
 * cpu_kernels/moe_impl.h ("new") against another copy of it ("old"), AVX2 path, GLM-4.5-Air
 * shape (H 4096, 128 experts of 1408, top-8), Q4_K gate/up. Each repetition routes T tokens at
 * random and runs both versions back to back, in alternating order, on the same routing; the
 * median of the per-repetition time ratios is steady on a shared machine where medians of
 * separate runs move by 10-20%. Outputs are compared (a tiling or layout change that should be
 * bit-identical must print "identical").
 *
 *   git show HEAD~1:cpu_kernels/moe_impl.h > /tmp/old_impl.h
 *   gcc -O3 -std=gnu11 -fopenmp -fno-strict-aliasing -Icpu_kernels \
 *       -DNX_OLD_IMPL='"/tmp/old_impl.h"' benchmarks/moe_ab.c -o /tmp/moe_ab -lm
 *   /tmp/moe_ab 512 8 r8        # T, repetitions, down type: q5_0 | r8 (Q5_0 repacked) | q8_0
 *   /tmp/moe_ab 1 40 layout     # the new version only: Q5_0 down ("old") against the same
 *                               # bytes repacked to Q5_0_R8 ("new")
 *
 * Both versions must accept the same tensor types (an old copy from before Q5_0_R8 cannot run
 * "r8"). */
#include "moe_kernels.h"
int64_t nx_min_work_per_thread = 1 << 20;
#if defined(__x86_64__) && defined(NX_OLD_IMPL)
#pragma GCC target("avx2,fma,f16c,bmi2")
#define NX_PATH 1
#define NX_SFX old
#include NX_OLD_IMPL
#undef NX_SFX
#define NX_SFX new
#include "moe_impl.h"
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}
/* random bytes with small fp16 scales (2^-7) at the block's scale fields */
static uint8_t *blocks(size_t n, size_t bs, int two_halves) {
    uint8_t *p = aligned_alloc(64, (n + 63) & ~(size_t)63);
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) { h = (h ^ (uint32_t)i) * 16777619u; p[i] = (uint8_t)(h >> 13); }
    for (size_t b = 0; b < n / bs; b++) {
        p[b * bs] = 0; p[b * bs + 1] = 0x20;
        if (two_halves) { p[b * bs + 2] = 0; p[b * bs + 3] = 0x20; }
    }
    return p;
}
static int cmp(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }

int main(int argc, char **argv) {
    const int T = argc > 1 ? atoi(argv[1]) : 512, R = argc > 2 ? atoi(argv[2]) : 8;
    const char *dt = argc > 3 ? argv[3] : "r8";
    const int64_t E = 128, I = 1408, H = 4096, K = 8;
    const int nth = 2;
    if (T < 1 || R < 1 || R > 256) { puts("usage: moe_ab T REPS [q5_0|r8|q8_0|layout]"); return 1; }
    const size_t rg = (size_t)(H / 256) * 144;
    const int q8 = !strcmp(dt, "q8_0");
    const size_t rd = (size_t)(I / 32) * (q8 ? 34 : 22);
    uint8_t *g = blocks(E * I * rg, 144, 1), *u = blocks(E * I * rg, 144, 1), *d = blocks(E * H * rd, q8 ? 34 : 22, 0);
    const int layout = !strcmp(dt, "layout");
    int dtype = q8 ? NX_Q8_0 : NX_Q5_0;
    uint8_t *d8 = d;
    if (!strcmp(dt, "r8") || layout) {
        d8 = layout ? aligned_alloc(64, (E * H * rd + 63) & ~(size_t)63) : d;
        uint8_t *row = malloc(rd);
        for (int64_t r = 0; r < E * H; r++) { memcpy(row, d + r * rd, rd); nx_repack_row(NX_Q5_0_R8, row, I / 32, d8 + r * rd); }
        free(row);
        if (!layout) dtype = NX_Q5_0_R8;
    }
    const nx_tensor tg = {g, NX_Q4_K, E, I, H, (int64_t)rg}, tu = {u, NX_Q4_K, E, I, H, (int64_t)rg},
                    td = {d, dtype, E, H, I, (int64_t)rd}, td8 = {d8, NX_Q5_0_R8, E, H, I, (int64_t)rd};
    float *x = malloc(sizeof(float) * T * H), *o1 = malloc(sizeof(float) * T * H), *o2 = malloc(sizeof(float) * T * H);
    float *w = malloc(sizeof(float) * T * K);
    int32_t *ids = malloc(sizeof(int32_t) * T * K);
    for (int64_t i = 0; i < T * H; i++) x[i] = sinf((float)i);
    double to[256], tn[256], ratio[256], maxdiff = 0, maxabs = 0;
    unsigned s = 1;
    for (int rep = 0; rep < R; rep++) {
        for (int64_t t = 0; t < T; t++)        /* K distinct experts per token */
            for (int k = 0; k < K; k++) {
                int32_t e;
                int dup;
                do {
                    s = s * 1103515245u + 12345u;
                    e = (int32_t)((s >> 16) % E);
                    dup = 0;
                    for (int j = 0; j < k; j++) dup |= ids[t * K + j] == e;
                } while (dup);
                ids[t * K + k] = e;
                w[t * K + k] = 0.125f;
            }
        for (int half = 0; half < 2; half++) {
            const int run_old = (rep + half) % 2 == 0;
            const double t0 = now();
            if (run_old && !layout) nx_moe_forward_old(x, T, ids, w, K, &tg, &tu, &td, o1, nth);
            else if (run_old) nx_moe_forward_new(x, T, ids, w, K, &tg, &tu, &td, o1, nth);
            else nx_moe_forward_new(x, T, ids, w, K, &tg, &tu, layout ? &td8 : &td, o2, nth);
            (run_old ? to : tn)[rep] = now() - t0;
        }
        ratio[rep] = to[rep] / tn[rep];
        for (int64_t i = 0; i < T * H; i++) {
            const double e = fabs((double)o1[i] - o2[i]);
            if (e > maxdiff) maxdiff = e;
            if (fabs(o1[i]) > maxabs) maxabs = fabs(o1[i]);
        }
    }
    qsort(to, R, sizeof(double), cmp); qsort(tn, R, sizeof(double), cmp); qsort(ratio, R, sizeof(double), cmp);
    printf("T=%d down=%s reps=%d: old median %.2f ms, new median %.2f ms, paired old/new median %.3f "
           "(range %.3f-%.3f); outputs %s (max |diff| %.3g of max |out| %.3g)\n", T, dt, R, to[R / 2] * 1e3,
           tn[R / 2] * 1e3, ratio[R / 2], ratio[0], ratio[R - 1], maxdiff == 0 ? "identical" : "differ", maxdiff, maxabs);
    return 0;
}
#else
#include <stdio.h>
int main(void) { puts("moe_ab: x86-64 only, and build it with -DNX_OLD_IMPL='\"path/to/old/moe_impl.h\"'"); return 0; }
#endif
