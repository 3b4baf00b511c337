/* Whole decoder blocks for decode-sized row counts: the fused block call (structs in block.h).
 *
 * Included at the end of moe_impl.h, so it is compiled once per SIMD path and calls that path's
 * own linear and MoE entry points directly.  One call runs every block of a model (or the MTP
 * layer's one block) over T rows, the same operations in the same order as runtime/model.py's
 * torch path (the reference; tests/test_fused.py compares them):
 *
 *   h = rms_norm(x, attn_norm); qkv = h Wqkv^T + b; per-head rms_norm of q and k; NEOX RoPE on the
 *   first rope_dim dims of each head; K/V written at the row's cache slot; attention of the row
 *   over its sequence's slots up to its own (GQA, softmax scale); x += o Wo^T;
 *   h = rms_norm(x, post_norm);
 *   dense FFN:  x += down(silu(gate h) * up h)
 *   MoE:        s = sigmoid(Wr h); top-k of s + bias; w = s of those (/ sum, * scale);
 *               x += routed(h, ids, w) + shared(h)
 *
 * Every row is computed on its own: norms, rotations and attention row by row, and the linear
 * and MoE kernels give a row the same bits alone or in a batch.  So a verify batch's row gets
 * exactly the bits a plain step gets for it (greedy MTP output equals plain greedy output), and
 * rows of several sequences in one call (a batched decode step) each get the bits they get alone.
 *
 * Scratch is one allocation per call.  Parallelism is the kernels' own (they use fewer threads for
 * small matrices); attention splits its (row, kv group, heads) units over the threads when there is enough
 * of it.  Returns 0, -1 (allocation failed) or -4 (a descriptor or argument out of range: nothing
 * written).
 */
#include <time.h>

static inline double FN(now_s)(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline void FN(rms_norm_row)(const float *x, const float *w, int64_t n, float eps, float *y) {
    const float ss = FN(dot_f)(x, x, n);
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    if (w)
        for (int64_t i = 0; i < n; i++) y[i] = x[i] * r * w[i];
    else
        for (int64_t i = 0; i < n; i++) y[i] = x[i] * r;
}

static int64_t FN(lin_rows)(const nx_lin *w) {
    int64_t n = 0;
    for (int p = 0; p < w->n_parts; p++) n += w->parts[p].rows;
    return n;
}

/* a weight fits: 1..NX_MAX_PARTS single-matrix parts of `cols` columns, `rows` rows in all */
static int FN(lin_ok)(const nx_lin *w, int64_t rows, int64_t cols) {
    if (w->n_parts < 1 || w->n_parts > NX_MAX_PARTS) return 0;
    for (int p = 0; p < w->n_parts; p++)
        if (!w->parts[p].data || w->parts[p].n_expert != 1 || w->parts[p].cols != cols || w->parts[p].rows < 1) return 0;
    return FN(lin_rows)(w) == rows;
}

#if NX_MAX_PARTS > NX_MAX_LIN_PARTS
#error "lin_multi takes at most NX_MAX_LIN_PARTS parts"
#endif
/* out [T, N] = x [T, K] W^T (+ bias), each part filling its columns, all parts in one call */
static int FN(lin_apply)(const nx_lin *w, const float *x, int64_t T, float *out, int nthreads) {
    const int64_t N = FN(lin_rows)(w);
    int rc = FN(lin_multi)(x, T, w->parts, w->n_parts, out, N, nthreads);
    if (rc) return rc;
    if (w->bias)
        for (int64_t t = 0; t < T; t++)
            for (int64_t r = 0; r < N; r++) out[t * N + r] += w->bias[r];
    return 0;
}

#if NX_PATH >= 1
/* e^x for x <= 0 (scores less their max), 8 lanes: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6
 * polynomial (Cephes expf's coefficients), 2^n through the exponent bits; below -87.3 (2^-126) 0.
 * About 1 ulp from libm's expf; every lane the same operations, so a score's weight does not
 * depend on its neighbours or on how many positions there are. */
static inline __m256 FN(exp8_neg)(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* lane p: the horizontal sum of a[p], ((x0+x1)+(x2+x3)) + ((x4+x5)+(x6+x7)) in every lane */
static inline __m256 FN(hsum8x8)(const __m256 *a) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

/* Attention over the KV cache, GQA-aware. A unit is a run of rows of one sequence (they share
 * its slot map) and a run of heads of one kv group g (the group's heads are consecutive:
 * h = g * group + u). Every (row, head)'s arithmetic is its own and the same whatever rows and
 * heads share its unit, so any split into units and threads gives the same bits. The SIMD path
 * takes positions in blocks and serves every (row, head) of the unit from a block before it moves
 * on, so the group's K and V rows come from memory once per unit rather than once per head and
 * row (GLM-4.5-Air: 12 query heads per kv head; at 4K positions a layer's K/V are 33 MB, read 96
 * times a row head by head against 8 times by group; an MTP verify's rows read them once). */
#define NX_ATT_HEADS 48       /* most (row, head)s in one unit (their maxima and sums on the stack) */
#define NX_ATT_KPF 32         /* K rows fetched this many positions ahead, V rows NX_ATT_VPF: about */
#define NX_ATT_VPF 64         /* 2 us of work ahead at 12 heads a unit (16..96 measured alike) */
#define NX_ATT_PB 32          /* positions per PV block: 32 rows of V (16 KB at head_dim 128) stay in L1 */
/* Score floats per thread (8 MB); past it a unit takes fewer heads, and their group's K/V are read
 * once per unit. Scores are ~5% of a position's traffic (12 heads: 48 B against 1 KB of K/V), so
 * they may leave L2 sooner than K/V be read twice: at 2M against 128K floats, 1 row at 16K
 * positions 0.87x the time, at 32K 0.64x (benchmarks/attention_context.py, Air's shape). */
#define NX_ATT_SCORES (1 << 21)

/* The cache holds float32 or float16 (kv_type 1: an F16 cache, half the memory and half the bytes
 * attention streams; rows are written rounded to nearest even and read back exactly, so every
 * reader of a slot sees the same values). kv_row: where slot `slot`'s kv group g begins. */
static inline const char *FN(kv_row)(const void *c, int f16, int64_t slot, int64_t nkv, int64_t g, int64_t hd) {
    return (const char *)c + (slot * nkv + g) * hd * (f16 ? 2 : 4);
}

/* slot `slot`'s kv group g as floats: in place (float32), or converted into tmp [hd] (float16) */
static inline const float *FN(kv_f32)(const void *c, int f16, int64_t slot, int64_t nkv, int64_t g, int64_t hd,
                                      float *tmp) {
    const char *r = FN(kv_row)(c, f16, slot, nkv, g, hd);
    if (!f16) return (const float *)r;
    for (int64_t i = 0; i < hd; i++) tmp[i] = H2F(FN(rd16)(r + 2 * i));
    return tmp;
}

/* n floats -> the cache's float16, rounded to nearest even (FN(f2h), 8 at a time with F16C) */
static void FN(to_f16)(const float *x, uint16_t *o, int64_t n) {
    int64_t i = 0;
#if NX_PATH >= 1
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(o + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; i < n; i++) o[i] = FN(f2h)(x[i]);
}

#if NX_PATH >= 1
/* For each of NH (row, head)s h (1, or 2 sharing every V load; constants after inlining):
 * acc0[h]/acc1[h][c0 .. c0 + 8 NC) += sum over positions j0..j1 (j0 even; V row j at vr[j - j0])
 * of s[h][j] v_j, even positions into acc0 and odd ones into acc1: two chains of FMAs, so they
 * are not one long dependency through memory; the chains continue from block to block (first:
 * they start at zero). A (row, head)'s sums are the same operations whether it shares the loads
 * or not, so the same bits. */
static inline __attribute__((always_inline)) void FN(attend_pv)(const float *const *vr, int64_t j0, int64_t j1,
                                                               int64_t c0, const float *const *s, float *const *acc0,
                                                               float *const *acc1, int first, const int NC, const int NH) {
    __m256 a0[2][4], a1[2][4];
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < NC; c++) {
            a0[h][c] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc0[h] + c0 + 8 * c);
            a1[h][c] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc1[h] + c0 + 8 * c);
        }
    int64_t j = j0;
    for (; j + 2 <= j1; j += 2) {
        const float *v0 = vr[j - j0] + c0, *v1 = vr[j + 1 - j0] + c0;
        __m256 p0[2], p1[2];
        for (int h = 0; h < NH; h++) { p0[h] = _mm256_set1_ps(s[h][j]); p1[h] = _mm256_set1_ps(s[h][j + 1]); }
        for (int c = 0; c < NC; c++) {
            const __m256 x0 = _mm256_loadu_ps(v0 + 8 * c), x1 = _mm256_loadu_ps(v1 + 8 * c);
            for (int h = 0; h < NH; h++) {
                a0[h][c] = _mm256_fmadd_ps(p0[h], x0, a0[h][c]);
                a1[h][c] = _mm256_fmadd_ps(p1[h], x1, a1[h][c]);
            }
        }
    }
    if (j < j1) {
        const float *v0 = vr[j - j0] + c0;
        for (int h = 0; h < NH; h++) {
            const __m256 p0 = _mm256_set1_ps(s[h][j]);
            for (int c = 0; c < NC; c++) a0[h][c] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0 + 8 * c), a0[h][c]);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < NC; c++) {
            _mm256_storeu_ps(acc0[h] + c0 + 8 * c, a0[h][c]);
            _mm256_storeu_ps(acc1[h] + c0 + 8 * c, a1[h][c]);
        }
}

