/* nextn CPU expert kernels: the fused MoE forward, written once and compiled once per SIMD path.
 *
 * Included by moe_ref.c (NX_PATH 0, portable C), moe_avx2.c (NX_PATH 1, under
 * `#pragma GCC target("avx2,fma,f16c")`) and moe_avx512.c (NX_PATH 2, AVX-512 BW/VL/VNNI).
 * Everything here is `static`, so every path gets its own copy of the row unpackers and the
 * activation quantizers, auto-vectorised for that path's ISA; only the dot-product cores are
 * written with intrinsics (#if NX_PATH ...).  NX_SFX names the exported entry point.
 *
 * Algorithm of one call (see moe_kernels.h for the canonical block forms):
 *   1. check the expert ids (-3 before anything is written), counting-sort the T*K (token, slot)
 *      pairs by expert; experts without tokens are skipped
 *   2. quantize every token's x once (Q8_K-like 256-blocks with per-16 sums for K-quant gate/up,
 *      Q8_0-like 32-blocks otherwise), reused by all experts; small T before the threads start
 *   3. phase 1, parallel (dynamic) over (active expert, block of I rows aligned to the down
 *      activations' blocks): every gate/up row is dotted against all tokens routed to that expert,
 *      so an expert's weights are read from memory once per call whatever T is.  SIMD paths use
 *      fused kernels (fused_dot) for Q8_0 Q4_0 Q5_0 IQ4_NL Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_XS: integer
 *      maddubs/madd dots straight on the packed blocks, 1-4 tokens per pass over the row, block
 *      scales per sub-block, mins / zero points through the activations' block sums.  Other types
 *      (and the ref path for all types) decode the row into an L1 scratch and dot that.
 *      The unit then computes a = silu(g) * u for its rows and quantizes its blocks for down.
 *   4. phase 2, parallel (dynamic) over blocks of H rows of `out`: for each active expert, dot each
 *      down row with that expert's pairs and accumulate w_pair * dot into out[t, row]; every output
 *      element is owned by one unit and summed in a fixed order (deterministic, independent of the
 *      thread count, no atomics)
 *   One parallel region, one barrier between the phases; calls with under ~16 KiB of work per
 *   thread use fewer threads (nx_min_work_per_thread, dispatch.c).
 * All scratch is allocated once per call, before the hot loops.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <pthread.h>

#if NX_PATH >= 1
#include <immintrin.h>
#endif

#define NX_CAT2(a, b) a##_##b
#define NX_CAT(a, b) NX_CAT2(a, b)
#define FN(name) NX_CAT(name, NX_SFX)

/* ------------------------------------------------------------------ scalar helpers */
static inline float FN(bits2f)(uint32_t w) { float f; memcpy(&f, &w, 4); return f; }
static inline uint32_t FN(f2bits)(float f) { uint32_t w; memcpy(&w, &f, 4); return w; }

/* IEEE binary16 -> binary32, exact for all inputs (normal, subnormal, inf, nan) */
static inline float FN(h2f)(uint16_t h) {
#if NX_PATH >= 1
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return FN(bits2f)(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {                                   /* zero or subnormal: man * 2^-24 */
        float v = (float)man * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return FN(bits2f)(sign | ((exp + 112u) << 23) | (man << 13));
#endif
}
#define H2F(x) FN(h2f)(x)

/* binary32 -> binary16, round to nearest even (as torch's .to(float16) and numpy's astype), for
 * the F16 KV cache. The SIMD paths use F16C's conversion; the reference path forms the same bits:
 * a subnormal half by one float add whose rounding is the half's (0.5 has the ulp of a half
 * subnormal, 2^-24), a normal one by adding the rounding bias with the tie broken to even. */
static inline uint16_t FN(f2h)(float f) {
#if NX_PATH >= 1
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    const uint32_t x = FN(f2bits)(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);        /* nan: a quiet nan */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);       /* >= 65520 (or inf): inf */
    if (ax < 0x38800000u) {                                          /* below 2^-14: subnormal or 0 */
        const float v = FN(bits2f)(ax) + 0.5f;
        return (uint16_t)(sign | (FN(f2bits)(v) - 0x3f000000u));
    }
    const uint32_t odd = (ax >> 13) & 1u;
    return (uint16_t)(sign | ((ax + 0xc8000fffu + odd) >> 13));      /* rebias 127 -> 15, round */
#endif
}

static inline uint16_t FN(rd16)(const void *p) { uint16_t v; memcpy(&v, p, 2); return v; }

static const int8_t FN(kvalues)[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                       1, 13, 25, 38, 53, 69, 89, 113};

static inline int FN(has_fused)(int type);
static inline int FN(family)(int type) {
    switch (type) {
    case NX_F32: case NX_F16: case NX_BF16: return NX_FAM_F;
    case NX_Q8_0: case NX_Q4_0: case NX_Q4_1: case NX_Q5_0: case NX_Q5_1: case NX_IQ4_NL: return NX_FAM_B32;
    /* the repacked layouts' fused dots read word-transposed activations; the generic path unpacks
     * their blocks back to ggml's order and takes plain ones */
    case NX_Q5_0_R8: case NX_Q8_0_R8: case NX_Q4_0_R8: case NX_IQ4_NL_R8: return FN(has_fused)(type) ? NX_FAM_B32R : NX_FAM_B32;
    case NX_Q4_K_R8: case NX_Q5_K_R8: case NX_IQ4_XS_R8: return FN(has_fused)(type) ? NX_FAM_KR : NX_FAM_K;
    case NX_Q2_K_R8: case NX_Q3_K_R8: case NX_Q6_K_R8: return FN(has_fused)(type) ? NX_FAM_K16R : NX_FAM_K;
    default: return NX_FAM_K;
    }
}
/* the canonical (unpacked) form a family's rows decode to: the transposed families' are their
 * plain families' */
static inline int FN(canon)(int fam) {
    return fam == NX_FAM_KR || fam == NX_FAM_K16R ? NX_FAM_K : fam == NX_FAM_B32R ? NX_FAM_B32 : fam;
}
static inline int FN(is_signed)(int type) {
    return type == NX_Q8_0 || type == NX_IQ4_NL || type == NX_IQ4_XS || type == NX_Q8_0_R8 || type == NX_IQ4_NL_R8 ||
           type == NX_IQ4_XS_R8;
}
/* bytes of one row in canonical (unpacked / activation) form */
static inline size_t FN(unpacked_bytes)(int fam, int64_t n) {
    fam = FN(canon)(fam);
    return fam == NX_FAM_F ? (size_t)n * 4 : fam == NX_FAM_B32 ? (size_t)(n / 32) * sizeof(ub32)
                                                               : (size_t)(n / 256) * sizeof(uk256);
}
static inline size_t FN(act_bytes)(int fam, int64_t n) {
    fam = FN(canon)(fam);
    return fam == NX_FAM_F ? (size_t)n * 4 : fam == NX_FAM_B32 ? (size_t)(n / 32) * sizeof(ab32)
                                                               : (size_t)(n / 256) * sizeof(ak256);
}

/* ------------------------------------------------------------------ row unpackers */
#if NX_PATH >= 1
static inline __m256i FN(ld256)(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline void FN(st256)(void *p, __m256i v) { _mm256_storeu_si256((__m256i *)p, v); }
/* 16 packed bytes -> 32 bytes: 16 low nibbles, then 16 high nibbles */
static inline __m256i FN(nib32)(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}
/* 32-bit mask -> 32 bytes, byte j = `val` if bit j is set else 0 */
static inline __m256i FN(bits32)(uint32_t bits, int8_t val) {
    const __m256i shuf = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL);
    const __m256i bm = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bm), bm);
    return _mm256_and_si256(v, _mm256_set1_epi8(val));
}
/* bytes of v with bit `bit` set -> `val`, else 0 */
static inline __m256i FN(bitsel)(__m256i v, int bit, int8_t val) {
    const __m256i m = _mm256_set1_epi8((char)(1 << bit));
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, m), m), _mm256_set1_epi8(val));
}
#define NX_M(v, k) _mm256_and_si256(v, _mm256_set1_epi8(k))
#define NX_SR(v, k) _mm256_srli_epi16(v, k)
#define NX_SL(v, k) _mm256_slli_epi16(v, k)
#define NX_OR(a, b) _mm256_or_si256(a, b)
#endif

/* B32 rows are stored structure-of-arrays: q[32*nb] int8, then d[nb] floats, then off[nb] floats */
static void FN(unpack_b32)(int type, const uint8_t *src, int64_t nb, uint8_t *restrict base) {
    /* repacked layouts (generic path, and dequantization: the SIMD paths dot them fused): each
     * block back in its ggml form first */
    const uint8_t *const row = src;
    const int r8 = type == NX_Q5_0_R8 ? 1 : type == NX_Q8_0_R8 || type == NX_Q4_0_R8 || type == NX_IQ4_NL_R8 ? 2 : 0;
    const int rtype = type;
    uint8_t blk[34];
    if (r8) type = type - 100;
    int8_t *restrict qb = (int8_t *)base;
    float *restrict dv = (float *)(base + 32 * nb), *restrict ov = dv + nb;
    const size_t bs = type == NX_Q8_0 ? 34 : type == NX_Q4_1 ? 20 : type == NX_Q5_0 ? 22 : type == NX_Q5_1 ? 24 : 18;
    const int has_m = type == NX_Q4_1 || type == NX_Q5_1;
    const float zp = type == NX_Q4_0 ? -8.0f : type == NX_Q5_0 ? -16.0f : 0.0f;
#if NX_PATH >= 1
    const __m256i kv = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)FN(kvalues)));
#endif
    for (int64_t i = 0; i < nb; i++) {
        if (r8 == 1) { nx_r8_block(row, nb, i, blk); src = blk; }
        else if (r8 == 2) { nx_b32r_block(rtype, row, nb, i, blk); src = blk; }
        else if (i) src += bs;
        const float d = H2F(FN(rd16)(src));
        dv[i] = d;
        ov[i] = has_m ? H2F(FN(rd16)(src + 2)) : zp * d;
        int8_t *restrict q = qb + 32 * i;
        switch (type) {
        case NX_Q8_0: memcpy(q, src + 2, 32); break;
        case NX_Q4_0: case NX_Q4_1: {
            const uint8_t *qs = src + 2 + 2 * has_m;
#if NX_PATH >= 1
            FN(st256)(q, FN(nib32)(qs));
#else
            for (int j = 0; j < 16; j++) { q[j] = qs[j] & 15; q[j + 16] = qs[j] >> 4; }
#endif
        } break;
        case NX_Q5_0: case NX_Q5_1: {
            const uint8_t *qhp = src + 2 + 2 * has_m, *qs = qhp + 4;
            uint32_t qh; memcpy(&qh, qhp, 4);
#if NX_PATH >= 1
            FN(st256)(q, NX_OR(FN(nib32)(qs), FN(bits32)(qh, 16)));
#else
            for (int j = 0; j < 16; j++) {
                q[j] = (int8_t)((qs[j] & 15) | (((qh >> j) & 1u) << 4));
                q[j + 16] = (int8_t)((qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4));
            }
#endif
        } break;
        case NX_IQ4_NL: {
            const uint8_t *qs = src + 2;
#if NX_PATH >= 1
            FN(st256)(q, _mm256_shuffle_epi8(kv, FN(nib32)(qs)));
#else
            for (int j = 0; j < 16; j++) { q[j] = FN(kvalues)[qs[j] & 15]; q[j + 16] = FN(kvalues)[qs[j] >> 4]; }
#endif
        } break;
        }
    }
}

static inline void FN(k4_scale_min)(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) { *sc = q[j] & 63; *m = q[j + 4] & 63; }
    else { *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4); *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

/* fill the per-lane scale vector from 16 per-group integer scales */
static inline void FN(expand_scales)(uk256 *restrict u, const int *sc) {
#if NX_PATH >= 1
    for (int g = 0; g < 16; g += 2)
        FN(st256)(u->scv + 8 * g, _mm256_set_m128i(_mm_set1_epi16((short)sc[g + 1]), _mm_set1_epi16((short)sc[g])));
#else
    for (int g = 0; g < 16; g++)
        for (int l = 0; l < 8; l++) u->scv[g * 8 + l] = (int16_t)sc[g];
#endif
}

static void FN(unpack_k)(int type, const uint8_t *restrict src, int64_t nb, uk256 *restrict u) {
    int sc[16];
    uint8_t blk[224];
    /* repacked layouts: each block back in its ggml form first */
    const int kr = type == NX_Q4_K_R8 || type == NX_Q5_K_R8 || type == NX_IQ4_XS_R8 ? 1 :
                   type == NX_Q2_K_R8 || type == NX_Q3_K_R8 ? 2 : type == NX_Q6_K_R8 ? 3 : 0;
    const int rtype = type;
    if (kr) type -= 100;
    const size_t bs = type == NX_Q2_K ? 84 : type == NX_Q3_K ? 110 : type == NX_Q4_K ? 144 :
                      type == NX_Q5_K ? 176 : type == NX_Q6_K ? 210 : 136;
#if NX_PATH >= 1
    const __m256i kv = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)FN(kvalues)));