/* attend_pv over a whole head (hd floats, 32 at a time, then the 8..24 left) */
static inline __attribute__((always_inline)) void FN(attend_pv_head)(const float *const *vr, int64_t j0, int64_t j1,
                                                                    int64_t hd, const float *const *s, float *const *acc0,
                                                                    float *const *acc1, int first, const int NH) {
    int64_t c0 = 0;
    for (; c0 + 32 <= hd; c0 += 32) FN(attend_pv)(vr, j0, j1, c0, s, acc0, acc1, first, 4, NH);
    switch ((hd - c0) / 8) {
    case 1: FN(attend_pv)(vr, j0, j1, c0, s, acc0, acc1, first, 1, NH); break;
    case 2: FN(attend_pv)(vr, j0, j1, c0, s, acc0, acc1, first, 2, NH); break;
    case 3: FN(attend_pv)(vr, j0, j1, c0, s, acc0, acc1, first, 3, NH); break;
    }
}

/* rows map[j0..j1) (those below n) of kv group g on their way to the cache: they are a page apart
 * (slot-major cache), so the hardware prefetchers, which stay within a page, do not fetch them */
static inline void FN(attend_prefetch)(const void *c, int f16, const int32_t *map, int64_t j0, int64_t j1, int64_t n,
                                       int64_t nkv, int64_t g, int64_t hd) {
    const int64_t es = f16 ? 2 : 4;
    for (int64_t j = j0; j < j1 && j < n; j++) {
        const char *r = FN(kv_row)(c, f16, map[j], nkv, g, hd);
        for (int64_t i = 0; i < hd * es; i += 64) __builtin_prefetch(r + i, 0, 2);
    }
}

/* rows map[j0..j1) of kv group g (rows past n repeat slot n-1): ptr[j - j0] points at row j, in
 * the cache or, with pack, in dst [j1 - j0, hd] where they are copied. A group's rows are n_kv * hd
 * floats apart in the cache (4 KB at 8 x 128): a block of them read in place falls into a few L1
 * sets, which hold 8 lines each; copied once they serve every (row, head) of the unit from L1.
 * Rows closer together than NX_ATT_PACK floats are read in place (the demo's 2 x 32: a copy there
 * costs more than the few dots it serves). */
#define NX_ATT_PACK 512
static inline void FN(attend_rows)(const void *c, int f16, const int32_t *map, int64_t j0, int64_t j1, int64_t n,
                                   int64_t nkv, int64_t g, int64_t hd, int pack, float *dst, const float **ptr) {
    for (int64_t j = j0; j < j1; j++) {
        const char *src = FN(kv_row)(c, f16, map[j < n ? j : n - 1], nkv, g, hd);
        float *to = dst + (j - j0) * hd;
        if (f16) {   /* an F16 cache is always copied: converted once, for every (row, head) */
            for (int64_t i = 0; i < hd; i += 8)
                _mm256_storeu_ps(to + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * i))));
            ptr[j - j0] = to;
        } else if (pack) {
            memcpy(to, src, (size_t)hd * sizeof(float));
            ptr[j - j0] = to;
        } else {
            ptr[j - j0] = (const float *)src;
        }
    }
}