#endif
    for (int64_t i = 0; i < nb; i++, u++, src += bs) {
        int8_t *restrict q = u->q;
        const uint8_t *const row_src = src;
        if (kr == 1) { nx_k4r_block(rtype, src, blk); src = blk; }
        else if (kr == 2) { nx_k16r_block(rtype, src, blk); src = blk; }
        else if (kr == 3) { nx_q6kr_block(src, blk); src = blk; }
        switch (type) {
        case NX_Q2_K: {
            const blk_q2_K *b = (const blk_q2_K *)src;
            float d = H2F(FN(rd16)(&b->d)), dmin = H2F(FN(rd16)(&b->dmin));
            for (int g = 0; g < 16; g++) { sc[g] = b->scales[g] & 15; u->off[g] = -dmin * (float)(b->scales[g] >> 4); }
#if NX_PATH >= 1
            for (int n = 0; n < 2; n++) {
                __m256i v = FN(ld256)(b->qs + 32 * n);
                for (int j = 0; j < 4; j++) FN(st256)(q + n * 128 + j * 32, NX_M(NX_SR(v, 2 * j), 3));
            }
#else
            for (int n = 0; n < 2; n++)
                for (int j = 0; j < 4; j++)
                    for (int l = 0; l < 32; l++) q[n * 128 + j * 32 + l] = (b->qs[n * 32 + l] >> (2 * j)) & 3;
#endif
            u->d = d;
        } break;
        case NX_Q3_K: {
            const blk_q3_K *b = (const blk_q3_K *)src;
            float d = H2F(FN(rd16)(&b->d));
            uint32_t aux[4];
            memcpy(aux, b->scales, 12);
            uint32_t tmp = aux[2];
            aux[2] = ((aux[0] >> 4) & 0x0f0f0f0fu) | (((tmp >> 4) & 0x03030303u) << 4);
            aux[3] = ((aux[1] >> 4) & 0x0f0f0f0fu) | (((tmp >> 6) & 0x03030303u) << 4);
            aux[0] = (aux[0] & 0x0f0f0f0fu) | (((tmp >> 0) & 0x03030303u) << 4);
            aux[1] = (aux[1] & 0x0f0f0f0fu) | (((tmp >> 2) & 0x03030303u) << 4);
            const uint8_t *s6 = (const uint8_t *)aux;
            for (int g = 0; g < 16; g++) { sc[g] = (int)s6[g] - 32; u->off[g] = -4.0f * d * (float)sc[g]; }
#if NX_PATH >= 1
            const __m256i hm = FN(ld256)(b->hmask);
            for (int n = 0; n < 2; n++) {
                __m256i v = FN(ld256)(b->qs + 32 * n);
                for (int j = 0; j < 4; j++)
                    FN(st256)(q + n * 128 + j * 32, NX_OR(NX_M(NX_SR(v, 2 * j), 3), FN(bitsel)(hm, n * 4 + j, 4)));
            }
#else
            for (int n = 0; n < 2; n++)
                for (int j = 0; j < 4; j++)
                    for (int l = 0; l < 32; l++)
                        q[n * 128 + j * 32 + l] = (int8_t)(((b->qs[n * 32 + l] >> (2 * j)) & 3) |
                                                           (((b->hmask[l] >> (n * 4 + j)) & 1) << 2));
#endif
            u->d = d;
        } break;
        case NX_Q4_K: case NX_Q5_K: {
            float d = H2F(FN(rd16)(src)), dmin = H2F(FN(rd16)(src + 2));
            const uint8_t *scales = src + 4;
            const uint8_t *qh = src + 16;
            const uint8_t *qs = type == NX_Q4_K ? src + 16 : src + 48;
            for (int s = 0; s < 8; s++) {
                int a, m;
                FN(k4_scale_min)(s, scales, &a, &m);
                sc[2 * s] = sc[2 * s + 1] = a;
                u->off[2 * s] = u->off[2 * s + 1] = -dmin * (float)m;
            }
#if NX_PATH >= 1
            if (type == NX_Q4_K) {
                for (int j = 0; j < 4; j++) {
                    __m256i v = FN(ld256)(qs + 32 * j);
                    FN(st256)(q + 64 * j, NX_M(v, 15));
                    FN(st256)(q + 64 * j + 32, NX_M(NX_SR(v, 4), 15));
                }
            } else {
                const __m256i h = FN(ld256)(qh);
                for (int j = 0; j < 4; j++) {
                    __m256i v = FN(ld256)(qs + 32 * j);
                    FN(st256)(q + 64 * j, NX_OR(NX_M(v, 15), FN(bitsel)(h, 2 * j, 16)));
                    FN(st256)(q + 64 * j + 32, NX_OR(NX_M(NX_SR(v, 4), 15), FN(bitsel)(h, 2 * j + 1, 16)));
                }
            }
#else
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 32; l++) { q[64 * j + l] = qs[32 * j + l] & 15; q[64 * j + 32 + l] = qs[32 * j + l] >> 4; }
            if (type == NX_Q5_K)
                for (int s = 0; s < 8; s++)
                    for (int l = 0; l < 32; l++) q[32 * s + l] |= (int8_t)(((qh[l] >> s) & 1) << 4);
#endif
            u->d = d;
        } break;
        case NX_Q6_K: {
            const blk_q6_K *b = (const blk_q6_K *)src;
            float d = H2F(FN(rd16)(&b->d));
            for (int g = 0; g < 16; g++) { sc[g] = b->scales[g]; u->off[g] = -32.0f * d * (float)sc[g]; }
            for (int n = 0; n < 2; n++) {
                const uint8_t *ql = b->ql + 64 * n, *qh = b->qh + 32 * n;
                int8_t *qq = q + 128 * n;
#if NX_PATH >= 1
                __m256i l0 = FN(ld256)(ql), l1 = FN(ld256)(ql + 32), h = FN(ld256)(qh);
                FN(st256)(qq, NX_OR(NX_M(l0, 15), NX_SL(NX_M(h, 3), 4)));
                FN(st256)(qq + 32, NX_OR(NX_M(l1, 15), NX_SL(NX_M(NX_SR(h, 2), 3), 4)));
                FN(st256)(qq + 64, NX_OR(NX_M(NX_SR(l0, 4), 15), NX_SL(NX_M(NX_SR(h, 4), 3), 4)));
                FN(st256)(qq + 96, NX_OR(NX_M(NX_SR(l1, 4), 15), NX_SL(NX_M(NX_SR(h, 6), 3), 4)));
#else
                for (int l = 0; l < 32; l++) {
                    qq[l] = (int8_t)((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4));
                    qq[l + 32] = (int8_t)((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4));
                    qq[l + 64] = (int8_t)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
                    qq[l + 96] = (int8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
                }
#endif
            }
            u->d = d;
        } break;
        case NX_IQ4_XS: {
            const blk_iq4_xs *b = (const blk_iq4_xs *)src;
            float d = H2F(FN(rd16)(&b->d));
            uint16_t sh = FN(rd16)(&b->scales_h);
            for (int ib = 0; ib < 8; ib++) {
                int ls = ((b->scales_l[ib / 2] >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4);
                sc[2 * ib] = sc[2 * ib + 1] = ls - 32;
                u->off[2 * ib] = u->off[2 * ib + 1] = 0.0f;
#if NX_PATH >= 1
                FN(st256)(q + 32 * ib, _mm256_shuffle_epi8(kv, FN(nib32)(b->qs + 16 * ib)));
#else
                for (int j = 0; j < 16; j++) {
                    q[32 * ib + j] = FN(kvalues)[b->qs[16 * ib + j] & 15];
                    q[32 * ib + 16 + j] = FN(kvalues)[b->qs[16 * ib + j] >> 4];
                }
#endif
            }
            u->d = d;
        } break;
        default:
            memset(sc, 0, sizeof(sc));
        }
        FN(expand_scales)(u, sc);
        src = row_src;
    }
}

/* decode one row; returns the canonical row (for F32 the source itself) */
static inline const void *FN(prep_row)(int type, int fam, const uint8_t *src, int64_t n, void *scratch) {
    fam = FN(canon)(fam);
    if (fam == NX_FAM_B32) { FN(unpack_b32)(type, src, n / 32, (uint8_t *)scratch); return scratch; }
    if (fam == NX_FAM_K) { FN(unpack_k)(type, src, n / 256, (uk256 *)scratch); return scratch; }
    if (type == NX_F32) return src;
    float *f = (float *)scratch;
    if (type == NX_F16) {
        int64_t i = 0;
#if NX_PATH >= 1
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * i))));
#endif
        for (; i < n; i++) f[i] = H2F(FN(rd16)(src + 2 * i));
    } else { /* BF16 */
        for (int64_t i = 0; i < n; i++) f[i] = FN(bits2f)((uint32_t)FN(rd16)(src + 2 * i) << 16);
    }
    return scratch;
}

/* ------------------------------------------------------------------ activation quantizers */
#if NX_PATH >= 1
/* max |x[j]| for j < n (n a multiple of 8) */
static inline float FN(amax_ps)(const float *x, int n) {
    const __m256 sm = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sm, _mm256_loadu_ps(x + j)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
/* y[j] = rint(x[j] * id) for j < 16 (|values| <= 127); returns their sum */
static inline int FN(rint_i8)(const float *x, float id, int8_t *y) {
    const __m256 iv = _mm256_set1_ps(id);
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), iv));
    const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), iv));
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8);
    _mm_storeu_si128((__m128i *)y, _mm_packs_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1)));
    __m256i s = _mm256_add_epi32(i0, i1);
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
    return _mm_cvtsi128_si32(h);
}
#endif
/* B32 activations, structure-of-arrays like the weights: y[32*nb], d[nb], s[nb] = d*sum(y).
 * Quantizes blocks b0..b1-1 of a row of nb blocks (x points at the row's start). */
static void FN(quant_b32)(const float *x, int64_t nb, int64_t b0, int64_t b1, uint8_t *base, const int tr) {
    int8_t *yb = (int8_t *)base;
    float *dv = (float *)(base + 32 * nb), *sv = dv + nb;
    /* NX_FAM_B32R: blocks in Q5_0_R8's groups (of 8, then one of 4) move, word w of block i to
     * byte 4*G*w + 4i of its group of G (moe_kernels.h) */
    const int64_t n8 = tr ? nb / 8 * 8 : 0, n4 = tr && nb - n8 >= 4 ? n8 + 4 : n8;
    for (int64_t b = b0; b < b1; b++) {
        const float *xb = x + 32 * b;
        int sum = 0;
        int8_t y[32];
#if NX_PATH >= 1
        /* the scalar code's values exactly (max is exact; x * id is the same float product;
         * cvtps rounds to nearest even as lrintf does), without a libm call per element */
        const float amax = FN(amax_ps)(xb, 32);
        const float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        sum = FN(rint_i8)(xb, id, y) + FN(rint_i8)(xb + 16, id, y + 16);
#else
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) { float v = fabsf(xb[j]); amax = v > amax ? v : amax; }
        float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int j = 0; j < 32; j++) { int v = (int)lrintf(xb[j] * id); y[j] = (int8_t)v; sum += v; }
#endif
        if (b < n4) {
            const int64_t g0 = b < n8 ? b / 8 * 8 : n8, G = b < n8 ? 8 : 4;
            for (int w = 0; w < 8; w++) memcpy(yb + 32 * g0 + 4 * G * w + 4 * (b - g0), y + 4 * w, 4);
        } else {
            memcpy(yb + 32 * b, y, 32);
        }
        dv[b] = d; sv[b] = d * (float)sum;
    }
}
static void FN(quant_k)(const float *x, int64_t b0, int64_t b1, ak256 *a) {
    for (int64_t b = b0; b < b1; b++) {
        const float *xb = x + 256 * b;
#if NX_PATH >= 1
        {   /* as quant_b32: the scalar code's values, vectorised */
            const float amax = FN(amax_ps)(xb, 256), id = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (int g = 0; g < 16; g++) a[b].bsum[g] = (int16_t)FN(rint_i8)(xb + 16 * g, id, a[b].y + 16 * g);
            for (int j = 0; j < 8; j++) a[b].bsum32[j] = (int16_t)(a[b].bsum[2 * j] + a[b].bsum[2 * j + 1]);
            a[b].d = amax / 127.0f;
            continue;
        }
#endif
        float amax = 0.0f;
        for (int j = 0; j < 256; j++) { float v = fabsf(xb[j]); amax = v > amax ? v : amax; }
        float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int j = 0; j < 256; j++) a[b].y[j] = (int8_t)lrintf(xb[j] * id);
        for (int g = 0; g < 16; g++) {
            int sum = 0;
            for (int j = 0; j < 16; j++) sum += a[b].y[16 * g + j];
            a[b].bsum[g] = (int16_t)sum;
        }
        for (int j = 0; j < 8; j++) a[b].bsum32[j] = (int16_t)(a[b].bsum[2 * j] + a[b].bsum[2 * j + 1]);
        a[b].d = amax / 127.0f;
    }
}
/* NX_FAM_KR: each block's y as 8 x 8 four-byte words, transposed: word r of sub-block i (elements
 * 32i+4r..+3) moves to word i of register r, matching Q4_K_R8's codes (moe_kernels.h) */
static void FN(transpose_k)(ak256 *a, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        uint32_t w[64], *y = (uint32_t *)(void *)a[b].y;
        memcpy(w, a[b].y, 256);
        for (int r = 0; r < 8; r++)
            for (int i = 0; i < 8; i++) y[8 * r + i] = w[8 * i + r];
    }
}
/* NX_FAM_K16R: each block's y as 16 x 8 two-byte words, transposed: word r of sub-block j
 * (elements 16j+2r, +1) moves to word j of register r, matching Q2_K_R8 / Q3_K_R8 */
static void FN(transpose_k16)(ak256 *a, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        uint16_t w[128], *y = (uint16_t *)(void *)a[b].y;
        memcpy(w, a[b].y, 256);
        for (int r = 0; r < 8; r++)
            for (int j = 0; j < 16; j++) y[16 * r + j] = w[8 * j + r];
    }
}
/* quantize elements i0..i1-1 (block-aligned) of a row of n (float family: copy) */
static inline void FN(quant_act_range)(int fam, const float *x, int64_t n, int64_t i0, int64_t i1, void *dst) {
    if (fam == NX_FAM_B32 || fam == NX_FAM_B32R) FN(quant_b32)(x, n / 32, i0 / 32, i1 / 32, (uint8_t *)dst, fam == NX_FAM_B32R);
    else if (fam == NX_FAM_K) FN(quant_k)(x, i0 / 256, i1 / 256, (ak256 *)dst);
    else if (fam == NX_FAM_KR) { FN(quant_k)(x, i0 / 256, i1 / 256, (ak256 *)dst); FN(transpose_k)((ak256 *)dst, i0 / 256, i1 / 256); }
    else if (fam == NX_FAM_K16R) { FN(quant_k)(x, i0 / 256, i1 / 256, (ak256 *)dst); FN(transpose_k16)((ak256 *)dst, i0 / 256, i1 / 256); }
    else memcpy((float *)dst + i0, x + i0, (size_t)(i1 - i0) * 4);
}
static inline void FN(quant_act)(int fam, const float *x, int64_t n, void *dst) {
    FN(quant_act_range)(fam, x, n, 0, n, dst);
}

/* ------------------------------------------------------------------ dot cores */
#if NX_PATH >= 1
static inline float FN(hsum256)(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static inline float FN(dot_f)(const float *w, const float *x, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if NX_PATH >= 1
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    s = FN(hsum256)(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#else
    float p[8] = {0};
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) p[j] += w[i + j] * x[i + j];
    for (int j = 0; j < 8; j++) s += p[j];
#endif
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

#if NX_PATH >= 1
/* res[t] = an F16 row against the float row x[t], for t < nt (1..4), straight from the halves: the
 * same conversions (vcvtph2ps is exact, as H2F) and each token's sum in the order of prep_row +
 * dot_f, so the same bits, without the row's trip through scratch memory; the halves are
 * converted once per pass and the tokens' independent accumulator chains overlap (the dense F16
 * weights of small models at decode are latency-bound, not bandwidth-bound) */
static inline __attribute__((always_inline)) void FN(dot_f16_nt)(const uint8_t *w, const float *const *x, int64_t n,
                                                                 float *res, const int nt) {
    int64_t i = 0;
    __m256 a[4][4];
    for (int t = 0; t < nt; t++) a[t][0] = a[t][1] = a[t][2] = a[t][3] = _mm256_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        __m256 h[4];
        for (int k = 0; k < 4; k++) h[k] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 2 * (i + 8 * k))));
        for (int t = 0; t < nt; t++)
            for (int k = 0; k < 4; k++) a[t][k] = _mm256_fmadd_ps(h[k], _mm256_loadu_ps(x[t] + i + 8 * k), a[t][k]);
    }
    for (int t = 0; t < nt; t++) {
        float s = FN(hsum256)(_mm256_add_ps(_mm256_add_ps(a[t][0], a[t][1]), _mm256_add_ps(a[t][2], a[t][3])));
        int64_t j = i;
        for (; j + 8 <= n; j += 8) {
            float f[8];
            _mm256_storeu_ps(f, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 2 * j))));
            for (int q = 0; q < 8; q++) s += f[q] * x[t][j + q];
        }
        for (; j < n; j++) s += H2F(FN(rd16)(w + 2 * j)) * x[t][j];
        res[t] = s;
    }
}
#endif

/* sum over 32-blocks of d_w*d_a*sum(q*y) + off_w*s_a  (SoA rows, see unpack_b32 / quant_b32) */
static inline __attribute__((always_inline)) float FN(dot_b32_t)(const uint8_t *wb, const uint8_t *ab, int64_t nb, const int sgn) {
    const int8_t *q = (const int8_t *)wb, *y = (const int8_t *)ab;
    const float *dw = (const float *)(wb + 32 * nb), *ow = dw + nb;
    const float *da = (const float *)(ab + 32 * nb), *sa = da + nb;
    int64_t b = 0;
    float s = 0.0f;
#if NX_PATH >= 1
    __m256 acc = _mm256_setzero_ps(), acco = acc;
#if NX_PATH == 1
    const __m256i ones = _mm256_set1_epi16(1);
#define NX_ISUM(qv, yv) _mm256_madd_epi16(_mm256_maddubs_epi16(qv, yv), ones)
#else
#define NX_ISUM(qv, yv) _mm256_dpbusd_epi32(_mm256_setzero_si256(), qv, yv)
#endif
    for (; b + 8 <= nb; b += 8) {
        __m256i r[8];
        for (int j = 0; j < 8; j++) {
            __m256i qv = _mm256_loadu_si256((const __m256i *)(q + 32 * (b + j)));
            __m256i yv = _mm256_loadu_si256((const __m256i *)(y + 32 * (b + j)));
            if (sgn) { yv = _mm256_sign_epi8(yv, qv); qv = _mm256_abs_epi8(qv); }
            r[j] = NX_ISUM(qv, yv);
        }
        /* 8 vectors of 8 partial sums -> one vector of 8 block sums */
        __m256i h01 = _mm256_hadd_epi32(r[0], r[1]), h23 = _mm256_hadd_epi32(r[2], r[3]);
        __m256i h45 = _mm256_hadd_epi32(r[4], r[5]), h67 = _mm256_hadd_epi32(r[6], r[7]);
        __m256i h03 = _mm256_hadd_epi32(h01, h23), h47 = _mm256_hadd_epi32(h45, h67);
        __m256i tot = _mm256_add_epi32(_mm256_permute2x128_si256(h03, h47, 0x20), _mm256_permute2x128_si256(h03, h47, 0x31));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tot), _mm256_mul_ps(_mm256_loadu_ps(dw + b), _mm256_loadu_ps(da + b)), acc);
        acco = _mm256_fmadd_ps(_mm256_loadu_ps(ow + b), _mm256_loadu_ps(sa + b), acco);
    }
    s = FN(hsum256)(_mm256_add_ps(acc, acco));
    for (; b < nb; b++) {
        __m256i qv = _mm256_loadu_si256((const __m256i *)(q + 32 * b));
        __m256i yv = _mm256_loadu_si256((const __m256i *)(y + 32 * b));
        if (sgn) { yv = _mm256_sign_epi8(yv, qv); qv = _mm256_abs_epi8(qv); }
        __m256i r = NX_ISUM(qv, yv);
        __m128i r4 = _mm_add_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        r4 = _mm_hadd_epi32(r4, r4); r4 = _mm_hadd_epi32(r4, r4);
        s += dw[b] * da[b] * (float)_mm_cvtsi128_si32(r4) + ow[b] * sa[b];
    }
#undef NX_ISUM
#else
    (void)sgn;
    for (; b < nb; b++) {
        int isum = 0;
        for (int j = 0; j < 32; j++) isum += (int)q[32 * b + j] * (int)y[32 * b + j];
        s += dw[b] * da[b] * (float)isum + ow[b] * sa[b];
    }
#endif
    return s;
}

/* sum over 256-blocks of d_a * (d_w * sum_lanes(scv * maddubs(q, y)) + sum_g off_g * bs_g) */
static inline __attribute__((always_inline)) float FN(dot_k_t)(const uk256 *w, const ak256 *a, int64_t nb, const int sgn) {
    float s = 0.0f;
#if NX_PATH == 2
    __m512 acc = _mm512_setzero_ps(), acco = acc;
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t b = 0; b < nb; b++) {
        __m512i isum = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            __m512i q = _mm512_loadu_si512((const void *)(w[b].q + 64 * c));
            __m512i y = _mm512_loadu_si512((const void *)(a[b].y + 64 * c));
            if (sgn) {
                __mmask64 neg = _mm512_movepi8_mask(q);
                y = _mm512_mask_sub_epi8(y, neg, zero, y);
                q = _mm512_abs_epi8(q);
            }
            __m512i p = _mm512_maddubs_epi16(q, y);
            isum = _mm512_dpwssd_epi32(isum, p, _mm512_loadu_si512((const void *)(w[b].scv + 32 * c)));
        }
        __m512 ad = _mm512_set1_ps(a[b].d);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(ad, _mm512_set1_ps(w[b].d)), acc);
        acco = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(w[b].off), _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)a[b].bsum)))), ad, acco);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(acc, acco));
#elif NX_PATH == 1
    __m256 acc = _mm256_setzero_ps(), acco = acc;
    for (int64_t b = 0; b < nb; b++) {
        __m256i isum0 = _mm256_setzero_si256(), isum1 = isum0;
        for (int c = 0; c < 8; c += 2) {
            __m256i q0 = _mm256_loadu_si256((const __m256i *)(w[b].q + 32 * c));
            __m256i y0 = _mm256_loadu_si256((const __m256i *)(a[b].y + 32 * c));
            __m256i q1 = _mm256_loadu_si256((const __m256i *)(w[b].q + 32 * c + 32));
            __m256i y1 = _mm256_loadu_si256((const __m256i *)(a[b].y + 32 * c + 32));
            if (sgn) {
                y0 = _mm256_sign_epi8(y0, q0); q0 = _mm256_abs_epi8(q0);
                y1 = _mm256_sign_epi8(y1, q1); q1 = _mm256_abs_epi8(q1);
            }
            __m256i p0 = _mm256_maddubs_epi16(q0, y0), p1 = _mm256_maddubs_epi16(q1, y1);
            isum0 = _mm256_add_epi32(isum0, _mm256_madd_epi16(p0, _mm256_loadu_si256((const __m256i *)(w[b].scv + 16 * c))));
            isum1 = _mm256_add_epi32(isum1, _mm256_madd_epi16(p1, _mm256_loadu_si256((const __m256i *)(w[b].scv + 16 * c + 16))));
        }
        __m256 ad = _mm256_set1_ps(a[b].d);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(isum0, isum1)), _mm256_mul_ps(ad, _mm256_set1_ps(w[b].d)), acc);
        const __m256 bs0 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)a[b].bsum)));
        const __m256 bs1 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(a[b].bsum + 8))));
        __m256 o = _mm256_mul_ps(_mm256_loadu_ps(w[b].off), bs0);
        o = _mm256_fmadd_ps(_mm256_loadu_ps(w[b].off + 8), bs1, o);
        acco = _mm256_fmadd_ps(o, ad, acco);
    }
    s = FN(hsum256)(_mm256_add_ps(acc, acco));
#else
    (void)sgn;
    for (int64_t b = 0; b < nb; b++) {
        int isum = 0;
        for (int i = 0; i < 128; i++)
            isum += (int)w[b].scv[i] * ((int)w[b].q[2 * i] * a[b].y[2 * i] + (int)w[b].q[2 * i + 1] * a[b].y[2 * i + 1]);
        float o = 0.0f;
        for (int g = 0; g < 16; g++) o += w[b].off[g] * (float)a[b].bsum[g];
        s += a[b].d * (w[b].d * (float)isum + o);
    }
#endif
    return s;
}

static float FN(dot_b32_s)(const uint8_t *w, const uint8_t *a, int64_t nb) { return FN(dot_b32_t)(w, a, nb, 1); }
static float FN(dot_b32_u)(const uint8_t *w, const uint8_t *a, int64_t nb) { return FN(dot_b32_t)(w, a, nb, 0); }
static float FN(dot_k_s)(const uk256 *w, const ak256 *a, int64_t nb) { return FN(dot_k_t)(w, a, nb, 1); }
static float FN(dot_k_u)(const uk256 *w, const ak256 *a, int64_t nb) { return FN(dot_k_t)(w, a, nb, 0); }

/* one canonical row against one activation row */
static inline float FN(dot_row)(int fam, int sgn, const void *w, const void *a, int64_t n) {
    if (fam == NX_FAM_K)
        return sgn ? FN(dot_k_s)((const uk256 *)w, (const ak256 *)a, n / 256) : FN(dot_k_u)((const uk256 *)w, (const ak256 *)a, n / 256);
    if (fam == NX_FAM_B32)
        return sgn ? FN(dot_b32_s)((const uint8_t *)w, (const uint8_t *)a, n / 32) : FN(dot_b32_u)((const uint8_t *)w, (const uint8_t *)a, n / 32);
    return FN(dot_f)((const float *)w, (const float *)a, n);
}

/* ------------------------------------------------------------------ fused dots (SIMD paths)
 * One packed GGUF row against nt (1..4, a compile-time constant after inlining) quantized
 * activation rows, straight from the packed blocks: each weight block is decoded into registers
 * once and multiplied with every token's activations (ggml-style maddubs/madd integer dots, block
 * scales applied per sub-block, K-quant mins through the activations' per-16 sums).  Types without
 * a fused kernel go through prep_row + dot_row (the generic decode-then-dot path). */
#if NX_PATH >= 1
#define NX_FUSED static inline __attribute__((always_inline))
/* software prefetch NX_PFD bytes ahead in the weight stream, `n` cache lines per step (about one
 * step's bytes); measured +10-15% per CPU-second with DRAM-resident weights over hardware
 * prefetch alone (a whole-row prefetch burst was slower).  -DNX_PFD=0 disables it.
 * Where: non-temporally (prefetchnta), or into L2 (prefetcht1) when the pass's activations take
 * more than NX_PF_ACT bytes of L1 (l2: NX_PF_L2(tokens, elements per token, bytes per element)).
 * Past that, the activations streaming through L1 evicted non-temporal lines before their use,
 * which then came from DRAM again: the multiplies and the weight reads did not overlap
 * (GLM-4.5-Air's Q8_0 attn_qkv, 8 rows on 1 thread: 6.7 ms, the sum of its compute and its DRAM
 * time). `benchmarks/linear_ab.py`, into L2 against non-temporal, 2 threads: 8 rows of that
 * weight 1.37x faster, attn_output (12288 columns) 1.12-1.91x at 2-16 rows, F16 1.18-1.45x from
 * 2 rows; but attn_qkv at 2-3 rows (8-12 KB of activations) 0.73-0.92x and one row up to 0.85x,
 * hence the threshold. */
#ifndef NX_PFD
#define NX_PFD 2048
#endif
#ifndef NX_PF_ACT
#define NX_PF_ACT (16 * 1024)
#endif
#define NX_PF_L2(nt, n, eb) ((size_t)(nt) * (size_t)(n) * (size_t)(eb) > (size_t)NX_PF_ACT)
#define NX_PF(p, n, l2) do { \
        if (NX_PFD > 0) for (int pf_ = 0; pf_ < (n); pf_++) { \
            if (l2) __builtin_prefetch((p) + NX_PFD + 64 * pf_, 0, 2); \
            else __builtin_prefetch((p) + NX_PFD + 64 * pf_, 0, 0); \
        } \
    } while (0)
#define NX_NT 4

static inline int FN(has_fused)(int type) {
#ifdef NX_NO_FUSED
    return 0;
#endif
    switch (type) {
    case NX_Q8_0: case NX_Q4_0: case NX_Q5_0: case NX_IQ4_NL: case NX_Q5_0_R8:
    case NX_Q4_K: case NX_Q5_K: case NX_Q6_K: case NX_IQ4_XS: case NX_Q2_K: case NX_Q3_K: case NX_Q4_K_R8:
    case NX_Q8_0_R8: case NX_Q4_0_R8: case NX_IQ4_NL_R8: case NX_Q2_K_R8: case NX_Q3_K_R8: case NX_Q5_K_R8:
    case NX_IQ4_XS_R8: case NX_Q6_K_R8: return 1;
    }
    return 0;
}
static inline float FN(hsum128)(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* 4 bytes of bits -> 32 bytes, 0xFF where the bit is set (ggml's bytes_from_bits_32) */
static inline __m256i FN(bitmask32)(const uint8_t *p) {
    uint32_t x32; memcpy(&x32, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x32), shuf);
    b = _mm256_or_si256(b, _mm256_set1_epi64x((long long)0x7fbfdfeff7fbfdfeULL));
    return _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
}
/* int16 lane k of a 128-bit vector broadcast to all lanes of both halves */
#define NX_BC16(k) _mm256_set1_epi16((short)(((2 * (k) + 1) << 8) | (2 * (k))))

/* one 32-element block -> 32 int8 (Q4_0 / Q5_0: the unsigned code 0..15 / 0..31, the zero point
 * is applied through the activations' block sums) */
NX_FUSED __m256i FN(dec_b32)(const int type, const uint8_t *w) {
    if (type == NX_Q8_0) return FN(ld256)(w + 2);
    /* the 16 nibble bytes in both halves (a broadcast load), the upper half shifted by 4: elements
     * 0..15 low, 16..31 high, without a lane insert */
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(w + (type == NX_Q5_0 ? 6 : 2))));
    __m256i q = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(15));
    if (type == NX_Q5_0) q = _mm256_or_si256(q, _mm256_and_si256(FN(bitmask32)(w + 2), _mm256_set1_epi8(16)));
    if (type == NX_IQ4_NL) q = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)FN(kvalues))), q);
    return q;
}

/* 32-element types against SoA Q8_0-like activations (y[32*nb], d[nb], s[nb] = d*sum(y)).
 * Four blocks at a time: their integer sums are folded into one vector (hadd) and scaled by one
 * vector of d_w*d_y, so the float work per token is per 4 blocks, not per block. */
NX_FUSED void FN(fb32)(const int type, const uint8_t *restrict w, const int64_t nb,
                       const uint8_t *const *a, float *res, const int nt) {
    const size_t bs = type == NX_Q8_0 ? 34 : type == NX_Q5_0 ? 22 : 18;
    const int sgn = type == NX_Q8_0 || type == NX_IQ4_NL;          /* else unsigned code + zero point */
    const float zp = type == NX_Q5_0 ? -16.0f : -8.0f;
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *y[NX_NT];
    const float *dy[NX_NT], *sy[NX_NT];
    __m256 acc[NX_NT];
    __m128 acco[NX_NT];
    for (int t = 0; t < nt; t++) {
        y[t] = (const int8_t *)a[t]; dy[t] = (const float *)(a[t] + 32 * nb); sy[t] = dy[t] + nb;
        acc[t] = _mm256_setzero_ps(); acco[t] = _mm_setzero_ps();
    }
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4, w += 4 * bs) {
        NX_PF(w, 3, NX_PF_L2(nt, nb * 32, 1));
        /* the four fp16 scales in one vector, one conversion */
        const __m128 dw = _mm_cvtph_ps(_mm_setr_epi16((short)FN(rd16)(w), (short)FN(rd16)(w + bs), (short)FN(rd16)(w + 2 * bs),
                                                      (short)FN(rd16)(w + 3 * bs), 0, 0, 0, 0));
        __m256i q[4], u[4];
        for (int i = 0; i < 4; i++) { q[i] = FN(dec_b32)(type, w + i * bs); u[i] = sgn ? _mm256_abs_epi8(q[i]) : q[i]; }
        const __m128 ow = _mm_mul_ps(dw, _mm_set1_ps(zp));
        for (int t = 0; t < nt; t++) {
            __m256i p[4], h;
            if (sgn) {
                for (int i = 0; i < 4; i++) {
                    const __m256i yv = _mm256_sign_epi8(FN(ld256)(y[t] + 32 * (b + i)), q[i]);
                    p[i] = _mm256_madd_epi16(_mm256_maddubs_epi16(u[i], yv), ones);
                }
                h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
            } else {
                /* unsigned codes <= 31: a maddubs lane is <= 2*31*127, four of them fit int16, so
                 * the 4-block fold runs on int16 and one madd widens it (3 multiplies fewer) */
                for (int i = 0; i < 4; i++) p[i] = _mm256_maddubs_epi16(u[i], FN(ld256)(y[t] + 32 * (b + i)));
                h = _mm256_madd_epi16(_mm256_hadd_epi16(_mm256_hadd_epi16(p[0], p[1]), _mm256_hadd_epi16(p[2], p[3])), ones);
            }
            const __m128 sc = _mm_mul_ps(dw, _mm_loadu_ps(dy[t] + b));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_set_m128(sc, sc), acc[t]);
            if (!sgn) acco[t] = _mm_fmadd_ps(ow, _mm_loadu_ps(sy[t] + b), acco[t]);
        }
    }
    for (; b < nb; b++, w += bs) {
        const float d = H2F(FN(rd16)(w));
        const __m256i q = FN(dec_b32)(type, w), u = sgn ? _mm256_abs_epi8(q) : q;
        for (int t = 0; t < nt; t++) {
            __m256i yv = FN(ld256)(y[t] + 32 * b);
            if (sgn) yv = _mm256_sign_epi8(yv, q);
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, yv), ones);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * dy[t][b]), _mm256_cvtepi32_ps(p), acc[t]);
            if (!sgn) acco[t] = _mm_add_ps(acco[t], _mm_set_ss(zp * d * sy[t][b]));
        }
    }
    for (int t = 0; t < nt; t++) res[t] = FN(hsum256)(acc[t]) + FN(hsum128)(acco[t]);
}