/* nr rows (row r sees slots map[0..n[r]); its q at q + r * qstride, its output at out + r * ostride)
 * and nu heads of kv group g (consecutive q and output vectors): o = softmax(scale q K^T) V.
 * Scores 8 positions at a time (a row's short tail repeats its last slot in the unused lanes and
 * stores only the valid ones), so every score, weight and sum is the same sequence of operations
 * wherever its position falls and whatever rows share the unit. s: nr * nu * sst floats
 * (sst >= n + 8); acc: (2 nr nu + 8 + NX_ATT_PB) hd floats. */
static void FN(attend_heads)(const float *q, int64_t qstride, const void *kc, const void *vc, int f16, const int32_t *map,
                             const int64_t *n, int64_t nr, int64_t nkv, int64_t g, int64_t hd, float scale, int64_t nu,
                             float *s, int64_t sst, float *acc, float *out, int64_t ostride) {
    const int64_t nv = hd / 8, nvh = nr * nu;   /* (row, head) v = r * nu + u */
    float *kb = acc + 2 * nvh * hd, *vb = kb + 8 * hd;   /* a block of K rows, of V rows (packed) */
    const float *kr[8], *vr[NX_ATT_PB];
    const int pack = f16 || nkv * hd >= NX_ATT_PACK;
    int64_t nmax = 0;
    for (int64_t r = 0; r < nr; r++) nmax = n[r] > nmax ? n[r] : nmax;
    const __m256 sc = _mm256_set1_ps(scale);
    __m256 mx[NX_ATT_HEADS];
    for (int64_t v = 0; v < nvh; v++) mx[v] = _mm256_set1_ps(-INFINITY);
    for (int64_t j0 = 0; j0 < nmax; j0 += 8) {
        if (pack) FN(attend_prefetch)(kc, f16, map, j0 + NX_ATT_KPF, j0 + NX_ATT_KPF + 8, nmax, nkv, g, hd);
        FN(attend_rows)(kc, f16, map, j0, j0 + 8, nmax, nkv, g, hd, pack, kb, kr);
        for (int64_t r = 0; r < nr; r++) {
            if (j0 >= n[r]) continue;
            const float *kp[8];   /* the block's 8 K rows (4 KB at hd 128) stay in L1 */
            for (int p = 0; p < 8; p++) kp[p] = kr[j0 + p < n[r] ? p : n[r] - 1 - j0];
            for (int64_t u = 0; u < nu; u++) {
                const int64_t v = r * nu + u;
                const float *qu = q + r * qstride + u * hd;
                /* the 8 positions' dots side by side, chunk by chunk: 8 independent FMA chains
                 * (one position's chain after another waited on each FMA's latency: 4x the
                 * time); each chain still sums its chunks in order, so the same bits */
                __m256 a8[8];
                const __m256 q0 = _mm256_loadu_ps(qu);
                for (int p = 0; p < 8; p++) a8[p] = _mm256_mul_ps(q0, _mm256_loadu_ps(kp[p]));
                for (int64_t c = 1; c < nv; c++) {
                    const __m256 qc = _mm256_loadu_ps(qu + 8 * c);
                    for (int p = 0; p < 8; p++) a8[p] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(kp[p] + 8 * c), a8[p]);
                }
                const __m256 x = _mm256_mul_ps(FN(hsum8x8)(a8), sc);
                _mm256_storeu_ps(s + v * sst + j0, x);   /* 8 floats of slack past n */
                mx[v] = _mm256_max_ps(mx[v], x);         /* tail lanes repeat slot n-1: the max is unchanged */
            }
        }
    }
    float inv[NX_ATT_HEADS];
    for (int64_t v = 0; v < nvh; v++) {
        const int64_t nn = n[v / nu], nfull = nn & ~(int64_t)7;
        float *sv = s + v * sst, mb[8];
        _mm256_storeu_ps(mb, mx[v]);
        float m = mb[0];
        for (int p = 1; p < 8; p++) m = mb[p] > m ? mb[p] : m;
        const __m256 m8 = _mm256_set1_ps(m);
        __m256 sum8 = _mm256_setzero_ps();
        for (int64_t j0 = 0; j0 < nn; j0 += 8) {
            const __m256 e = FN(exp8_neg)(_mm256_sub_ps(_mm256_loadu_ps(sv + j0), m8));
            _mm256_storeu_ps(sv + j0, e);
            if (j0 < nfull) sum8 = _mm256_add_ps(sum8, e);
        }
        float sum = FN(hsum256)(sum8);
        for (int64_t j = nfull; j < nn; j++) sum += sv[j];
        inv[v] = 1.0f / sum;
    }
    for (int64_t j0 = 0; j0 < nmax; j0 += NX_ATT_PB) {   /* the block's V rows, then every (row, head) over them */
        const int64_t j1 = j0 + NX_ATT_PB < nmax ? j0 + NX_ATT_PB : nmax;
        if (pack) FN(attend_prefetch)(vc, f16, map, j0 + NX_ATT_VPF, j0 + NX_ATT_VPF + NX_ATT_PB, nmax, nkv, g, hd);
        FN(attend_rows)(vc, f16, map, j0, j1, nmax, nkv, g, hd, pack, vb, vr);
        /* two heads of a row at a time where the registers allow (AVX-512's 32: 16 sums of
         * 2 heads x 2 chains x 4 vectors), so each V vector loaded feeds two FMAs */
        for (int64_t v = 0; v < nvh;) {
            const int64_t nn = n[v / nu], e1 = j1 < nn ? j1 : nn;
            const int two = NX_PATH == 2 && v + 1 < nvh && (v + 1) / nu == v / nu;
            if (j0 < nn) {
                const float *sv[2] = {s + v * sst, s + (v + two) * sst};
                float *a0[2] = {acc + 2 * v * hd, acc + 2 * (v + two) * hd}, *a1[2] = {a0[0] + hd, a0[1] + hd};
                if (two) FN(attend_pv_head)(vr, j0, e1, hd, sv, a0, a1, j0 == 0, 2);
                else FN(attend_pv_head)(vr, j0, e1, hd, sv, a0, a1, j0 == 0, 1);
            }
            v += 1 + two;
        }
    }
    for (int64_t v = 0; v < nvh; v++) {
        const float *a0 = acc + 2 * v * hd, *a1 = a0 + hd;
        float *ov = out + (v / nu) * ostride + (v % nu) * hd;
        const __m256 iv = _mm256_set1_ps(inv[v]);
        for (int64_t c = 0; c < nv; c++)
            _mm256_storeu_ps(ov + 8 * c, _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(a0 + 8 * c), _mm256_loadu_ps(a1 + 8 * c)), iv));
    }
}
#endif

/* One (row, head), the reference path (and any head size the SIMD path does not take):
 * o = softmax(scale * q K^T) V over the n slots map[0..n) of kv group g. s: n floats; tmp: hd
 * floats (an F16 cache's row converted). */
static void FN(attend_one)(const float *q, const void *kc, const void *vc, int f16, const int32_t *map, int64_t n,
                           int64_t nkv, int64_t g, int64_t hd, float scale, float *s, float *tmp, float *out) {
    float m = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        s[j] = FN(dot_f)(q, FN(kv_f32)(kc, f16, map[j], nkv, g, hd, tmp), hd) * scale;
        if (s[j] > m) m = s[j];
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < n; j++) { s[j] = expf(s[j] - m); sum += s[j]; }
    for (int64_t i = 0; i < hd; i++) out[i] = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        const float *v = FN(kv_f32)(vc, f16, map[j], nkv, g, hd, tmp);
        const float p = s[j];
        for (int64_t i = 0; i < hd; i++) out[i] += p * v[i];
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < hd; i++) out[i] *= inv;
}

/* the most (row, head)s of one unit for rows that see at most smax slots, and the per-thread
 * scratch (floats) they take: their scores (8 floats of slack each, rounded to 16) and PV sums,
 * a block of K rows and one of V rows */
static int64_t FN(attend_sst)(int64_t smax) { return ((smax + 8 + 15) / 16) * 16; }   /* a score row's floats */
static int64_t FN(attend_vmax)(int64_t smax) {
    const int64_t v = NX_ATT_SCORES / FN(attend_sst)(smax);
    return v < 1 ? 1 : v > NX_ATT_HEADS ? NX_ATT_HEADS : v;
}
static int64_t FN(attend_scratch)(int64_t smax, int64_t hd) {
    const int64_t sst = FN(attend_sst)(smax);
    return FN(attend_vmax)(smax) * (sst + 2 * hd) + (8 + NX_ATT_PB) * hd;
}

/* attention of row t over its sequence's logical slots 0..lslot[t] (physical maps[t][j]); q already
 * normed and rotated in qkv's q part; o [T, n_heads * head_dim]. Units are (run of one sequence's
 * consecutive rows, kv group, run of that group's heads): as many rows and heads per unit as let
 * it read its group's K and V once for all of them, as few as keep every thread busy.
 * rs: T + 1 int64 of scratch. */
static void FN(attend)(const nx_dims *d, const float *qkv, int64_t T, const void *kc, const void *vc, int f16,
                       const int64_t *lslot, const int32_t *const *maps, float *o, float *scr_all,
                       int64_t smax, int64_t *rs, int nthreads) {
    const int64_t nh = d->n_heads, nkv = d->n_kv, hd = d->head_dim, group = nh / nkv;
    const int64_t nqkv = (nh + 2 * nkv) * hd;
    const int64_t sst = FN(attend_sst)(smax), scr_stride = FN(attend_scratch)(smax, hd);
    const int64_t vmax = FN(attend_vmax)(smax);
    double work = 0.0;
    for (int64_t t = 0; t < T; t++) work += (double)(lslot[t] + 1);
    work *= (double)nh * (double)hd * 8.0;
    int nth = nthreads;
    const double mw = (double)nx_min_work_per_thread;
    if (mw > 0 && work < (double)nth * mw) nth = (int)(work / mw) + 1;
    if (nth > nthreads) nth = nthreads;
    int64_t nseq = 1;   /* runs of rows with one slot map */
    for (int64_t t = 1; t < T; t++) nseq += maps[t] != maps[t - 1];
    int64_t hruns = (group + vmax - 1) / vmax;   /* runs of heads per group */
    while (hruns < group && nseq * nkv * hruns < nth) hruns++;
    const int64_t per = (group + hruns - 1) / hruns, rmax = vmax / per > 0 ? vmax / per : 1;
    hruns = (group + per - 1) / per;
    int64_t nrr = 0;   /* row runs: [rs[i], rs[i + 1]), one map each, at most rmax rows */
    for (int64_t t = 0; t < T; t++)
        if (t == 0 || maps[t] != maps[t - 1] || t - rs[nrr - 1] >= rmax) rs[nrr++] = t;
    rs[nrr] = T;
    const int simd = NX_PATH >= 1 && hd % 8 == 0 && hd <= 256;
    (void)simd;
#pragma omp parallel for num_threads(nth) if (nth > 1) schedule(static)
    for (int64_t u = 0; u < nrr * nkv * hruns; u++) {
        const int64_t ri = u / (nkv * hruns), g = (u / hruns) % nkv, h0 = g * group + (u % hruns) * per;
        const int64_t nu = h0 + per <= (g + 1) * group ? per : (g + 1) * group - h0;
        const int64_t t0 = rs[ri], nr = rs[ri + 1] - t0;
        float *scr = scr_all + scr_stride * (int64_t)omp_get_thread_num();
        const float *q = qkv + t0 * nqkv + h0 * hd;
        float *out = o + t0 * nh * hd + h0 * hd;
        int64_t n[NX_ATT_HEADS];
        for (int64_t r = 0; r < nr; r++) n[r] = lslot[t0 + r] + 1;
#if NX_PATH >= 1
        if (simd) {
            FN(attend_heads)(q, nqkv, kc, vc, f16, maps[t0], n, nr, nkv, g, hd, d->attn_scale, nu, scr, sst,
                             scr + nr * nu * sst, out, nh * hd);
            continue;
        }
#endif
        for (int64_t r = 0; r < nr; r++)
            for (int64_t i = 0; i < nu; i++)
                FN(attend_one)(q + r * nqkv + i * hd, kc, vc, f16, maps[t0], n[r], nkv, g, hd, d->attn_scale, scr,
                               scr + sst, out + r * nh * hd + i * hd);
    }
}

/* Latent attention over the cache: ol [T, n_heads, R] = softmax(scale Q . K_j) . K_j[0..R) for
 * row t over its slots 0..lslot[t] (Q [T, n_heads, D], D = R + rope; the values are the rows'
 * first R floats). A row's positions go in chunks of NX_MLA_CHUNK from position 0, and a unit is
 * (row, chunk, run of heads): it reads each of its cache rows once (scores, then again from
 * cache for the sums), so threads split the positions rather than each reading every row, and
 * leaves the chunk's max, sum and unnormalised output per head; the chunks are then merged in
 * order. Chunk bounds depend only on the position and runs of heads only change which unit does
 * a head, so a row's bits are the same in any batch and on any number of threads.
 * At 4,000 positions split by heads instead, two threads read every row twice each. */