/* Q5_0_R8 (layout in moe_kernels.h) against SoA activations like fb32's, word-transposed in the
 * layout's groups (NX_FAM_B32R).  Per group of 8: one load of 8 fp16 scales, one of the
 * 5th-bit plane, four of nibbles; register r's codes are (nibbles & 15) | (plane shifted so bit r
 * lands on bit 4) & 16, 4 elements of each block at that block's lane.  A token's 8 products add
 * in int16 four at a time (codes <= 31: |lane| <= 4*2*31*127 < 2^15) and two madds leave the 8
 * block sums in the 8 int32 lanes: no horizontal adds.  A trailing group of 4 likewise, with two
 * 16-byte registers per vector. */
#define NX_R8_HI(hb, i) _mm256_and_si256((i) < 4 ? _mm256_slli_epi16(hb, 4 - (i)) : (i) == 4 ? (hb) : _mm256_srli_epi16(hb, (i) - 4), m16)
/* a group of 4: the 4 blocks' integer sums (each vector's halves hold words 2v and 2v+1) */
NX_FUSED __m128i FN(r8_sum4)(const __m256i *q, const int8_t *y) {
    __m256i p[4];
    for (int i = 0; i < 4; i++) p[i] = _mm256_maddubs_epi16(q[i], FN(ld256)(y + 32 * i));
    const __m256i s = _mm256_madd_epi16(_mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3])),
                                        _mm256_set1_epi16(1));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}
/* the code vectors 2p (low nibbles of qs[32p..]) and 2p+1 (high) for p < pairs, each with its
 * 5th bits from the plane hb (bit v of each byte -> vector v) */
NX_FUSED void FN(r8_codes)(const uint8_t *qs, const __m256i hb, const int pairs, __m256i *q) {
    const __m256i m4 = _mm256_set1_epi8(15), m16 = _mm256_set1_epi8(16);
    for (int p = 0; p < pairs; p++) {
        const __m256i v = FN(ld256)(qs + 32 * p);
        q[2 * p] = _mm256_or_si256(_mm256_and_si256(v, m4), NX_R8_HI(hb, 2 * p));
        q[2 * p + 1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), NX_R8_HI(hb, 2 * p + 1));
    }
}
NX_FUSED void FN(fq5r8)(const uint8_t *restrict w, const int64_t nb, const uint8_t *const *a, float *res, const int nt) {
    const int8_t *y[NX_NT];
    const float *dy[NX_NT], *sy[NX_NT];
    __m256 acc[NX_NT];
    __m128 acc4[NX_NT];
    for (int t = 0; t < nt; t++) {
        y[t] = (const int8_t *)a[t]; dy[t] = (const float *)(a[t] + 32 * nb); sy[t] = dy[t] + nb;
        acc[t] = _mm256_setzero_ps(); acc4[t] = _mm_setzero_ps();
    }
    const __m256i m4 = _mm256_set1_epi8(15), m16 = _mm256_set1_epi8(16), ones = _mm256_set1_epi16(1);
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8, w += 176) {
        NX_PF(w, 3, NX_PF_L2(nt, nb * 32, 1));
        const __m256i hb = FN(ld256)(w + 16);
        __m256i s16[NX_NT], s32[NX_NT];
        /* register pair by pair, every token (as fq4kr: the pair and the tokens' sums stay in
         * registers) */
        for (int r = 0; r < 8; r += 2) {
            const __m256i v = FN(ld256)(w + 48 + 16 * r);
            const __m256i ql = _mm256_or_si256(_mm256_and_si256(v, m4), NX_R8_HI(hb, r));
            const __m256i qh = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), NX_R8_HI(hb, r + 1));
            for (int t = 0; t < nt; t++) {
                const int8_t *yr = y[t] + 32 * (b + r);
                const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(ql, FN(ld256)(yr)), _mm256_maddubs_epi16(qh, FN(ld256)(yr + 32)));
                s16[t] = r % 4 ? _mm256_add_epi16(s16[t], p) : p;
                if (r == 2) s32[t] = _mm256_madd_epi16(s16[t], ones);
                if (r == 6) s32[t] = _mm256_add_epi32(s32[t], _mm256_madd_epi16(s16[t], ones));
                __asm__("" : "+x"(s16[t]));   /* keep gcc from hoisting the multiplies (fq4kr) */
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w));
        const __m256 ow = _mm256_mul_ps(dw, _mm256_set1_ps(-16.0f));
        for (int t = 0; t < nt; t++) {
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[t]), _mm256_mul_ps(dw, _mm256_loadu_ps(dy[t] + b)), acc[t]);
            acc[t] = _mm256_fmadd_ps(ow, _mm256_loadu_ps(sy[t] + b), acc[t]);
        }
    }
    if (nb - b >= 4) {
        const __m128 dw = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)w));
        const __m128 ow = _mm_mul_ps(dw, _mm_set1_ps(-16.0f));
        /* 16-byte plane: the upper lane's bits sit 4 higher (elements 16-31) */
        const __m256i hb = _mm256_srlv_epi64(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(w + 8))),
                                             _mm256_setr_epi64x(0, 0, 4, 4));
        __m256i q[4];
        FN(r8_codes)(w + 24, hb, 2, q);
        for (int t = 0; t < nt; t++) {
            const __m128i h = FN(r8_sum4)(q, y[t] + 32 * b);
            acc4[t] = _mm_fmadd_ps(_mm_cvtepi32_ps(h), _mm_mul_ps(dw, _mm_loadu_ps(dy[t] + b)), acc4[t]);
            acc4[t] = _mm_fmadd_ps(ow, _mm_loadu_ps(sy[t] + b), acc4[t]);
        }
        b += 4;
        w += 88;
    }
    for (; b < nb; b++, w += 22) {   /* the last nb % 4 blocks, unchanged Q5_0 */
        const float d = H2F(FN(rd16)(w));
        const __m256i q = FN(dec_b32)(NX_Q5_0, w);
        for (int t = 0; t < nt; t++) {
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, FN(ld256)(y[t] + 32 * b)), _mm256_set1_epi16(1));
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * dy[t][b]), _mm256_cvtepi32_ps(p), acc[t]);
            acc4[t] = _mm_add_ps(acc4[t], _mm_set_ss(-16.0f * d * sy[t][b]));
        }
    }
    for (int t = 0; t < nt; t++) res[t] = FN(hsum256)(acc[t]) + FN(hsum128)(acc4[t]);
}

/* Q8_0_R8, Q4_0_R8, IQ4_NL_R8 (layouts in moe_kernels.h) against NX_FAM_B32R activations: as
 * fq5r8, a group's blocks sit in the int32 lanes (8, or 4 in each half for a group of 4).  Signed
 * codes (Q8_0, IQ4_NL) take the abs/sign trick and widen every product (|lane| up to 2*128*127);
 * Q4_0's codes <= 15 add all 8 products in int16 (|lane| <= 8*2*15*127 < 2^15) first. */
NX_FUSED __m256i FN(b32r_codes)(const int type, const uint8_t *q, const int v, const __m256i kv) {
    if (type == NX_Q8_0_R8) return FN(ld256)(q + 32 * v);
    const __m256i x = FN(ld256)(q + 32 * (v / 2)), m4 = _mm256_set1_epi8(15);
    const __m256i c = _mm256_and_si256(v % 2 ? _mm256_srli_epi16(x, 4) : x, m4);
    return type == NX_IQ4_NL_R8 ? _mm256_shuffle_epi8(kv, c) : c;
}
NX_FUSED void FN(fb32r)(const int type, const uint8_t *restrict w, const int64_t nb,
                        const uint8_t *const *a, float *res, const int nt) {
    const int sgn = type != NX_Q4_0_R8;
    const size_t bs = nx_repacked_bs(type);
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i kv = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)FN(kvalues)));
    const int8_t *y[NX_NT];
    const float *dy[NX_NT], *sy[NX_NT];
    __m256 acc[NX_NT];
    __m128 acc4[NX_NT];
    for (int t = 0; t < nt; t++) {
        y[t] = (const int8_t *)a[t]; dy[t] = (const float *)(a[t] + 32 * nb); sy[t] = dy[t] + nb;
        acc[t] = _mm256_setzero_ps(); acc4[t] = _mm_setzero_ps();
    }
    int64_t b = 0;
    while (nb - b >= 4) {
        const int G = nb - b >= 8 ? 8 : 4, nv = G == 8 ? 8 : 4;   /* vectors of 32 code bytes */
        NX_PF(w, (int)((size_t)G * bs / 64) + 1, NX_PF_L2(nt, nb * 32, 1));   /* a step's bytes: 272 for Q8_0's group of 8 */
        const uint8_t *q = w + 2 * G;
        __m256i s[NX_NT];
        for (int v = 0; v < nv; v++) {
            const __m256i c = FN(b32r_codes)(type, q, v, kv), u = sgn ? _mm256_abs_epi8(c) : c;
            for (int t = 0; t < nt; t++) {
                __m256i yv = FN(ld256)(y[t] + 32 * b + 32 * v);
                if (sgn) {
                    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(yv, c)), ones);
                    s[t] = v ? _mm256_add_epi32(s[t], p) : p;
                } else {
                    const __m256i p = _mm256_maddubs_epi16(u, yv);
                    s[t] = v ? _mm256_add_epi16(s[t], p) : p;
                }
                __asm__("" : "+x"(s[t]));   /* keep gcc from hoisting the multiplies (fq4kr) */
            }
        }
        if (G == 8) {
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w));
            for (int t = 0; t < nt; t++) {
                const __m256i si = sgn ? s[t] : _mm256_madd_epi16(s[t], ones);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), _mm256_mul_ps(dw, _mm256_loadu_ps(dy[t] + b)), acc[t]);
                if (!sgn) acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(-8.0f)), _mm256_loadu_ps(sy[t] + b), acc[t]);
            }
        } else {
            const __m128 dw = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)w));
            for (int t = 0; t < nt; t++) {
                const __m256i si = sgn ? s[t] : _mm256_madd_epi16(s[t], ones);
                const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(si), _mm256_extracti128_si256(si, 1));
                acc4[t] = _mm_fmadd_ps(_mm_cvtepi32_ps(h), _mm_mul_ps(dw, _mm_loadu_ps(dy[t] + b)), acc4[t]);
                if (!sgn) acc4[t] = _mm_fmadd_ps(_mm_mul_ps(dw, _mm_set1_ps(-8.0f)), _mm_loadu_ps(sy[t] + b), acc4[t]);
            }
        }
        b += G;
        w += (size_t)G * bs;
    }
    const int base = type - 100;   /* the last nb % 4 blocks, unchanged ggml blocks */
    for (; b < nb; b++, w += bs) {
        const float d = H2F(FN(rd16)(w));
        const __m256i c = FN(dec_b32)(base, w), u = sgn ? _mm256_abs_epi8(c) : c;
        for (int t = 0; t < nt; t++) {
            __m256i yv = FN(ld256)(y[t] + 32 * b);
            if (sgn) yv = _mm256_sign_epi8(yv, c);
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, yv), ones);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * dy[t][b]), _mm256_cvtepi32_ps(p), acc[t]);
            if (!sgn) acc4[t] = _mm_add_ps(acc4[t], _mm_set_ss(-8.0f * d * sy[t][b]));
        }
    }
    for (int t = 0; t < nt; t++) res[t] = FN(hsum256)(acc[t]) + FN(hsum128)(acc4[t]);
}

/* 256-element kernels keep one int32 vector per token per block; fold4 reduces the nt of them to
 * one vector (lane t and t+4 = token t) scaled by one vector of d_w*d_y, so the float work per
 * block is the same for 1..4 tokens and only one float accumulator is live. */
NX_FUSED __m256i FN(fold4)(const __m256i *s, const int nt) {
    const __m256i z = _mm256_setzero_si256();
    const __m256i h01 = _mm256_hadd_epi32(s[0], nt > 1 ? s[1] : z);
    const __m256i h23 = nt > 2 ? _mm256_hadd_epi32(s[2], nt > 3 ? s[3] : z) : z;
    return _mm256_hadd_epi32(h01, h23);
}
NX_FUSED __m128 FN(dy4)(const ak256 *const *ab, const int64_t b, const int nt) {
    return _mm_setr_ps(ab[0][b].d, nt > 1 ? ab[1][b].d : 0.0f, nt > 2 ? ab[2][b].d : 0.0f, nt > 3 ? ab[3][b].d : 0.0f);
}
NX_FUSED void FN(unfold4)(__m256 acc, __m128 extra, float *res, const int nt) {
    float f[8], g[4];
    _mm256_storeu_ps(f, acc);
    _mm_storeu_ps(g, extra);
    for (int t = 0; t < nt; t++) res[t] = (f[t] + f[t + 4]) + g[t];
}

/* a Q4_K / Q5_K block's 12 scale bytes -> int16 x16: the 8 scales, then the 8 mins, 6 bits each
 * (ggml's get_scale_min_k4), in vector registers: sc[j<4] = q[j]&63, sc[j>=4] = q[j+4]&15 |
 * (q[j-4]>>6)<<4, m[j<4] = q[j+4]&63, m[j>=4] = q[j+4]>>4 | (q[j]>>6)<<4 (16 bytes read: 12 + 4
 * of qs) */
NX_FUSED __m256i FN(k4_scales)(const uint8_t *w) {
    const __m128i sb = _mm_loadu_si128((const __m128i *)(w + 4));
    const __m128i A = _mm_shuffle_epi8(sb, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
    const __m128i B = _mm_shuffle_epi8(sb, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
    const __m128i lo = _mm_and_si128(A, _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0));
    const __m128i hi4 = _mm_and_si128(_mm_srli_epi16(A, 4), _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 15, 15, 15));
    const __m128i top = _mm_and_si128(_mm_srli_epi16(B, 2), _mm_set1_epi8(0x30));
    return _mm256_cvtepu8_epi16(_mm_or_si128(_mm_or_si128(lo, hi4), top));
}

/* Q4_K / Q5_K against Q8_K-like activations.
 * Per 256-block: the 8 six-bit scales and 8 mins are unpacked once, in vector registers; the
 * scales go to a small stack array as int16 pairs so each sub-block's madd operand is one
 * broadcast load rather than a shuffle (the shuffle port is the busy one here); the mins meet the
 * activations' per-32 sums (bsum32, precomputed per token) in one madd.  Each token keeps its own
 * float accumulators, so a token's result has the same bits whether it is dotted alone or with up
 * to three others (a verify batch's row must equal a plain step's; folding 3-4 tokens' int32 sums
 * into one vector, as this did before, changed the float summation order). */