#define NX_MLA_CHUNK 256
static int FN(mla_attend)(const nx_dims *d, const float *Q, int64_t T, const void *K, int f16, const int64_t *lslot,
                          const int32_t *const *maps, float *ol, int nthreads) {
    const int64_t nh = d->n_heads, R = d->kv_rank, D = d->head_dim, C = NX_MLA_CHUNK;
    int64_t nc = 0;   /* chunks of all rows; row t's start at c0[t] */
    int64_t *c0 = (int64_t *)malloc((size_t)(T + 1) * sizeof(int64_t));
    if (!c0) return -1;
    double work = 0.0;
    for (int64_t t = 0; t < T; t++) {
        c0[t] = nc;
        nc += (lslot[t] + 1 + C - 1) / C;
        work += (double)(lslot[t] + 1);
    }
    c0[T] = nc;
    work *= (double)nh * (double)(D + R) * 2.0;
    int64_t runs = 1;   /* runs of heads: as many as keep the threads busy */
    while (runs < nh && nc * runs < nthreads) runs++;
    const int64_t per = (nh + runs - 1) / runs;
    runs = (nh + per - 1) / per;
    int nth = nthreads;
    const double mw = (double)nx_min_work_per_thread;
    if (mw > 0 && work < (double)nth * mw) nth = (int)(work / mw) + 1;
    if (nth > nthreads) nth = nthreads;
    /* per (chunk, head): max, sum, then R unnormalised sums */
    float *part = (float *)malloc((size_t)nc * (size_t)nh * (size_t)(R + 2) * sizeof(float));
    if (!part) { free(c0); return -1; }
    int bad = 0;
#pragma omp parallel num_threads(nth) if (nth > 1) reduction(| : bad)
    {
        float *s = (float *)malloc(((size_t)per * (size_t)C + (size_t)D) * sizeof(float));
        if (!s) bad = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < nc * runs; u++) {
            if (!s) continue;
            const int64_t c = u / runs, h0 = (u % runs) * per, nu = h0 + per <= nh ? per : nh - h0;
            int64_t t = 0;
            while (c >= c0[t + 1]) t++;
            const int64_t j0 = (c - c0[t]) * C, n = lslot[t] + 1, j1 = j0 + C < n ? j0 + C : n;
            float *tmp = s + per * C;
            float m[64];
            for (int64_t k = 0; k < nu; k++) m[k] = -INFINITY;
            for (int64_t j = j0; j < j1; j++) {
                const float *kj = FN(kv_f32)(K, f16, maps[t][j], 1, 0, D, tmp);
                for (int64_t k = 0; k < nu; k++) {
                    const float x = FN(dot_f)(Q + (t * nh + h0 + k) * D, kj, D) * d->attn_scale;
                    s[k * C + j - j0] = x;
                    if (x > m[k]) m[k] = x;
                }
            }
            for (int64_t k = 0; k < nu; k++) {
                float *sk = s + k * C, sum = 0.0f, *pk = part + (c * nh + h0 + k) * (R + 2);
                for (int64_t j = 0; j < j1 - j0; j++) { sk[j] = expf(sk[j] - m[k]); sum += sk[j]; }
                pk[0] = m[k];
                pk[1] = sum;
                for (int64_t i = 0; i < R; i++) pk[2 + i] = 0.0f;
            }
            for (int64_t j = j0; j < j1; j++) {
                const float *kj = FN(kv_f32)(K, f16, maps[t][j], 1, 0, D, tmp);
                for (int64_t k = 0; k < nu; k++) {
                    const float p = s[k * C + j - j0];
                    float *o = part + (c * nh + h0 + k) * (R + 2) + 2;
                    for (int64_t i = 0; i < R; i++) o[i] += p * kj[i];
                }
            }
        }
        free(s);
#pragma omp barrier
        /* merge a (row, head)'s chunks in order: o = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c */
#pragma omp for schedule(static)
        for (int64_t v = 0; v < T * nh; v++) {
            const int64_t t = v / nh, k = v % nh;
            float M = -INFINITY;
            for (int64_t c = c0[t]; c < c0[t + 1]; c++) M = part[(c * nh + k) * (R + 2)] > M ? part[(c * nh + k) * (R + 2)] : M;
            float L = 0.0f, *o = ol + v * R;
            for (int64_t i = 0; i < R; i++) o[i] = 0.0f;
            for (int64_t c = c0[t]; c < c0[t + 1]; c++) {
                const float *pk = part + (c * nh + k) * (R + 2), w = expf(pk[0] - M);
                L += w * pk[1];
                for (int64_t i = 0; i < R; i++) o[i] += w * pk[2 + i];
            }
            const float inv = 1.0f / L;
            for (int64_t i = 0; i < R; i++) o[i] *= inv;
        }
    }
    free(part);
    free(c0);
    return bad ? -1 : 0;
}

/* Latent attention of T rows (GLM-4.7-Flash, runtime/model.py's MLAttention; the same operations
 * row by row, so a row's bits do not depend on the rows beside it):
 *   [q_a | kv] = qkv(h); q = q_b(rms_norm(q_a)); cache row = [rms_norm(kv latent), rope(kv rope)]
 *   Q_head = [k_b_head q_nope, rope(q_rope)]; o_lat = softmax(scale Q . K_j) . latent_j
 *   att = v_b_head o_lat  (att [T, n_heads v_dim], for wo)
 * Attention: mla_attend. Scratch is allocated here (a few KB a row). Returns 0, -1 (allocation
 * failed). */
static int FN(mla_rows)(const nx_dims *d, const nx_block *b, const float *h, int64_t T, void *K, int f16,
                        const int64_t *pos, const int64_t *lslot, const int32_t *const *maps, float *att,
                        int nthreads) {
    const int64_t nh = d->n_heads, R = d->kv_rank, rope = 2 * (int64_t)d->rope_half, nope = d->nope;
    const int64_t qr = d->q_rank, D = R + rope, qd = nope + rope, nqa = qr + R + rope;
    const size_t nf = (size_t)T * (size_t)(nqa + qr + nh * qd + nh * nope + nh * R + nh * D + nh * R);
    float *buf = (float *)malloc(nf * sizeof(float));
    if (!buf) return -1;
    float *qkv = buf, *qa = qkv + T * nqa, *qb = qa + T * qr, *qn = qb + T * nh * qd, *ql = qn + T * nh * nope;
    float *Q = ql + T * nh * R, *ol = Q + T * nh * D;
    int rc = FN(lin_apply)(&b->qkv, h, T, qkv, nthreads);
    for (int64_t t = 0; t < T && !rc; t++) {
        const float *r = qkv + t * nqa;
        FN(rms_norm_row)(r, b->q_a_norm, qr, d->eps, qa + t * qr);
        float row[4096];   /* kv_rank + rope <= 4096 (checked by the caller) */
        FN(rms_norm_row)(r + qr, b->kv_a_norm, R, d->eps, row);
        const float *C = d->rope_cos + pos[t] * rope, *S = d->rope_sin + pos[t] * rope;
        const float *kr = r + qr + R;
        for (int64_t i = 0; i < rope; i++) row[R + i] = kr[i] * C[i] + kr[i ^ 1] * S[i];
        const int64_t slot = maps[t][lslot[t]];
        if (f16) FN(to_f16)(row, (uint16_t *)K + slot * D, D);
        else memcpy((float *)K + slot * D, row, (size_t)D * sizeof(float));
    }
    if (!rc) rc = FN(lin_apply)(&b->q_b, qa, T, qb, nthreads);
    if (!rc) {
        for (int64_t t = 0; t < T; t++)
            for (int64_t hh = 0; hh < nh; hh++) {
                const float *q = qb + (t * nh + hh) * qd;
                memcpy(qn + (t * nh + hh) * nope, q, (size_t)nope * sizeof(float));
                const float *C = d->rope_cos + pos[t] * rope, *S = d->rope_sin + pos[t] * rope;
                float *o = Q + (t * nh + hh) * D + R;
                for (int64_t i = 0; i < rope; i++) o[i] = q[nope + i] * C[i] + q[nope + (i ^ 1)] * S[i];
            }
        rc = NX_CAT(nx_linear_heads, NX_SFX)(qn, T, &b->k_b, ql, nthreads);
    }
    if (!rc) {
        for (int64_t v = 0; v < T * nh; v++) memcpy(Q + v * D, ql + v * R, (size_t)R * sizeof(float));
        rc = FN(mla_attend)(d, Q, T, K, f16, lslot, maps, ol, nthreads);
    }
    if (!rc) rc = NX_CAT(nx_linear_heads, NX_SFX)(ol, T, &b->v_b, att, nthreads);
    free(buf);
    return rc;
}

static int FN(mla_ok)(const nx_dims *d, const nx_block *b) {
    const int64_t nh = d->n_heads, R = d->kv_rank, rope = 2 * (int64_t)d->rope_half;
    const nx_tensor *kb = &b->k_b, *vb = &b->v_b;
    if (d->n_kv != 1 || d->q_rank < 1 || d->nope < 1 || d->v_dim < 1 || d->head_dim != R + rope || R + rope > 4096)
        return 0;
    if (nh > 64 || !b->q_a_norm || !b->kv_a_norm || !kb->data || !vb->data) return 0;
    if (!FN(lin_ok)(&b->qkv, d->q_rank + R + rope, d->H) || !FN(lin_ok)(&b->q_b, nh * (d->nope + rope), d->q_rank))
        return 0;
    if (kb->n_expert != nh || kb->rows != R || kb->cols != d->nope) return 0;
    if (vb->n_expert != nh || vb->rows != d->v_dim || vb->cols != R) return 0;
    return FN(lin_ok)(&b->wo, d->H, nh * d->v_dim);
}

/* top-k of s + b (ties: the lower expert id), weights the unbiased s of the chosen */
static void FN(route_row)(const float *s, const float *b, int64_t E, int64_t K, int norm, float scale,
                          int32_t *ids, float *w, uint8_t *taken) {
    memset(taken, 0, (size_t)E);
    float sum = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        int64_t best = -1;
        float bv = 0.0f;
        for (int64_t e = 0; e < E; e++) {
            if (taken[e]) continue;
            const float v = s[e] + b[e];
            if (best < 0 || v > bv) { best = e; bv = v; }
        }
        taken[best] = 1;
        ids[k] = (int32_t)best;
        w[k] = s[best];
        sum += s[best];
    }
    if (norm)
        for (int64_t k = 0; k < K; k++) w[k] = w[k] / (sum + 1e-20f);
    if (scale != 1.0f)
        for (int64_t k = 0; k < K; k++) w[k] *= scale;
}

/* the dense FFN / shared expert: out [T, H] = down(silu(gate h) * up h); gu [T, 2F], a [T, F] */
static int FN(ffn)(const nx_block *b, const float *h, int64_t T, float *gu, float *a, float *out, int nthreads) {
    const int64_t F2 = FN(lin_rows)(&b->ffn_gate_up), F = F2 / 2;
    int rc = FN(lin_apply)(&b->ffn_gate_up, h, T, gu, nthreads);
    if (rc) return rc;
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < F; i++) a[t * F + i] = FN(silu)(gu[t * F2 + i]) * gu[t * F2 + F + i];
    return FN(lin_apply)(&b->ffn_down, a, T, out, nthreads);
}

static int FN(block_ok)(const nx_dims *d, const nx_block *b) {
    const int64_t H = d->H, nq = (int64_t)d->n_heads * d->head_dim, nkv = (int64_t)d->n_kv * d->head_dim;
    if (!b->attn_norm || !b->post_norm) return 0;
    if (d->kv_rank > 0 ? !FN(mla_ok)(d, b) : (!FN(lin_ok)(&b->qkv, nq + 2 * nkv, H) || !FN(lin_ok)(&b->wo, H, nq)))
        return 0;
    const int has_ffn = b->ffn_gate_up.n_parts > 0;
    if (has_ffn) {
        const int64_t F2 = FN(lin_rows)(&b->ffn_gate_up);
        if (F2 % 2 || !FN(lin_ok)(&b->ffn_gate_up, F2, H) || !FN(lin_ok)(&b->ffn_down, H, F2 / 2)) return 0;
    }
    if (!b->router_w) return has_ffn;   /* a dense block needs its FFN */
    const nx_tensor *g = &b->exp_gate, *u = &b->exp_up, *dn = &b->exp_down;
    if (!b->router_b || b->n_expert < 1 || b->top_k < 1 || b->top_k > b->n_expert) return 0;
    if (!g->data || !u->data || !dn->data) return 0;
    if (g->n_expert != b->n_expert || u->n_expert != b->n_expert || dn->n_expert != b->n_expert) return 0;
    if (g->cols != H || u->cols != H || u->rows != g->rows || dn->rows != H || dn->cols != g->rows) return 0;
    return 1;
}