NX_FUSED void FN(fq45k)(const int type, const uint8_t *restrict w, const int64_t nb,
                        const uint8_t *const *a, float *res, const int nt) {
    const size_t bs = type == NX_Q4_K ? 144 : 176;
    const __m256i m4 = _mm256_set1_epi8(15);
    const ak256 *ab[NX_NT];
    for (int t = 0; t < nt; t++) ab[t] = (const ak256 *)a[t];
    __m256 acc1[NX_NT];
    __m128 accm1[NX_NT];
    for (int t = 0; t < nt; t++) { acc1[t] = _mm256_setzero_ps(); accm1[t] = _mm_setzero_ps(); }
    int32_t scp[16];
    for (int64_t b = 0; b < nb; b++, w += bs) {
        NX_PF(w, 3, NX_PF_L2(nt, nb * 256, 1));
        const float d = H2F(FN(rd16)(w)), dmin = H2F(FN(rd16)(w + 2));
        const __m256i ms = FN(k4_scales)(w);
        const __m128i mins = _mm256_extracti128_si256(ms, 1), sc = _mm256_castsi256_si128(ms);
        {   /* scp[4j..4j+3] = int16 x8: scale 2j four times, then scale 2j+1 four times */
            const __m128i lo = _mm_unpacklo_epi16(sc, sc), hi = _mm_unpackhi_epi16(sc, sc);
            _mm_storeu_si128((__m128i *)scp, _mm_unpacklo_epi32(lo, lo));
            _mm_storeu_si128((__m128i *)(scp + 4), _mm_unpackhi_epi32(lo, lo));
            _mm_storeu_si128((__m128i *)(scp + 8), _mm_unpacklo_epi32(hi, hi));
            _mm_storeu_si128((__m128i *)(scp + 12), _mm_unpackhi_epi32(hi, hi));
        }
        /* make the compiler reload scp from memory: a broadcast load costs no shuffle uop */
        __asm__ volatile("" : "+m"(scp));
        const uint8_t *qs = w + (type == NX_Q4_K ? 16 : 48);
        __m256i hb = _mm256_setzero_si256();
        if (type == NX_Q5_K) hb = FN(ld256)(w + 16);
        __m256i sumi[NX_NT];
        __m128i msum[NX_NT];
        for (int t = 0; t < nt; t++) {
            sumi[t] = _mm256_setzero_si256();
            msum[t] = _mm_madd_epi16(mins, _mm_loadu_si128((const __m128i *)ab[t][b].bsum32));
        }
        for (int j = 0; j < 4; j++) {
            const __m256i slh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(scp + 4 * j)));
            const __m256i v = FN(ld256)(qs + 32 * j);
            __m256i ql = _mm256_and_si256(v, m4), qh = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            if (type == NX_Q5_K) {
                const __m256i one = _mm256_set1_epi8(1);
                ql = _mm256_or_si256(ql, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * j), one), 4));
                qh = _mm256_or_si256(qh, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * j + 1), one), 4));
            }
            for (int t = 0; t < nt; t++) {
                const __m256i pl = _mm256_maddubs_epi16(ql, FN(ld256)(ab[t][b].y + 64 * j));
                const __m256i ph = _mm256_maddubs_epi16(qh, FN(ld256)(ab[t][b].y + 64 * j + 32));
                /* pair sums of the two sub-blocks side by side (|each| <= 2*2*31*127 fits int16),
                 * then one madd applies both scales: one multiply fewer per 64 elements */
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(_mm256_hadd_epi16(pl, ph), slh));
            }
        }
        for (int t = 0; t < nt; t++) {
            const float dy = ab[t][b].d;
            acc1[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_set1_ps(d * dy), acc1[t]);
            accm1[t] = _mm_fmadd_ps(_mm_cvtepi32_ps(msum[t]), _mm_set1_ps(-dmin * dy), accm1[t]);
        }
    }
    for (int t = 0; t < nt; t++) res[t] = FN(hsum256)(acc1[t]) + FN(hsum128)(accm1[t]);
}

/* Q4_K_R8 / Q5_K_R8 (layout in moe_kernels.h) against ak256 activations with word-transposed y
 * (NX_FAM_KR). Register r holds 4 elements of each of the 8 sub-blocks at the same lane, so a
 * token's 8 maddubs results add in int16 (Q4_K: |lane| <= 8*2*15*127 = 30480 < 2^15; Q5_K: 4 at a
 * time) and one madd (two for Q5_K) applies the 8 scales: 9 (10) multiplies per block per token
 * against fq45k's 12, and no horizontal adds. */
NX_FUSED void FN(fq4kr)(const int type, const uint8_t *restrict w, const int64_t nb, const uint8_t *const *a,
                        float *res, const int nt) {
    const int q5 = type == NX_Q5_K_R8;
    const size_t bs = q5 ? 176 : 144;
    const __m256i m4 = _mm256_set1_epi8(15), m16 = _mm256_set1_epi8(16);
    const ak256 *ab[NX_NT];
    for (int t = 0; t < nt; t++) ab[t] = (const ak256 *)a[t];
    __m256 acc[NX_NT];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += bs) {
        NX_PF(w, q5 ? 4 : 3, NX_PF_L2(nt, nb * 256, 1));
        /* register by register, every token: 4 int16 sums + 4 accumulators + the register in use
         * stay in the 16 ymm registers (all 8 code registers at once spilled to the stack) */
        const __m256i hb = q5 ? FN(ld256)(w + 16) : _mm256_setzero_si256();
        __m256i s[NX_NT], s32[NX_NT];
        for (int r = 0; r < 8; r += 2) {
            const __m256i v = FN(ld256)(w + (q5 ? 48 : 16) + 16 * r);
            __m256i ql = _mm256_and_si256(v, m4), qh = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            if (q5) { ql = _mm256_or_si256(ql, NX_R8_HI(hb, r)); qh = _mm256_or_si256(qh, NX_R8_HI(hb, r + 1)); }
            for (int t = 0; t < nt; t++) {
                const int8_t *y = ab[t][b].y + 32 * r;
                const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(ql, FN(ld256)(y)), _mm256_maddubs_epi16(qh, FN(ld256)(y + 32)));
                /* Q4_K's codes <= 15: all 8 products in int16; Q5_K's <= 31: 4 at a time */
                s[t] = r && !(q5 && r == 4) ? _mm256_add_epi16(s[t], p) : p;
                if (q5 && r == 2) s32[t] = s[t];
                /* keep the compiler from hoisting all 32 multiplies ahead of their adds (gcc did,
                 * and spilled their results to the stack) */
                __asm__("" : "+x"(s[t]));
            }
        }
        const float d = H2F(FN(rd16)(w)), dmin = H2F(FN(rd16)(w + 2));
        const __m256i ms = FN(k4_scales)(w);
        const __m128i sc = _mm256_castsi256_si128(ms), mins = _mm256_extracti128_si256(ms, 1);
        const __m256i scv = _mm256_set_m128i(_mm_unpackhi_epi16(sc, sc), _mm_unpacklo_epi16(sc, sc));
        for (int t = 0; t < nt; t++) {
            const float dy = ab[t][b].d;
            __m256i si = _mm256_madd_epi16(s[t], scv);
            if (q5) si = _mm256_add_epi32(si, _mm256_madd_epi16(s32[t], scv));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), _mm256_set1_ps(d * dy), acc[t]);
            /* the mins' 4 int32 sums in the low lanes of one more product into the same accumulator */
            const __m128i msum = _mm_madd_epi16(mins, _mm_loadu_si128((const __m128i *)ab[t][b].bsum32));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_set_m128i(_mm_setzero_si128(), msum)), _mm256_set1_ps(-dmin * dy), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) res[t] = FN(hsum256)(acc[t]);
}
#undef NX_R8_HI

/* Q6_K against Q8_K-like activations: unsigned 6-bit q, the -32 offset through the per-16 sums */
NX_FUSED void FN(fq6k)(const uint8_t *restrict w, const int64_t nb, const uint8_t *const *a, float *res, const int nt) {
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
    const ak256 *ab[NX_NT];
    for (int t = 0; t < nt; t++) ab[t] = (const ak256 *)a[t];
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += 210) {
        NX_PF(w, 4, NX_PF_L2(nt, nb * 256, 1));
        const float d = H2F(FN(rd16)(w + 208));
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)(w + 192));
        const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
        __m256i sumi[NX_NT];
        for (int t = 0; t < nt; t++) {
            /* -32 * sum_g sc_g * bsum_g */
            const __m256i m = _mm256_madd_epi16(sc16, FN(ld256)(ab[t][b].bsum));
            sumi[t] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(m, 5));
        }
        for (int n = 0; n < 2; n++) {
            const __m256i S = _mm256_broadcastsi128_si256(n ? _mm256_extracti128_si256(sc16, 1) : _mm256_castsi256_si128(sc16));
            const uint8_t *ql = w + 64 * n, *qhp = w + 128 + 32 * n;
            const __m256i l0 = FN(ld256)(ql), l1 = FN(ld256)(ql + 32), h = FN(ld256)(qhp);
            for (int k = 0; k < 4; k++) {
                const __m256i lo = k & 1 ? l1 : l0;
                const __m256i q = _mm256_or_si256(_mm256_and_si256(k & 2 ? _mm256_srli_epi16(lo, 4) : lo, m4),
                                                  _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2 * k), m3), 4));
                /* groups 2k (low 16 elements) and 2k+1 (high 16) of this half */
                const __m256i sk = _mm256_shuffle_epi8(S, _mm256_set_m128i(_mm256_castsi256_si128(NX_BC16(2 * k + 1)),
                                                                          _mm256_castsi256_si128(NX_BC16(2 * k))));
                for (int t = 0; t < nt; t++) {
                    const __m256i p = _mm256_maddubs_epi16(q, FN(ld256)(ab[t][b].y + 128 * n + 32 * k));
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p, sk));
                }
            }
        }
        const __m128 sc = _mm_mul_ps(FN(dy4)(ab, b, nt), _mm_set1_ps(d));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(FN(fold4)(sumi, nt)), _mm256_set_m128(sc, sc), acc);
    }
    FN(unfold4)(acc, _mm_setzero_ps(), res, nt);
}

/* a Q3_K block's 12 scale bytes (at 96) -> 16 int16 scales minus 32, in vector registers (ggml's
 * aux shuffle: scale j's low 4 bits from byte j%8, nibble j/8; its high 2 from byte 8+j%4, bits
 * 2(j/4)); scalar words stored and read back as a vector stalled on store forwarding every block.
 * The 16-byte load ends at the block's last byte (94..109) so it never reads past a row. */
NX_FUSED __m256i FN(q3k_scales)(const uint8_t *w) {
    const __m128i v = _mm_loadu_si128((const __m128i *)(w + 94));
    const __m128i lo = _mm_shuffle_epi8(v, _mm_setr_epi8(2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5, 6, 7, 8, 9));
    const __m128i hi = _mm_shuffle_epi8(v, _mm_setr_epi8(10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13));
    const __m128i l4 = _mm_and_si128(_mm_srlv_epi32(lo, _mm_setr_epi32(0, 0, 4, 4)), _mm_set1_epi8(15));
    const __m128i h2 = _mm_and_si128(_mm_srlv_epi32(hi, _mm_setr_epi32(0, 2, 4, 6)), _mm_set1_epi8(3));
    return _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_or_si128(l4, _mm_slli_epi16(h2, 4))), _mm256_set1_epi16(32));
}
/* Q2_K / Q3_K against Q8_K-like activations: unsigned 2/3-bit codes, one scale per 16 (chunk of 32
 * = groups 2c, 2c+1, laid out like Q6_K's); Q2_K mins through the per-16 sums with dmin, Q3_K's
 * -4 offset through the same sums with d (folded into the integer sum) */
NX_FUSED void FN(fq23k)(const int type, const uint8_t *restrict w, const int64_t nb, const uint8_t *const *a,
                        float *res, const int nt) {
    const size_t bs = type == NX_Q2_K ? 84 : 110;
    const __m256i m3 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    const ak256 *ab[NX_NT];
    for (int t = 0; t < nt; t++) ab[t] = (const ak256 *)a[t];
    __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += bs) {
        NX_PF(w, 2, NX_PF_L2(nt, nb * 256, 1));
        __m256i sc16, mn16 = _mm256_setzero_si256(), hm = _mm256_setzero_si256();
        float d, dmin = 0.0f;
        const uint8_t *qs;
        if (type == NX_Q2_K) {
            d = H2F(FN(rd16)(w + 80)); dmin = H2F(FN(rd16)(w + 82));
            const __m128i s8 = _mm_loadu_si128((const __m128i *)w), m4 = _mm_set1_epi8(15);
            sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(s8, m4));
            mn16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(s8, 4), m4));
            qs = w + 16;
        } else {
            d = H2F(FN(rd16)(w + 108));
            sc16 = FN(q3k_scales)(w);
            hm = FN(ld256)(w);
            qs = w + 32;
        }
        __m256i sumi[NX_NT], msum[NX_NT];
        for (int t = 0; t < nt; t++) {
            const __m256i bsv = FN(ld256)(ab[t][b].bsum);
            if (type == NX_Q3_K) sumi[t] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(sc16, bsv), 2));
            else { sumi[t] = _mm256_setzero_si256(); msum[t] = _mm256_madd_epi16(mn16, bsv); }
        }
        for (int n = 0; n < 2; n++) {
            const __m256i S = _mm256_broadcastsi128_si256(n ? _mm256_extracti128_si256(sc16, 1) : _mm256_castsi256_si128(sc16));
            const __m256i v = FN(ld256)(qs + 32 * n);
            for (int j = 0; j < 4; j++) {
                __m256i q = _mm256_and_si256(_mm256_srli_epi16(v, 2 * j), m3);
                if (type == NX_Q3_K)
                    q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hm, 4 * n + j), one), 2));
                const __m256i sk = _mm256_shuffle_epi8(S, _mm256_set_m128i(_mm256_castsi256_si128(NX_BC16(2 * j + 1)),
                                                                          _mm256_castsi256_si128(NX_BC16(2 * j))));
                for (int t = 0; t < nt; t++) {
                    const __m256i p = _mm256_maddubs_epi16(q, FN(ld256)(ab[t][b].y + 128 * n + 32 * j));
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p, sk));
                }
            }
        }
        const __m128 dyv = FN(dy4)(ab, b, nt);
        const __m128 sc = _mm_mul_ps(dyv, _mm_set1_ps(d));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(FN(fold4)(sumi, nt)), _mm256_set_m128(sc, sc), acc);
        if (type == NX_Q2_K) {
            const __m128 scm = _mm_mul_ps(dyv, _mm_set1_ps(-dmin));
            accm = _mm256_fmadd_ps(_mm256_cvtepi32_ps(FN(fold4)(msum, nt)), _mm256_set_m128(scm, scm), accm);
        }
    }
    FN(unfold4)(_mm256_add_ps(acc, accm), _mm_setzero_ps(), res, nt);
}

/* Q2_K_R8 / Q3_K_R8 (layout in moe_kernels.h) against NX_FAM_K16R activations: register r's
 * int16 lane j is sub-block j throughout, so a token's 8 products add in int16 and one madd with
 * the 16 scales leaves 8 int32 sums; the mins (Q2_K) and Q3_K's -4 zero point go through the
 * per-16 activation sums as in fq23k. */
NX_FUSED void FN(fq23kr)(const int type, const uint8_t *restrict w, const int64_t nb, const uint8_t *const *a,
                         float *res, const int nt) {
    const int q3 = type == NX_Q3_K_R8;
    const size_t bs = q3 ? 110 : 84;
    const __m256i m3 = _mm256_set1_epi8(3), m4b = _mm256_set1_epi8(4);
    const ak256 *ab[NX_NT];
    for (int t = 0; t < nt; t++) ab[t] = (const ak256 *)a[t];
    __m256 acc[NX_NT];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += bs) {
        NX_PF(w, 2, NX_PF_L2(nt, nb * 256, 1));
        const uint8_t *qs = w + (q3 ? 32 : 16);
        const __m256i hb = q3 ? FN(ld256)(w) : _mm256_setzero_si256();
        __m256i s16[NX_NT];
        for (int V = 0; V < 2; V++) {
            const __m256i v = FN(ld256)(qs + 32 * V);
            for (int k = 0; k < 4; k++) {
                const int r = 4 * V + k;
                __m256i q = _mm256_and_si256(_mm256_srli_epi16(v, 2 * k), m3);
                if (q3)   /* bit r of hmask -> bit 2 */
                    q = _mm256_or_si256(q, _mm256_and_si256(r < 2 ? _mm256_slli_epi16(hb, 2 - r) : r == 2 ? hb
                                                            : _mm256_srli_epi16(hb, r - 2), m4b));
                for (int t = 0; t < nt; t++) {
                    const __m256i p = _mm256_maddubs_epi16(q, FN(ld256)(ab[t][b].y + 32 * r));
                    s16[t] = r ? _mm256_add_epi16(s16[t], p) : p;
                    __asm__("" : "+x"(s16[t]));   /* keep gcc from hoisting the multiplies (fq4kr) */
                }
            }
        }
        __m256i sc16, mn16 = _mm256_setzero_si256();
        float d, dmin = 0.0f;
        if (!q3) {
            d = H2F(FN(rd16)(w + 80)); dmin = H2F(FN(rd16)(w + 82));
            const __m128i s8 = _mm_loadu_si128((const __m128i *)w), m4 = _mm_set1_epi8(15);
            sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(s8, m4));
            mn16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(s8, 4), m4));
        } else {
            d = H2F(FN(rd16)(w + 108));
            sc16 = FN(q3k_scales)(w);
        }
        for (int t = 0; t < nt; t++) {
            const __m256i bsv = FN(ld256)(ab[t][b].bsum);
            __m256i si = _mm256_madd_epi16(s16[t], sc16);
            if (q3) si = _mm256_sub_epi32(si, _mm256_slli_epi32(_mm256_madd_epi16(sc16, bsv), 2));
            const float dy = ab[t][b].d;
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), _mm256_set1_ps(d * dy), acc[t]);
            if (!q3) acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(mn16, bsv)), _mm256_set1_ps(-dmin * dy), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) res[t] = FN(hsum256)(acc[t]);
}

/* Q6_K_R8 (layout in moe_kernels.h) against NX_FAM_K16R activations: sub-block j in int16 lane j
 * of every register; two registers' products add in int16, a madd with the 16 scales widens them,
 * and the -32 zero point goes through the per-16 activation sums as in fq6k. */
NX_FUSED void FN(fq6kr)(const uint8_t *restrict w, const int64_t nb, const uint8_t *const *a, float *res, const int nt) {
    const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30);
    const ak256 *ab[NX_NT];
    for (int t = 0; t < nt; t++) ab[t] = (const ak256 *)a[t];
    __m256 acc[NX_NT];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += 210) {
        NX_PF(w, 4, NX_PF_L2(nt, nb * 256, 1));
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 192)));
        __m256i s32[NX_NT];
        for (int r = 0; r < 8; r += 2) {
            const __m256i v = FN(ld256)(w + 16 * r), h = FN(ld256)(w + 128 + 32 * (r / 4));
            /* bits 2(r%4) of the plane -> bits 4-5: shift by 4 - 2(r%4) */
            const __m256i h0 = _mm256_and_si256(r % 4 ? h : _mm256_slli_epi16(h, 4), m30);
            const __m256i h1 = _mm256_and_si256(r % 4 ? _mm256_srli_epi16(h, 2) : _mm256_slli_epi16(h, 2), m30);
            const __m256i q0 = _mm256_or_si256(_mm256_and_si256(v, m4), h0);
            const __m256i q1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), h1);
            for (int t = 0; t < nt; t++) {
                const int8_t *y = ab[t][b].y + 32 * r;
                const __m256i p = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(q0, FN(ld256)(y)),
                                                                     _mm256_maddubs_epi16(q1, FN(ld256)(y + 32))), sc16);
                s32[t] = r ? _mm256_add_epi32(s32[t], p) : p;
                __asm__("" : "+x"(s32[t]));   /* keep gcc from hoisting the multiplies (fq4kr) */
            }
        }
        const float d = H2F(FN(rd16)(w + 208));
        for (int t = 0; t < nt; t++) {
            const __m256i si = _mm256_sub_epi32(s32[t], _mm256_slli_epi32(_mm256_madd_epi16(sc16, FN(ld256)(ab[t][b].bsum)), 5));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), _mm256_set1_ps(d * ab[t][b].d), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) res[t] = FN(hsum256)(acc[t]);
}

/* IQ4_XS against Q8_K-like activations (signed codebook values, 6-bit signed scale per 32) */
/* an IQ4_XS block's 8 six-bit scales at once (low nibbles from scales_l, two high bits each from
 * scales_h, minus 32), int32 lane i = scale i as an int16 pair (both halves) */
NX_FUSED __m256i FN(iq4xs_scales)(const uint8_t *w) {
    uint32_t l4;
    memcpy(&l4, w + 4, 4);
    const __m128i lv = _mm_cvtsi32_si128((int)l4);
    const __m128i nib = _mm_unpacklo_epi8(_mm_and_si128(lv, _mm_set1_epi8(15)),
                                          _mm_and_si128(_mm_srli_epi16(lv, 4), _mm_set1_epi8(15)));
    const __m256i h2 = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)FN(rd16)(w + 2)),
                                                          _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                                        _mm256_set1_epi32(3));
    const __m256i ls = _mm256_sub_epi32(_mm256_or_si256(_mm256_cvtepu8_epi32(nib), _mm256_slli_epi32(h2, 4)),
                                        _mm256_set1_epi32(32));
    return _mm256_or_si256(_mm256_and_si256(ls, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32(ls, 16));
}
NX_FUSED void FN(fiq4xs)(const uint8_t *restrict w, const int64_t nb, const uint8_t *const *a, float *res, const int nt) {
    const __m256i m4 = _mm256_set1_epi8(15);
    const __m256i kv = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)FN(kvalues)));
    const ak256 *ab[NX_NT];
    for (int t = 0; t < nt; t++) ab[t] = (const ak256 *)a[t];
    __m256 acc = _mm256_setzero_ps();
    int32_t scp[8];
    for (int64_t b = 0; b < nb; b++, w += 136) {
        NX_PF(w, 3, NX_PF_L2(nt, nb * 256, 1));
        const float d = H2F(FN(rd16)(w));
        const uint8_t *qs = w + 8;
        /* stored as int16 pairs, read back as broadcast loads */
        _mm256_storeu_si256((__m256i *)scp, FN(iq4xs_scales)(w));
        __asm__ volatile("" : "+m"(scp));
        __m256i sumi[NX_NT];
        for (int t = 0; t < nt; t++) sumi[t] = _mm256_setzero_si256();
        for (int ib = 0; ib < 8; ib++) {
            const __m256i scv = _mm256_set1_epi32(scp[ib]);
            const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(qs + 16 * ib)));
            const __m256i q = _mm256_shuffle_epi8(kv, _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4)), m4));
            const __m256i aq = _mm256_abs_epi8(q);
            for (int t = 0; t < nt; t++) {
                const __m256i p = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(FN(ld256)(ab[t][b].y + 32 * ib), q));
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p, scv));
            }
        }
        const __m128 sc = _mm_mul_ps(FN(dy4)(ab, b, nt), _mm_set1_ps(d));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(FN(fold4)(sumi, nt)), _mm256_set_m128(sc, sc), acc);
    }
    FN(unfold4)(acc, _mm_setzero_ps(), res, nt);
}

/* IQ4_XS_R8 (Q4_K_R8's interleave, moe_kernels.h) against NX_FAM_KR activations: sub-block i in
 * int32 lane i of every register, so a token's 8 products take one madd with the scales each
 * (signed codebook values: abs/sign trick, no int16 fold) and no fold across lanes at the end. */
NX_FUSED void FN(fiq4xsr)(const uint8_t *restrict w, const int64_t nb, const uint8_t *const *a, float *res, const int nt) {
    const __m256i m4 = _mm256_set1_epi8(15);
    const __m256i kv = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)FN(kvalues)));
    const ak256 *ab[NX_NT];
    for (int t = 0; t < nt; t++) ab[t] = (const ak256 *)a[t];
    __m256 acc[NX_NT];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += 136) {
        NX_PF(w, 3, NX_PF_L2(nt, nb * 256, 1));
        const __m256i scv = FN(iq4xs_scales)(w);
        __m256i s32[NX_NT];
        for (int r = 0; r < 8; r += 2) {
            const __m256i v = FN(ld256)(w + 8 + 16 * r);
            for (int h = 0; h < 2; h++) {
                const __m256i c = _mm256_shuffle_epi8(kv, _mm256_and_si256(h ? _mm256_srli_epi16(v, 4) : v, m4));
                const __m256i u = _mm256_abs_epi8(c);
                for (int t = 0; t < nt; t++) {
                    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(FN(ld256)(ab[t][b].y + 32 * (r + h)), c)), scv);
                    s32[t] = r + h ? _mm256_add_epi32(s32[t], p) : p;
                    __asm__("" : "+x"(s32[t]));   /* keep gcc from hoisting the multiplies (fq4kr) */
                }
            }
        }
        const float d = H2F(FN(rd16)(w));
        for (int t = 0; t < nt; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[t]), _mm256_set1_ps(d * ab[t][b].d), acc[t]);
    }
    for (int t = 0; t < nt; t++) res[t] = FN(hsum256)(acc[t]);
}

#define NX_NT_SWITCH(call) \
    switch (nt) { case 1: { const int NTC = 1; call; } break; case 2: { const int NTC = 2; call; } break; \
                  case 3: { const int NTC = 3; call; } break; default: { const int NTC = 4; call; } break; }
/* res[r * nt + t] = row r . act[t] for r < R rows (rb bytes apart) and t < nt (1..4), fused
 * types only.  One type dispatch for R rows: a demo-sized row (4 Q8_0 blocks) costs ~7 ns, and a
 * dispatch per row was a good part of that; the rows' results are the kernel's for each row alone. */
#define NX_ROWS(call) for (int r = 0; r < R; r++) call
static void FN(fused_dots)(int type, const uint8_t *w, size_t rb, int R, int64_t n, const uint8_t *const *a,
                           float *res, int nt) {
    switch (type) {
    case NX_Q8_0: NX_NT_SWITCH(NX_ROWS(FN(fb32)(NX_Q8_0, w + r * rb, n / 32, a, res + r * NTC, NTC))) break;
    case NX_Q4_0: NX_NT_SWITCH(NX_ROWS(FN(fb32)(NX_Q4_0, w + r * rb, n / 32, a, res + r * NTC, NTC))) break;
    case NX_Q5_0: NX_NT_SWITCH(NX_ROWS(FN(fb32)(NX_Q5_0, w + r * rb, n / 32, a, res + r * NTC, NTC))) break;
    case NX_IQ4_NL: NX_NT_SWITCH(NX_ROWS(FN(fb32)(NX_IQ4_NL, w + r * rb, n / 32, a, res + r * NTC, NTC))) break;
    case NX_Q5_0_R8: NX_NT_SWITCH(NX_ROWS(FN(fq5r8)(w + r * rb, n / 32, a, res + r * NTC, NTC))) break;
    case NX_Q8_0_R8: NX_NT_SWITCH(NX_ROWS(FN(fb32r)(NX_Q8_0_R8, w + r * rb, n / 32, a, res + r * NTC, NTC))) break;
    case NX_Q4_0_R8: NX_NT_SWITCH(NX_ROWS(FN(fb32r)(NX_Q4_0_R8, w + r * rb, n / 32, a, res + r * NTC, NTC))) break;
    case NX_IQ4_NL_R8: NX_NT_SWITCH(NX_ROWS(FN(fb32r)(NX_IQ4_NL_R8, w + r * rb, n / 32, a, res + r * NTC, NTC))) break;
    case NX_Q4_K: NX_NT_SWITCH(NX_ROWS(FN(fq45k)(NX_Q4_K, w + r * rb, n / 256, a, res + r * NTC, NTC))) break;
    case NX_Q4_K_R8: NX_NT_SWITCH(NX_ROWS(FN(fq4kr)(NX_Q4_K_R8, w + r * rb, n / 256, a, res + r * NTC, NTC))) break;
    case NX_Q5_K_R8: NX_NT_SWITCH(NX_ROWS(FN(fq4kr)(NX_Q5_K_R8, w + r * rb, n / 256, a, res + r * NTC, NTC))) break;
    case NX_Q5_K: NX_NT_SWITCH(NX_ROWS(FN(fq45k)(NX_Q5_K, w + r * rb, n / 256, a, res + r * NTC, NTC))) break;
    case NX_Q6_K: NX_NT_SWITCH(NX_ROWS(FN(fq6k)(w + r * rb, n / 256, a, res + r * NTC, NTC))) break;
    case NX_IQ4_XS: NX_NT_SWITCH(NX_ROWS(FN(fiq4xs)(w + r * rb, n / 256, a, res + r * NTC, NTC))) break;
    case NX_IQ4_XS_R8: NX_NT_SWITCH(NX_ROWS(FN(fiq4xsr)(w + r * rb, n / 256, a, res + r * NTC, NTC))) break;
    case NX_Q2_K: NX_NT_SWITCH(NX_ROWS(FN(fq23k)(NX_Q2_K, w + r * rb, n / 256, a, res + r * NTC, NTC))) break;
    case NX_Q3_K: NX_NT_SWITCH(NX_ROWS(FN(fq23k)(NX_Q3_K, w + r * rb, n / 256, a, res + r * NTC, NTC))) break;
    case NX_Q2_K_R8: NX_NT_SWITCH(NX_ROWS(FN(fq23kr)(NX_Q2_K_R8, w + r * rb, n / 256, a, res + r * NTC, NTC))) break;
    case NX_Q6_K_R8: NX_NT_SWITCH(NX_ROWS(FN(fq6kr)(w + r * rb, n / 256, a, res + r * NTC, NTC))) break;
    case NX_Q3_K_R8: NX_NT_SWITCH(NX_ROWS(FN(fq23kr)(NX_Q3_K_R8, w + r * rb, n / 256, a, res + r * NTC, NTC))) break;
    }
}
/* res[t] = row . act[t] for t < nt (1..4), fused types only */
static inline void FN(fused_dot)(int type, const uint8_t *w, int64_t n, const uint8_t *const *a, float *res, int nt) {
    FN(fused_dots)(type, w, 0, 1, n, a, res, nt);
}
#else
static inline int FN(has_fused)(int type) { (void)type; return 0; }
static void FN(fused_dots)(int type, const uint8_t *w, size_t rb, int R, int64_t n, const uint8_t *const *a,
                           float *res, int nt) {
    (void)type; (void)w; (void)rb; (void)R; (void)n; (void)a; (void)res; (void)nt;
}
static inline void FN(fused_dot)(int type, const uint8_t *w, int64_t n, const uint8_t *const *a, float *res, int nt) {
    (void)type; (void)w; (void)n; (void)a; (void)res; (void)nt;
}
#endif

/* the dense linear's multi-token kernels (dense_rows) */
#include "linear_impl.h"