/* The fused call's scratch, kept per calling thread between calls and grown when a call needs
 * more. At long contexts on many threads it is large (the attention's scores: 16 threads at 32K
 * positions take ~100 MB), past glibc's 32 MB mmap ceiling, where a fresh block per call is
 * fresh pages: page faults on every step. A thread's block is freed when the thread ends (a
 * thread-specific key's destructor). Block layout: its size, then the scratch 64 bytes in. */
static pthread_key_t FN(ws_key);
static int FN(ws_key_ok);
static pthread_once_t FN(ws_once) = PTHREAD_ONCE_INIT;
static void FN(ws_key_make)(void) { FN(ws_key_ok) = pthread_key_create(&FN(ws_key), free) == 0; }
static void *FN(workspace)(size_t n) {
    (void)pthread_once(&FN(ws_once), FN(ws_key_make));
    if (!FN(ws_key_ok)) return NULL;   /* no key left (PTHREAD_KEYS_MAX): the call fails as out of memory */
    size_t *b = (size_t *)pthread_getspecific(FN(ws_key));
    if (!b || b[0] < n) {
        free(b);
        (void)pthread_setspecific(FN(ws_key), NULL);
        b = (size_t *)malloc(n + 64);
        if (!b) return NULL;
        b[0] = n;
        if (pthread_setspecific(FN(ws_key), b)) { free(b); return NULL; }
    }
    return (char *)b + 64;
}

int NX_CAT(nx_blocks_forward, NX_SFX)(const nx_dims *d, const nx_block *blocks, int32_t n_blocks,
                                       void **kc, void **vc, int64_t pool_len, int32_t kv_type, float *x, int64_t T,
                                       const int64_t *pos, const int64_t *lslot, const int32_t *const *maps,
                                       const float *final_norm, double *stats, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (!d || !blocks || n_blocks < 1 || !kc || !vc || !x || T < 1 || T > 4096 || !pos || !lslot || !maps ||
        pool_len < 1 || (kv_type != 0 && kv_type != 1) || d->H < 1 || d->n_heads < 1 || d->n_kv < 1 ||
        d->n_heads % d->n_kv || d->head_dim < 1 || d->rope_half < 0 || 2 * d->rope_half > d->head_dim ||
        !d->rope_cos || !d->rope_sin)
        return -4;
    /* every row's position and every slot it writes or reads, checked before anything is written */
    int64_t smax = 0;
    for (int64_t t = 0; t < T; t++) {
        if (pos[t] < 0 || pos[t] >= d->rope_len || lslot[t] < 0 || lslot[t] >= pool_len || !maps[t]) return -4;
        for (int64_t j = 0; j <= lslot[t]; j++)
            if (maps[t][j] < 0 || maps[t][j] >= pool_len) return -4;
        if (lslot[t] + 1 > smax) smax = lslot[t] + 1;
    }
    const int64_t H = d->H, nh = d->n_heads, nkv = d->n_kv, hd = d->head_dim;
    if (d->kv_rank < 0 || (d->kv_rank > 0 && (d->v_dim < 1 || d->v_dim > (1 << 16)))) return -4;
    /* att holds the attention's output for wo: n_heads head_dim floats a row, or n_heads v_dim */
    const int64_t nq = d->kv_rank > 0 && nh * d->v_dim > nh * hd ? nh * d->v_dim : nh * hd;
    const int64_t nqkv = (nh + 2 * nkv) * hd;
    int64_t F2max = 0, Emax = 0, Kmax = 0;
    for (int32_t i = 0; i < n_blocks; i++) {
        const nx_block *b = &blocks[i];
        if (!FN(block_ok)(d, b) || !kc[i] || !vc[i]) return -4;
        if (b->ffn_gate_up.n_parts > 0 && FN(lin_rows)(&b->ffn_gate_up) > F2max) F2max = FN(lin_rows)(&b->ffn_gate_up);
        if (b->router_w && b->n_expert > Emax) Emax = b->n_expert;
        if (b->router_w && b->top_k > Kmax) Kmax = b->top_k;
    }
    /* scratch: h, qkv, attention out, a [T, H]-sized result, gate/up [T, 2F], silu(g)*u [T, F],
     * router scores [T, E], ids and weights [T, K], the routed output [T, H], attention scores
     * and PV sums (per thread: attend_scratch), attention's row runs [T + 1], an E-byte mark table */
    const int64_t ss = FN(attend_scratch)(smax, hd);
    const size_t nf = ((size_t)T * (size_t)(H + nqkv + nq + H + F2max + F2max / 2 + Emax + Kmax + H) +
                       (size_t)ss * (size_t)nthreads + 1) & ~(size_t)1;   /* even: the int64s after it align */
    float *ws = (float *)FN(workspace)(nf * sizeof(float) + (size_t)(T + 1) * sizeof(int64_t) +
                                       (size_t)T * (size_t)Kmax * sizeof(int32_t) + (size_t)Emax + 64);
    if (!ws) return -1;
    float *h = ws, *qkv = h + T * H, *att = qkv + T * nqkv, *y = att + T * nq, *gu = y + T * H;
    float *act = gu + T * F2max, *sc = act + T * (F2max / 2), *wts = sc + T * Emax, *ro = wts + T * Kmax;
    float *ascr = ro + T * H;
    int64_t *runs = (int64_t *)(ws + nf);
    int32_t *ids = (int32_t *)(runs + T + 1);
    uint8_t *mark = (uint8_t *)(ids + T * Kmax);
    double exp_s = 0.0, distinct = 0.0;
    int rc = 0;

    for (int32_t li = 0; li < n_blocks && !rc; li++) {
        const nx_block *b = &blocks[li];
        void *K = kc[li], *V = vc[li];
        /* attention */
        for (int64_t t = 0; t < T; t++) FN(rms_norm_row)(x + t * H, b->attn_norm, H, d->eps, h + t * H);
        if (d->kv_rank > 0) {   /* latent: att [T, n_heads v_dim] */
            if ((rc = FN(mla_rows)(d, b, h, T, K, kv_type, pos, lslot, maps, att, nthreads))) break;
            if ((rc = FN(lin_apply)(&b->wo, att, T, y, nthreads))) break;
            goto attended;
        }
        if ((rc = FN(lin_apply)(&b->qkv, h, T, qkv, nthreads))) break;
        for (int64_t t = 0; t < T; t++) {
            float *r = qkv + t * nqkv;
            const float *C = d->rope_cos + pos[t] * hd, *S = d->rope_sin + pos[t] * hd;
            const int64_t half = d->rope_half;
            for (int64_t hh = 0; hh < nh + nkv; hh++) {   /* q's heads, then k's */
                float *v = r + hh * hd;
                if (b->qk_norm) FN(rms_norm_row)(v, b->qk_norm + hh * hd, hd, d->eps, v);
                for (int64_t i = 0; i < half; i++) {
                    const float a = v[i], c = v[i + half];
                    v[i] = a * C[i] + c * S[i];
                    v[i + half] = c * C[i + half] + a * S[i + half];
                }
            }
            const int64_t slot = maps[t][lslot[t]], nk = nkv * hd;
            if (kv_type == 1) {
                FN(to_f16)(r + nq, (uint16_t *)K + slot * nk, nk);
                FN(to_f16)(r + nq + nk, (uint16_t *)V + slot * nk, nk);
            } else {
                memcpy((float *)K + slot * nk, r + nq, (size_t)nk * sizeof(float));
                memcpy((float *)V + slot * nk, r + nq + nk, (size_t)nk * sizeof(float));
            }
        }
        FN(attend)(d, qkv, T, K, V, kv_type, lslot, maps, att, ascr, smax, runs, nthreads);
        if ((rc = FN(lin_apply)(&b->wo, att, T, y, nthreads))) break;
    attended:
        for (int64_t i = 0; i < T * H; i++) x[i] = x[i] + y[i];
        for (int64_t t = 0; t < T; t++) FN(rms_norm_row)(x + t * H, b->post_norm, H, d->eps, h + t * H);
        /* FFN */
        if (!b->router_w) {
            if ((rc = FN(ffn)(b, h, T, gu, act, y, nthreads))) break;
            for (int64_t i = 0; i < T * H; i++) x[i] = x[i] + y[i];
            continue;
        }
        const int64_t E = b->n_expert, KK = b->top_k;
        for (int64_t t = 0; t < T; t++) {
            float *s = sc + t * E;
            for (int64_t e = 0; e < E; e++) s[e] = 1.0f / (1.0f + expf(-FN(dot_f)(b->router_w + e * H, h + t * H, H)));
            FN(route_row)(s, b->router_b, E, KK, b->norm_topk, b->scale, ids + t * KK, wts + t * KK, mark);
        }
        memset(mark, 0, (size_t)E);
        for (int64_t p = 0; p < T * KK; p++)
            if (!mark[ids[p]]) { mark[ids[p]] = 1; distinct += 1.0; }
        const double t0 = FN(now_s)();
        rc = NX_CAT(nx_moe_forward, NX_SFX)(h, T, ids, wts, KK, &b->exp_gate, &b->exp_up, &b->exp_down, ro, nthreads);
        exp_s += FN(now_s)() - t0;
        if (rc) break;
        if (b->ffn_gate_up.n_parts > 0) {
            if ((rc = FN(ffn)(b, h, T, gu, act, y, nthreads))) break;
            for (int64_t i = 0; i < T * H; i++) x[i] = x[i] + (ro[i] + y[i]);
        } else {
            for (int64_t i = 0; i < T * H; i++) x[i] = x[i] + ro[i];
        }
    }
    if (!rc && final_norm)
        for (int64_t t = 0; t < T; t++) FN(rms_norm_row)(x + t * H, final_norm, H, d->eps, x + t * H);
    if (stats) { stats[0] += exp_s; stats[1] += distinct; }
    return rc;
}