/* res[j] = dot(row, acts(j)) for j < ns, acts(j) = abase + aoff[j] (aoff NULL: abase + j*astride) */
static inline void FN(row_dots)(int type, int fam, int sgn, const uint8_t *row, int64_t n, const uint8_t *abase,
                                const int32_t *aidx, size_t astride, int64_t ns, float *res, void *scratch) {
    if (FN(has_fused)(type)) {
#ifndef NX_GRP
#define NX_GRP 4
#endif
        for (int64_t j = 0; j < ns; j += NX_GRP) {
            const int nt = ns - j < NX_GRP ? (int)(ns - j) : NX_GRP;
            const uint8_t *ap[4];
            for (int t = 0; t < nt; t++) ap[t] = abase + (size_t)(aidx ? aidx[j + t] : j + t) * astride;
            FN(fused_dot)(type, row, n, ap, res + j, nt);
        }
        return;
    }
#if NX_PATH >= 1
    if (type == NX_F16 && ns <= 16) {   /* decode-sized calls: dot the halves in place, 1-4 tokens a pass */
        for (int64_t j = 0; j < ns; j += 4) {
            const int nt = ns - j < 4 ? (int)(ns - j) : 4;
            const float *xp[4];
            for (int t = 0; t < nt; t++) xp[t] = (const float *)(abase + (size_t)(aidx ? aidx[j + t] : j + t) * astride);
            switch (nt) {
            case 1: FN(dot_f16_nt)(row, xp, n, res + j, 1); break;
            case 2: FN(dot_f16_nt)(row, xp, n, res + j, 2); break;
            case 3: FN(dot_f16_nt)(row, xp, n, res + j, 3); break;
            default: FN(dot_f16_nt)(row, xp, n, res + j, 4); break;
            }
        }
        return;
    }
#endif
    const void *wr = FN(prep_row)(type, fam, row, n, scratch);
    for (int64_t j = 0; j < ns; j++)
        res[j] = FN(dot_row)(fam, sgn, wr, abase + (size_t)(aidx ? aidx[j] : j) * astride, n);
}

#define NX_TILE_T 64   /* tokens per phase-2 tile */
#ifndef NX_RB2_MAX
#define NX_RB2_MAX 64  /* most output rows per phase-2 work unit */
#endif
/* res[j * ld + (r - r0)] = dot(row r of expert e, acts(j)) for rows r0..r1-1 and j < ns
 * (fused types only), tiled: for each NX_TILE_R rows (kept in L2), each group of NX_GRP tokens
 * (kept in L1) meets every row of the tile.  Same per-(row, group) dots as row_dots, so results
 * are bit-identical; 1.12-1.18x faster than rows-outside at T=128..512 on the Air shape (paired
 * A/B in one process), ~1.03x at T=64. */
static void FN(tile_dots)(const nx_tensor *t, int64_t e, int64_t r0, int64_t r1, const uint8_t *abase,
                          const int32_t *aidx, size_t astride, int64_t ns, float *res, int64_t ld) {
#ifndef NX_TILE_R
#define NX_TILE_R 64   /* rows per tile: 64 Q4_K gate + up rows of 4096 are ~300 KB, in L2 */
#endif
    for (int64_t q0 = r0; q0 < r1; q0 += NX_TILE_R)
    for (int64_t j = 0; j < ns; j += NX_GRP) {
        const int nt = ns - j < NX_GRP ? (int)(ns - j) : NX_GRP;
        const uint8_t *ap[4];
        for (int i = 0; i < nt; i++) ap[i] = abase + (size_t)(aidx ? aidx[j + i] : j + i) * astride;
        for (int64_t r = q0; r < (q0 + NX_TILE_R < r1 ? q0 + NX_TILE_R : r1); r++) {
            float v[4];
            FN(fused_dot)(t->type, t->data + (e * t->rows + r) * t->row_bytes, t->cols, ap, v, nt);
            for (int i = 0; i < nt; i++) res[(j + i) * ld + (r - r0)] = v[i];
        }
    }
}

/* ------------------------------------------------------------------ the fused MoE call */
static inline void FN(prefetch)(const uint8_t *p, int64_t n) {
    for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(p + i, 0, 3);
}

static inline float FN(silu)(float g) { return g / (1.0f + expf(-g)); }

static inline size_t FN(block_elems)(int fam) { fam = FN(canon)(fam); return fam == NX_FAM_K ? 256 : fam == NX_FAM_B32 ? 32 : 1; }

/* Returns 0, -1 (allocation failed), -3 (an expert id out of range: nothing written). */
int NX_CAT(nx_moe_forward, NX_SFX)(const float *x, int64_t T, const int32_t *ids, const float *wts,
                                    int64_t K, const nx_tensor *gate, const nx_tensor *up,
                                    const nx_tensor *down, float *out, int nthreads) {
    const int64_t E = gate->n_expert, I = gate->rows, H = gate->cols, P = T * K;
    const int fg = FN(family)(gate->type), fu = FN(family)(up->type), fd = FN(family)(down->type);
    const int sg = FN(is_signed)(gate->type), su = FN(is_signed)(up->type), sd = FN(is_signed)(down->type);
    if (nthreads < 1) nthreads = 1;
    for (int64_t p = 0; p < P; p++)
        if (ids[p] < 0 || ids[p] >= E) return -3;

    /* 1. group pairs by expert (counting sort, stable: pairs of one expert in token order) */
    int64_t *start = (int64_t *)calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *fill = (int64_t *)malloc((size_t)E * sizeof(int64_t));
    int32_t *ptok = (int32_t *)malloc((size_t)P * sizeof(int32_t));
    float *pw = (float *)malloc((size_t)P * sizeof(float));
    int32_t *active = (int32_t *)malloc((size_t)E * sizeof(int32_t));
    /* activations: x for gate / up (shared when same family), g/u results, down activations */
    const size_t axg = FN(act_bytes)(fg, H), axu = FN(act_bytes)(fu, H), aad = FN(act_bytes)(fd, I);
    uint8_t *qxg = fg == NX_FAM_F ? NULL : (uint8_t *)malloc((size_t)T * axg);
    uint8_t *qxu = (fu == NX_FAM_F || fu == fg) ? NULL : (uint8_t *)malloc((size_t)T * axu);
    float *G = (float *)malloc((size_t)P * I * sizeof(float) * 2);
    uint8_t *qa = fd == NX_FAM_F ? NULL : (uint8_t *)malloc((size_t)P * aad);
    /* per-thread scratch: one decoded row (generic path only) + a result per pair */
    const int need_dec = !FN(has_fused)(gate->type) || !FN(has_fused)(up->type) || !FN(has_fused)(down->type);
    size_t dec = 0;
    if (need_dec) {
        const size_t a1 = FN(unpacked_bytes)(fg, H), a2 = FN(unpacked_bytes)(fu, H), a3 = FN(unpacked_bytes)(fd, I);
        dec = ((a1 > a2 ? a1 : a2) > a3 ? (a1 > a2 ? a1 : a2) : a3) + 64;
    }
    /* results: one per pair (row_dots), or a tile of NX_TILE_T tokens x at most 64 rows (phase 2) */
    const size_t nres = (size_t)P > (size_t)NX_TILE_T * NX_RB2_MAX ? (size_t)P : (size_t)NX_TILE_T * NX_RB2_MAX;
    const size_t scr_stride = ((dec + nres * sizeof(float)) + 127) & ~(size_t)63;
    uint8_t *scr_all = (uint8_t *)aligned_alloc(64, scr_stride * (size_t)nthreads);
    if (!start || !fill || !ptok || !pw || !active || (fg != NX_FAM_F && !qxg) || (fu != NX_FAM_F && fu != fg && !qxu) ||
        !G || (fd != NX_FAM_F && !qa) || !scr_all) {
        free(start); free(fill); free(ptok); free(pw); free(active); free(qxg); free(qxu); free(G); free(qa); free(scr_all);
        return -1;
    }
    float *U = G + P * I;
    const uint8_t *ag = fg == NX_FAM_F ? (const uint8_t *)x : qxg;
    const uint8_t *au = fu == NX_FAM_F ? (const uint8_t *)x : (fu == fg ? ag : qxu);
    const size_t sxg = fg == NX_FAM_F ? (size_t)H * 4 : axg, sxu = fu == NX_FAM_F ? (size_t)H * 4 : axu;

    for (int64_t p = 0; p < P; p++) start[ids[p] + 1]++;
    int64_t nact = 0;
    for (int64_t e = 0; e < E; e++) { if (start[e + 1]) active[nact++] = (int32_t)e; start[e + 1] += start[e]; }
    memcpy(fill, start, (size_t)E * sizeof(int64_t));
    for (int64_t p = 0; p < P; p++) { int64_t s = fill[ids[p]]++; ptok[s] = (int32_t)(p / K); pw[s] = wts[p]; }
    free(fill);

    /* threads: small calls (the bytes they must read) do not pay for a parallel region */
    const double work = (double)nact * (double)(I * (gate->row_bytes + up->row_bytes) + H * down->row_bytes) +
                        (double)P * (double)(3 * H * I) * 0.25;
    int nth = nthreads;
    const double mw = (double)nx_min_work_per_thread;                   /* default 16 KiB */
    if (mw > 0 && work < (double)nth * mw) nth = (int)(work / mw) + 1;
    if (nth > nthreads) nth = nthreads;

    /* work units. phase 1: (active expert, block of I rows aligned to the down activations' blocks,
     * so each unit can finish silu(g)*u and quantize its blocks itself); phase 2: blocks of H rows */
    const int64_t ab = (int64_t)FN(block_elems)(fd);
    int64_t rb1 = (I * nact) / ((int64_t)nth * 16);
    if (rb1 > 128) rb1 = 128;
    rb1 = rb1 / ab * ab;
    if (rb1 < ab) rb1 = ab;
    if (ab == 1 && rb1 < 8) rb1 = 8;
    const int64_t nrb1 = (I + rb1 - 1) / rb1, nu1 = nact * nrb1;
    int64_t rb2 = H / ((int64_t)nth * 16);
    if (rb2 < 8) rb2 = 8;
    if (rb2 > NX_RB2_MAX) rb2 = NX_RB2_MAX;
    const int64_t nu2 = (H + rb2 - 1) / rb2;
    const uint8_t *aa = qa ? qa : (const uint8_t *)G;
    const size_t sa = qa ? aad : (size_t)I * 4;
    const int par_quant = T * H > (1 << 16);

    /* 2. quantize x once (small T: here, before the threads start) */
    if (!par_quant)
        for (int64_t t = 0; t < T; t++) {
            if (qxg) FN(quant_act)(fg, x + t * H, H, qxg + t * axg);
            if (qxu) FN(quant_act)(fu, x + t * H, H, qxu + t * axu);
        }

#pragma omp parallel num_threads(nth) if (nth > 1)
    {
        uint8_t *scratch = scr_all + scr_stride * (size_t)omp_get_thread_num();
        float *res = (float *)(scratch + dec);
        if (par_quant) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < T; t++) {
                if (qxg) FN(quant_act)(fg, x + t * H, H, qxg + t * axg);
                if (qxu) FN(quant_act)(fu, x + t * H, H, qxu + t * axu);
            }
        }
        /* 3. gate / up, then a = silu(g) * u for the unit's rows, quantized for down */
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < nu1; unit++) {
            const int64_t e = active[unit / nrb1], r0 = (unit % nrb1) * rb1;
            const int64_t r1 = r0 + rb1 < I ? r0 + rb1 : I;
            const int64_t s0 = start[e], ns = start[e + 1] - s0;
            if (ns > NX_GRP && FN(has_fused)(gate->type) && FN(has_fused)(up->type)) {
                /* many tokens (prefill): tiles of rows x 4-token groups (tile_dots), so a group's
                 * activations stay in L1 while the tile's rows (in L2) pass them; one row at a
                 * time would pull every token's activations from L2 once per row */
                FN(tile_dots)(gate, e, r0, r1, ag, ptok + s0, sxg, ns, G + s0 * I + r0, I);
                FN(tile_dots)(up, e, r0, r1, au, ptok + s0, sxu, ns, U + s0 * I + r0, I);
            } else if (FN(has_fused)(gate->type) && FN(has_fused)(up->type)) {
                /* decode-sized (1..NX_GRP tokens): the unit's rows in one dispatch per matrix */
                const uint8_t *apg[NX_GRP], *apu[NX_GRP];
                for (int64_t j = 0; j < ns; j++) { apg[j] = ag + (size_t)ptok[s0 + j] * sxg; apu[j] = au + (size_t)ptok[s0 + j] * sxu; }
                const int R = (int)(r1 - r0), nt = (int)ns;
                FN(fused_dots)(gate->type, gate->data + (e * I + r0) * gate->row_bytes, gate->row_bytes, R, H, apg, res, nt);
                for (int r = 0; r < R; r++)
                    for (int j = 0; j < nt; j++) G[(s0 + j) * I + r0 + r] = res[r * nt + j];
                FN(fused_dots)(up->type, up->data + (e * I + r0) * up->row_bytes, up->row_bytes, R, H, apu, res, nt);
                for (int r = 0; r < R; r++)
                    for (int j = 0; j < nt; j++) U[(s0 + j) * I + r0 + r] = res[r * nt + j];
            } else {
                for (int64_t r = r0; r < r1; r++) {
                    const uint8_t *wg = gate->data + (e * I + r) * gate->row_bytes, *wu = up->data + (e * I + r) * up->row_bytes;
#ifndef NX_PF_ROWS
#define NX_PF_ROWS 0
#endif
                    if (NX_PF_ROWS > 0 && r + NX_PF_ROWS < r1) {
                        FN(prefetch)(wg + NX_PF_ROWS * gate->row_bytes, gate->row_bytes);
                        FN(prefetch)(wu + NX_PF_ROWS * up->row_bytes, up->row_bytes);
                    }
                    FN(row_dots)(gate->type, fg, sg, wg, H, ag, ptok + s0, sxg, ns, res, scratch);
                    for (int64_t j = 0; j < ns; j++) G[(s0 + j) * I + r] = res[j];
                    FN(row_dots)(up->type, fu, su, wu, H, au, ptok + s0, sxu, ns, res, scratch);
                    for (int64_t j = 0; j < ns; j++) U[(s0 + j) * I + r] = res[j];
                }
            }
            for (int64_t s = s0; s < s0 + ns; s++) {
                float *g = G + s * I;
                const float *u = U + s * I;
                for (int64_t i = r0; i < r1; i++) g[i] = FN(silu)(g[i]) * u[i];
                if (qa) FN(quant_act_range)(fd, g, I, r0, r1, qa + s * aad);
            }
        }
        /* 4. down, accumulated into out: every output row is owned by one unit and summed over
         * experts and pairs in a fixed order (deterministic, independent of the thread count) */
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < nu2; unit++) {
            const int64_t r0 = unit * rb2, r1 = r0 + rb2 < H ? r0 + rb2 : H;
            for (int64_t t = 0; t < T; t++) memset(out + t * H + r0, 0, (size_t)(r1 - r0) * sizeof(float));
            for (int64_t ia = 0; ia < nact; ia++) {
                const int64_t e = active[ia], s0 = start[e], ns = start[e + 1] - s0;
                if (ns > NX_GRP && FN(has_fused)(down->type)) {
                    /* as in phase 1, in chunks of NX_TILE_T tokens (res holds one chunk); each
                     * out element still gets its experts' and pairs' terms in the same order */
                    for (int64_t j0 = 0; j0 < ns; j0 += NX_TILE_T) {
                        const int64_t nj = ns - j0 < NX_TILE_T ? ns - j0 : NX_TILE_T;
                        FN(tile_dots)(down, e, r0, r1, aa + (s0 + j0) * sa, NULL, sa, nj, res, r1 - r0);
                        for (int64_t j = 0; j < nj; j++) {
                            float *o = out + ptok[s0 + j0 + j] * H;
                            const float wj = pw[s0 + j0 + j];
                            for (int64_t r = r0; r < r1; r++) o[r] += wj * res[j * (r1 - r0) + (r - r0)];
                        }
                    }
                    continue;
                }
                if (FN(has_fused)(down->type)) {   /* 1..NX_GRP pairs: the unit's rows in one dispatch */
                    const uint8_t *ap[NX_GRP];
                    for (int64_t j = 0; j < ns; j++) ap[j] = aa + (size_t)(s0 + j) * sa;
                    const int R = (int)(r1 - r0), nt = (int)ns;
                    FN(fused_dots)(down->type, down->data + (e * H + r0) * down->row_bytes, down->row_bytes, R, I, ap, res, nt);
                    for (int r = 0; r < R; r++)
                        for (int j = 0; j < nt; j++) out[ptok[s0 + j] * H + r0 + r] += pw[s0 + j] * res[r * nt + j];
                    continue;
                }
                for (int64_t r = r0; r < r1; r++) {
                    const uint8_t *wd = down->data + (e * H + r) * down->row_bytes;
                    if (NX_PF_ROWS > 0 && r + NX_PF_ROWS < r1) FN(prefetch)(wd + NX_PF_ROWS * down->row_bytes, down->row_bytes);
                    FN(row_dots)(down->type, fd, sd, wd, I, aa + s0 * sa, NULL, sa, ns, res, scratch);
                    for (int64_t j = 0; j < ns; j++) out[ptok[s0 + j] * H + r] += pw[s0 + j] * res[j];
                }
            }
        }
    }
    free(start); free(ptok); free(pw); free(active); free(qxg); free(qxu); free(G); free(qa); free(scr_all);
    return 0;
}

/* ------------------------------------------------------------------ the dense linear call
 * out[t * ld + r0_p + r] = dot(row r of part p's first matrix, x[t]) for every part p (stacked by
 * rows: part p's outputs start at column r0_p = the rows of the parts before it), r < rows_p,
 * t < T: the non-expert weights that sit on the CPU (attention, dense and shared FFNs, the head),
 * read in their GGUF blocks instead of a float copy 2-8x their size.  The same activation
 * quantization and dot cores as the MoE call, so the same per-type tolerances hold.  Parallel
 * (dynamic) over blocks of rows of all the parts in ONE region: q/k/v or gate/up as one call, not
 * one region each (a region costs ~1.3 us with 2 threads against ~0.5 us for a barrier:
 * benchmarks/omp_cost.c; the demo's blocks have 3 q/k/v and 2 gate/up parts); each row is read once per call whatever T is; many
 * tokens go through tile_dots as in phase 2.  A part's rows get the same bits whatever the other
 * parts, the thread count or the row blocks are.  Returns 0 or -1 (allocation failed). */
#ifndef NX_MAX_LIN_PARTS
#define NX_MAX_LIN_PARTS 4   /* most parts of one stacked weight (block.h's NX_MAX_PARTS) */
#endif
static int FN(lin_multi)(const float *x, int64_t T, const nx_tensor *parts, int n_parts, float *out, int64_t ld,
                         int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (T <= 0 || n_parts < 1) return 0;
    if (n_parts > NX_MAX_LIN_PARTS) return -1;
    const int64_t H = parts[0].cols;
    double work = 0.0;
    for (int p = 0; p < n_parts; p++)
        work += (double)parts[p].rows * (double)parts[p].row_bytes + (double)T * (double)(parts[p].rows * H) * 0.25;
    int nth = nthreads;
    const double mw = (double)nx_min_work_per_thread;
    if (mw > 0 && work < (double)nth * mw) nth = (int)(work / mw) + 1;
    if (nth > nthreads) nth = nthreads;
    /* per part: its row block, first unit, activations (parts of one type share them), aux rows */
    int64_t rb[NX_MAX_LIN_PARTS], u0[NX_MAX_LIN_PARTS + 1], c0[NX_MAX_LIN_PARTS];
    int src[NX_MAX_LIN_PARTS];   /* the part whose quantized activations this part reads */
    size_t ax[NX_MAX_LIN_PARTS], sx[NX_MAX_LIN_PARTS], off[NX_MAX_LIN_PARTS], aoff[NX_MAX_LIN_PARTS];
    size_t qbytes = 0, abytes = 0, dec = 0, nres = (size_t)T;
    u0[0] = 0;
    for (int p = 0; p < n_parts; p++) {
        const nx_tensor *w = &parts[p];
        const int fam = FN(family)(w->type);
        int64_t b = w->rows / ((int64_t)nth * 8);
        if (b < 8) b = 8;
        if (b > NX_RB2_MAX) b = NX_RB2_MAX;
        rb[p] = b;
        u0[p + 1] = u0[p] + (w->rows + b - 1) / b;
        c0[p] = p ? c0[p - 1] + parts[p - 1].rows : 0;
        ax[p] = FN(act_bytes)(fam, H);
        sx[p] = FN(lin_kind)(w->type) ? FN(lin_aux_bytes)(w->type, H) : 0;
        src[p] = p;
        for (int q = 0; q < p; q++)
            if (parts[q].type == w->type) { src[p] = q; break; }
        off[p] = aoff[p] = 0;
        if (src[p] == p && fam != NX_FAM_F) { off[p] = qbytes; qbytes += (size_t)T * ax[p]; }
        if (src[p] == p && sx[p]) { aoff[p] = abytes; abytes += (size_t)T * sx[p]; }
        if (src[p] != p) { off[p] = off[src[p]]; aoff[p] = aoff[src[p]]; }
        if (!FN(has_fused)(w->type)) {
            const size_t d = FN(unpacked_bytes)(fam, H) + 64;
            if (d > dec) dec = d;
        }
        const size_t tile = (size_t)NX_TILE_T * (size_t)b;
        if (tile > nres) nres = tile;
    }
    const int64_t nu = u0[n_parts];
    uint8_t *qx = qbytes ? (uint8_t *)malloc(qbytes) : NULL;
    uint8_t *aux = abytes ? (uint8_t *)malloc(abytes) : NULL;
    const size_t scr_stride = ((dec + nres * sizeof(float)) + 127) & ~(size_t)63;
    uint8_t *scr_all = (uint8_t *)aligned_alloc(64, scr_stride * (size_t)nth);
    if ((qbytes && !qx) || (abytes && !aux) || !scr_all) { free(qx); free(aux); free(scr_all); return -1; }
    const int par_quant = T * H > (1 << 16);
    /* quantize x once per type (small T: here, before the threads start) */
    if (!par_quant)
        for (int p = 0; p < n_parts; p++) {
            if (src[p] != p || FN(family)(parts[p].type) == NX_FAM_F) continue;
            for (int64_t t = 0; t < T; t++) {
                FN(quant_act)(FN(family)(parts[p].type), x + t * H, H, qx + off[p] + t * ax[p]);
                if (FN(lin_kind)(parts[p].type))   /* in place (Q8_0_R8's offset codes), plus aux rows */
                    FN(lin_prep)(parts[p].type, qx + off[p] + t * ax[p], H, sx[p] ? aux + aoff[p] + t * sx[p] : NULL);
            }
        }

#pragma omp parallel num_threads(nth) if (nth > 1)
    {
        uint8_t *scratch = scr_all + scr_stride * (size_t)omp_get_thread_num();
        float *res = (float *)(scratch + dec);
        if (par_quant)
            for (int p = 0; p < n_parts; p++) {
                if (src[p] != p || FN(family)(parts[p].type) == NX_FAM_F) continue;
#pragma omp for schedule(static)
                for (int64_t t = 0; t < T; t++) {
                    FN(quant_act)(FN(family)(parts[p].type), x + t * H, H, qx + off[p] + t * ax[p]);
                    if (FN(lin_kind)(parts[p].type))   /* in place (Q8_0_R8's offset codes), plus aux rows */
                    FN(lin_prep)(parts[p].type, qx + off[p] + t * ax[p], H, sx[p] ? aux + aoff[p] + t * sx[p] : NULL);
                }
            }
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < nu; unit++) {
            int p = 0;
            while (unit >= u0[p + 1]) p++;
            const nx_tensor *w = &parts[p];
            const int fam = FN(family)(w->type);
            const int64_t N = w->rows, r0 = (unit - u0[p]) * rb[p], r1 = r0 + rb[p] < N ? r0 + rb[p] : N, nr = r1 - r0;
            const uint8_t *a = fam == NX_FAM_F ? (const uint8_t *)x : qx + off[p];
            const size_t sa = fam == NX_FAM_F ? (size_t)H * 4 : ax[p];
            float *o = out + c0[p];
            if (FN(lin_kind)(w->type)) { FN(dense_rows)(w, r0, r1, a, sa, sx[p] ? aux + aoff[p] : NULL, sx[p], T, o, ld); continue; }
            if (T > NX_GRP && FN(has_fused)(w->type)) {
                for (int64_t j0 = 0; j0 < T; j0 += NX_TILE_T) {
                    const int64_t nj = T - j0 < NX_TILE_T ? T - j0 : NX_TILE_T;
                    FN(tile_dots)(w, 0, r0, r1, a + (size_t)j0 * sa, NULL, sa, nj, res, nr);
                    for (int64_t j = 0; j < nj; j++)
                        memcpy(o + (j0 + j) * ld + r0, res + j * nr, (size_t)nr * sizeof(float));
                }
                continue;
            }
            if (FN(has_fused)(w->type)) {   /* 1..NX_GRP tokens: the unit's rows in one dispatch */
                const uint8_t *ap[NX_GRP];
                for (int64_t j = 0; j < T; j++) ap[j] = a + (size_t)j * sa;
                FN(fused_dots)(w->type, w->data + r0 * w->row_bytes, w->row_bytes, (int)nr, H, ap, res, (int)T);
                for (int64_t r = 0; r < nr; r++)
                    for (int64_t j = 0; j < T; j++) o[j * ld + r0 + r] = res[r * T + j];
                continue;
            }
            for (int64_t r = r0; r < r1; r++) {
                FN(row_dots)(w->type, fam, FN(is_signed)(w->type), w->data + r * w->row_bytes, H, a, NULL, sa, T, res, scratch);
                for (int64_t j = 0; j < T; j++) o[j * ld + r] = res[j];
            }
        }
    }
    free(qx); free(scr_all); free(aux);
    return 0;
}

int NX_CAT(nx_linear, NX_SFX)(const float *x, int64_t T, const nx_tensor *w, float *out, int64_t ld,
                               int nthreads) {
    return FN(lin_multi)(x, T, w, 1, out, ld, nthreads);
}

/* Per-head matrices (latent attention's k_b / v_b: one small matrix a head): out [T, E, N] =
 * x [T, E, K] through w's matrix e for head e. Each head is lin_multi over its own matrix and its
 * T rows (gathered into scratch), so a head's row gets the bits nx_linear gives it, in any batch
 * and on any number of threads. One call for all heads: a head's matrix (GLM-4.7-Flash: 512 x
 * 192, 256 x 512) is too small for a call from Python of its own (20 heads, 2 matrices, every
 * layer), and too small to split between threads: with at least as many heads as threads, the
 * threads take whole heads (one parallel region, not one a head). Returns 0 or -1. */
int NX_CAT(nx_linear_heads, NX_SFX)(const float *x, int64_t T, const nx_tensor *w, float *out, int nthreads) {
    const int64_t E = w->n_expert, N = w->rows, K = w->cols;
    if (nthreads < 1) nthreads = 1;
    if (T <= 0) return 0;
    const int by_head = E >= nthreads && nthreads > 1;
    const int nth = by_head ? nthreads : 1;
    float *xe_all = (float *)malloc((size_t)nth * (size_t)T * (size_t)K * sizeof(float));
    if (!xe_all) return -1;
    int rc = 0;
#pragma omp parallel for num_threads(nth) if (by_head) schedule(dynamic, 1) reduction(| : rc)
    for (int64_t e = 0; e < E; e++) {
        float *xe = xe_all + (size_t)omp_get_thread_num() * (size_t)T * (size_t)K;
        nx_tensor part = *w;
        part.n_expert = 1;
        part.data = w->data + (size_t)e * (size_t)N * (size_t)w->row_bytes;
        for (int64_t t = 0; t < T; t++) memcpy(xe + t * K, x + (t * E + e) * K, (size_t)K * sizeof(float));
        rc |= FN(lin_multi)(xe, T, &part, 1, out + e * N, E * N, by_head ? 1 : nthreads) != 0;
    }
    free(xe_all);
    return rc ? -1 : 0;
}

/* ------------------------------------------------------------------ dequantization to float32
 * out[i * cols + c] = element c of matrix row rows[i] (rows NULL: every row of the tensor, E * rows
 * of them, in order). The values equal gguf's reference decoder, bit for bit: the same float
 * operations in the same order. A block scale times a sub-block scale is exact in float32 (an
 * fp16 scale, <= 8-bit sub-block scales); times a code of <= 5 bits it stays exact, so adding a min
 * or a zero-point offset rounds once, as the reference's one rounding; Q3_K and Q6_K subtract their
 * zero point from the code first, as the reference does (a 6-bit code's product may round).
 * For weights bound for a GPU, dequantized once at load, and for embedding rows looked up on the
 * CPU. Threads split the rows. Returns 0 or -1 (allocation failed). */
static void FN(dequant_row)(int type, int fam, const uint8_t *src, int64_t H, void *scratch, float *restrict o) {
    const void *p = FN(prep_row)(type, fam, src, H, scratch);
    fam = FN(canon)(fam);
    if (fam == NX_FAM_F) {
        memcpy(o, p, (size_t)H * sizeof(float));
    } else if (fam == NX_FAM_B32) {
        /* ub32 rows in structure-of-arrays form: codes, then d[nb], then off[nb] = zero point * d
         * (Q4_0, Q5_0: -8d, -16d; exact, so d*q + off is d*(q - zero point) rounded once) or a min */
        const int64_t nb = H / 32;
        const int8_t *q = (const int8_t *)p;
        const float *d = (const float *)((const uint8_t *)p + 32 * nb), *off = d + nb;
        for (int64_t b = 0; b < nb; b++)
            for (int j = 0; j < 32; j++) o[32 * b + j] = d[b] * (float)q[32 * b + j] + off[b];
    } else {
        /* uk256: element j has scale d * scv[j/2] (a lane of the maddubs pair it falls in) and
         * offset off[j/16]; Q3_K and Q6_K keep a zero point in the offset (4 and 32 times d*sc),
         * subtracted from the code first as the reference does (their product may round) */
        const int zp = type == NX_Q6_K ? 32 : type == NX_Q3_K ? 4 : 0;
        const uk256 *u = (const uk256 *)p;
        for (int64_t b = 0; b < H / 256; b++, u++) {
            for (int g = 0; g < 16; g++, o += 16) {  /* 16 elements share a scale and an offset */
                const float ds = u->d * (float)u->scv[8 * g], off = u->off[g];
                const int8_t *q = u->q + 16 * g;
                if (zp) {
                    for (int j = 0; j < 16; j++) o[j] = ds * (float)(q[j] - zp);
                } else {
                    for (int j = 0; j < 16; j++) o[j] = ds * (float)q[j] + off;
                }
            }
        }
    }
}

int NX_CAT(nx_dequant_rows, NX_SFX)(const nx_tensor *w, const int64_t *rows, int64_t n, float *out, int nthreads) {
    const int64_t H = w->cols;
    const int fam = FN(family)(w->type);
    if (n <= 0) return 0;
    if (nthreads < 1) nthreads = 1;
    int nth = nthreads;
    const double work = (double)n * (double)H * 4.0, mw = (double)nx_min_work_per_thread;
    if (mw > 0 && work < (double)nth * mw) nth = (int)(work / mw) + 1;
    if (nth > nthreads) nth = nthreads;
    const size_t stride = (FN(unpacked_bytes)(fam, H) + 64 + 63) & ~(size_t)63;
    uint8_t *scr_all = (uint8_t *)aligned_alloc(64, stride * (size_t)nth);
    if (!scr_all) return -1;
#pragma omp parallel num_threads(nth) if (nth > 1)
    {
        uint8_t *scratch = scr_all + stride * (size_t)omp_get_thread_num();
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            const int64_t r = rows ? rows[i] : i;
            FN(dequant_row)(w->type, fam, w->data + r * w->row_bytes, H, scratch, out + i * H);
        }
    }
    free(scr_all);
    return 0;
}

/* ------------------------------------------------------------------ whole decoder blocks */
#include "block.h"
#include "block_impl.h"