/* n floats -> float16 bits, as the F16 KV cache stores them (tests check it against numpy) */
int NX_CAT(nx_to_f16, NX_SFX)(const float *x, uint16_t *out, int64_t n) {
    if (!x || !out || n < 0) return -4;
    FN(to_f16)(x, out, n);
    return 0;
}

/* The multiply units' rate, for benchmarks' floors (`nextn bench linear`'s "floor" column):
 * kind 0: int8 multiply-adds a second through the integer dot the dense kernels use (VNNI
 * vpdpbusd on the AVX-512 path, maddubs + madd + add on AVX2; 32 per 256-bit step), kind 1:
 * float32 FMA lanes a second (256-bit FMAs). Each of nthreads threads runs n steps of 12
 * independent chains; the rate is all threads' work over the wall time. 0 on the ref path. */
double NX_CAT(nx_peak_rate, NX_SFX)(int kind, int64_t n, int nthreads) {
#if NX_PATH >= 1
    if ((kind != 0 && kind != 1) || n < 1 || nthreads < 1) return -1.0;
    const double t0 = FN(now_s)();
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
    {
        if (kind == 0) {
            __m256i a[12];
            __m256i u = _mm256_set1_epi8(3);
            const __m256i s = _mm256_set1_epi8(5);
            for (int i = 0; i < 12; i++) a[i] = _mm256_setzero_si256();
            for (int64_t k = 0; k < n; k++) {
#pragma GCC unroll 12
                for (int i = 0; i < 12; i++) {
#if NX_PATH == 2
                    a[i] = _mm256_dpbusd_epi32(a[i], u, s);
#else
                    a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
                }
                __asm__ volatile("" : "+x"(u));
            }
            __m256i z = a[0];
            for (int i = 1; i < 12; i++) z = _mm256_add_epi32(z, a[i]);
            bad |= _mm256_extract_epi32(z, 0) != (int32_t)(12 * 60 * n);   /* 4 lanes of 3 * 5, each chain */
        } else {
            __m256 a[12];
            __m256 u = _mm256_set1_ps(1.0f);
            const __m256 s = _mm256_set1_ps(0.0f);
            for (int i = 0; i < 12; i++) a[i] = _mm256_setzero_ps();
            for (int64_t k = 0; k < n; k++) {
#pragma GCC unroll 12
                for (int i = 0; i < 12; i++) a[i] = _mm256_fmadd_ps(u, s, a[i]);
                __asm__ volatile("" : "+x"(u));
            }
            __m256 z = a[0];
            for (int i = 1; i < 12; i++) z = _mm256_add_ps(z, a[i]);
            bad |= _mm256_cvtss_f32(z) != 0.0f;
        }
    }
    const double dt = FN(now_s)() - t0;
    if (bad || dt <= 0) return -1.0;
    return (double)nthreads * (double)n * 12.0 * (kind == 0 ? 32.0 : 8.0) / dt;
#else
    (void)kind; (void)n; (void)nthreads;
    return 0.0;
#endif
}
