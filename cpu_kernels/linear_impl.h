/* The dense linear's multi-token kernels (SIMD paths), included by moe_impl.h after the fused dots.
 *
 * Why: a batched decoding step or an MTP verify multiplies 2-16 rows by every dense matrix.  One
 * row is bound by the weight bytes (DRAM); every further row should cost only its multiplies, so
 * the kernels decode each weight block once into registers and run all (up to NX_LT) tokens
 * against it, with as little per-token work as possible: one integer dot instruction per 32 code
 * bytes (VNNI vpdpbusd on the AVX-512 path; maddubs + madd on AVX2), the block/sub-block scales
 * prepared once per weight block as float vectors, and 2-4 float ops per token per block.  The
 * F16 kernel converts a chunk of halves once and FMAs it into a tile of rows x tokens.
 *
 * Invariance rule (a token's row must have the same bits alone or in any batch, any position,
 * any thread count): every (row, token) result is computed by the same sequence of float
 * operations whatever nt (the number of tokens in the pass, a compile-time constant after
 * inlining) or the tile of rows is: each token has its own accumulators, the integer parts are
 * exact (so how they are formed does not matter), and the float parts never mix tokens.  The T=1
 * call runs the same kernel with nt = 1.
 *
 * Layouts read: Q8_0_R8, Q4_K_R8 (the repacked rows the loader makes, moe_kernels.h) and F16.
 * The activations are the linear's own copy, post-processed once per call (lin_prep): Q8_0 codes
 * offset by 128 for vpdpbusd (u8 x s8), the correction -128 * sum(q) formed once per weight
 * group; Q4_K's per-32 sums as floats.  Q6_K_R8 keeps the row_dots path: a kernel of this kind
 * for it was 0.91-0.96x that path at 8-16 rows and 0.92x at 512 on GLM-4.5-Air's attn_output in a
 * same-run A/B (benchmarks/linear_ab.py), where Q8_0, Q4_K and F16 gained 1.1-2.3x. */
#if NX_PATH >= 1
#ifndef NX_LT
#define NX_LT 8   /* most tokens per pass over a weight row */
#endif
/* Tokens per pass (dense_rows).  Up to 7: one pass (splitting 5-7 tokens lost 5-15%).  From 8,
 * Q4_K_R8 rows whose 4 tokens' activations fit in NX_L1_ACT bytes (4096 columns: 23 KB) go in
 * passes of 4: one pass of 8 (45 KB, more than a 32 KB L1) ran at 1.6x the time per row-token of
 * two of 4 with the rows in L2 (benchmarks/lin_rate.c: 55.5 against 35.2 ns), and a whole 8-row
 * call on GLM-4.5-Air's attn_qkv 1.15-1.32x faster (benchmarks/linear_ab.py, 2 threads); with
 * the L2 prefetches (NX_PF) one pass of 8 still ran 0.93-0.98x.  Q8_0_R8 goes in passes of
 * NX_LT: each pass reads the weights again, and once its prefetches go to L2 for such passes,
 * 12-16 rows of attn_qkv in passes of 8 ran 1.15-1.19x faster than in passes of 4 (before them,
 * 0.90x).  Wider rows (attn_output, 12288 columns, where no 4 tokens fit) go in passes of NX_LT:
 * at 16 tokens 1.04-1.06x (Q4_K) and 1.19-1.26x (Q8_0) faster than passes of 4. */
#ifndef NX_R2MAX
#define NX_R2MAX 4   /* most tokens of a Q8_0_R8 pass in row pairs on the AVX2 path (lq8r_group: registers) */
#endif
#ifndef NX_IND
#define NX_IND 2   /* most tokens of a Q8_0_R8 pass with independent dots on AVX-512 (lq8r_group) */
#endif
#ifndef NX_L1_ACT
#define NX_L1_ACT (24 * 1024)
#endif

#if NX_PATH == 2
#define NX_DP(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#else
#define NX_DP(acc, u, s) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
#endif

static inline int FN(lin_kind)(int type) {
#ifdef NX_NO_LIN
    (void)type; return 0;
#endif
    return type == NX_Q8_0_R8 || type == NX_Q4_K_R8 || type == NX_F16;
}
/* aux bytes per token (Q4_K_R8: 8 floats per block) */
static inline size_t FN(lin_aux_bytes)(int type, int64_t H) {
    return type == NX_Q4_K_R8 ? (size_t)(H / 256) * 32 : 0;
}

/* one token's quantized activations (quant_act's form) -> the form the kernels read, in place,
 * plus its aux row */
static void FN(lin_prep)(int type, uint8_t *act, int64_t H, uint8_t *aux) {
    if (type == NX_Q8_0_R8) {
#if NX_PATH == 2
        const __m256i m = _mm256_set1_epi8((char)0x80);
        for (int64_t i = 0; i < H; i += 32) FN(st256)(act + i, _mm256_xor_si256(FN(ld256)(act + i), m));
#endif
        (void)aux;
    } else if (type == NX_Q4_K_R8) {
        const ak256 *a = (const ak256 *)act;
        float *bf = (float *)aux;
        for (int64_t b = 0; b < H / 256; b++)
            for (int j = 0; j < 8; j++) bf[8 * b + j] = (float)a[b].bsum32[j];
    }
}

/* The Q8_0_R8 and Q4_K_R8 kernels take R rows at once (1 or 2, a constant after inlining), rows
 * rb bytes apart: with 2, each activation vector is loaded once for both rows' integer dots (at 8
 * tokens, or activations read from L2, the loads and not the dots set the pace; dense_rows picks
 * R). Every (row, token) gets the same exact integer sums and then the same float operations
 * whatever R, so the same bits. With 2 the next pair of rows is fetched ahead at the same offset
 * (NX_PF's 2 KB ahead within a row would leave the start of every other row cold). */
#define NX_PF_R(w, rb, R, n, l2) do { \
        if (R == 1) NX_PF(w, n, l2); \
        else if (NX_PFD > 0) \
            for (int pf_ = 0; pf_ < (n); pf_++) { \
                if (l2) { \
                    __builtin_prefetch((w) + 2 * (rb) + 64 * pf_, 0, 2); \
                    __builtin_prefetch((w) + 3 * (rb) + 64 * pf_, 0, 2); \
                } else { \
                    __builtin_prefetch((w) + 2 * (rb) + 64 * pf_, 0, 0); \
                    __builtin_prefetch((w) + 3 * (rb) + 64 * pf_, 0, 0); \
                } \
            } \
    } while (0)

/* one group of G (8 or 4, a constant after inlining) Q8_0_R8 blocks of R rows for nt tokens: the
 * int32 sums s[r][t] */
NX_FUSED void FN(lq8r_group)(const uint8_t *q, const int64_t rb, const uint8_t *const *a, const int64_t b,
                             __m256i (*s)[NX_LT], const int nt, const int G, const int R) {
    const __m256i zero = _mm256_setzero_si256();
#if NX_PATH == 2
    if (nt <= NX_IND) {
        /* 1-2 tokens: every dot starts from zero and the results are summed with adds (1 cycle,
         * exact), no chain of dependent dots and no group preload: at so few dots per weight
         * byte the chains' latency, not the multiply rate, set the pace.  2 tokens from DRAM, one
         * core: 83-102 against 120-131 ns a row-token (benchmarks/lin_rate.c, Zen 4); at 4
         * tokens, rows in L2, 0.84x as fast, so from 3 tokens the chains stay. */
        const __m256i c80 = _mm256_set1_epi8((char)0x80);
        __m256i cs[2];
        for (int r = 0; r < R; r++) { cs[r] = zero; for (int t = 0; t < nt; t++) s[r][t] = zero; }
        for (int v = 0; v < G; v++) {
            __m256i W[2];
            for (int r = 0; r < R; r++) {
                W[r] = FN(ld256)(q + r * rb + 32 * v);
                cs[r] = _mm256_add_epi32(cs[r], _mm256_dpbusd_epi32(zero, c80, W[r]));
            }
            for (int t = 0; t < nt; t++) {
                const __m256i y = FN(ld256)((const int8_t *)a[t] + 32 * b + 32 * v);
                for (int r = 0; r < R; r++) s[r][t] = _mm256_add_epi32(s[r][t], _mm256_dpbusd_epi32(zero, y, W[r]));
            }
        }
        for (int r = 0; r < R; r++)
            for (int t = 0; t < nt; t++) s[r][t] = _mm256_sub_epi32(s[r][t], cs[r]);
        return;
    }
    __m256i W[2][8];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < G; v++) W[r][v] = FN(ld256)(q + r * rb + 32 * v);
    /* sum((y + 128) * q) - 128 * sum(q) = sum(y * q): the correction once per group */
    const __m256i c80 = _mm256_set1_epi8((char)0x80);
    __m256i corr[2];
    for (int r = 0; r < R; r++) {
        __m256i c0 = zero, c1 = zero;
        for (int v = 0; v < G; v += 2) { c0 = _mm256_dpbusd_epi32(c0, c80, W[r][v]); c1 = _mm256_dpbusd_epi32(c1, c80, W[r][v + 1]); }
        corr[r] = _mm256_sub_epi32(zero, _mm256_add_epi32(c0, c1));
    }
    for (int t = 0; t < nt; t++) {
        const int8_t *yt = (const int8_t *)a[t] + 32 * b;
        /* two independent chains a row (one chain of 8 dependent dots is latency-bound) */
        __m256i s0[2], s1[2];
        for (int r = 0; r < R; r++) { s0[r] = corr[r]; s1[r] = zero; }
        for (int v = 0; v < G; v += 2) {
            const __m256i y0 = FN(ld256)(yt + 32 * v), y1 = FN(ld256)(yt + 32 * v + 32);
            for (int r = 0; r < R; r++) {
                s0[r] = _mm256_dpbusd_epi32(s0[r], y0, W[r][v]);
                s1[r] = _mm256_dpbusd_epi32(s1[r], y1, W[r][v + 1]);
            }
        }
        for (int r = 0; r < R; r++) s[r][t] = _mm256_add_epi32(s0[r], s1[r]);
    }
#else
    /* AVX2: a dot is sign + maddubs + madd + add, and the sum (not the multiply) is the only
     * dependency, so one accumulator per (row, token) and the words outermost: a word's codes and
     * their magnitudes are 2 registers a row and R * nt <= 8 accumulators stay in registers.
     * Holding a whole group's codes and magnitudes (16 registers a row) spilled on AVX2's 16 ymm
     * registers: 8-16 rows of GLM-4.5-Air's attn_qkv / attn_output ran 1.16-1.28x faster this way
     * (benchmarks/linear_ab.py, Zen 3, 2 threads). */
    const __m256i one = _mm256_set1_epi16(1);
    for (int r = 0; r < R; r++)
        for (int t = 0; t < nt; t++) s[r][t] = zero;
#pragma GCC unroll 1
    for (int v = 0; v < G; v++) {
        __m256i W[2], U[2];
        for (int r = 0; r < R; r++) { W[r] = FN(ld256)(q + r * rb + 32 * v); U[r] = _mm256_abs_epi8(W[r]); }
        for (int t = 0; t < nt; t++) {
            const __m256i y = FN(ld256)((const int8_t *)a[t] + 32 * b + 32 * v);
            for (int r = 0; r < R; r++)
                s[r][t] = _mm256_add_epi32(s[r][t], _mm256_madd_epi16(_mm256_maddubs_epi16(U[r], _mm256_sign_epi8(y, W[r])), one));
        }
    }
#endif
}
/* Q8_0_R8 against B32R activations, R rows: res[r][t].  A group of 8 blocks: 8 code registers,
 * word v of block i in int32 lane i, so 8 integer dots leave the 8 block sums in the lanes (no
 * horizontal adds) and one FMA per token scales them by d_w * d_y; a group of 4 holds two words
 * per register (lanes i and 4+i), its halves are added; the last nb % 4 blocks are ggml blocks. */
NX_FUSED void FN(lq8r)(const uint8_t *restrict w, const int64_t rb, const int64_t nb, const uint8_t *const *a,
                       float *const *res, const int nt, const int R) {
    const float *dy[NX_LT];
    __m256 acc[2][NX_LT], accl[2][NX_LT];
    __m128 acc4[2][NX_LT];
    for (int t = 0; t < nt; t++) {
        dy[t] = (const float *)(a[t] + 32 * nb);
        for (int r = 0; r < R; r++) { acc[r][t] = accl[r][t] = _mm256_setzero_ps(); acc4[r][t] = _mm_setzero_ps(); }
    }
    const __m256i zero = _mm256_setzero_si256();
    int64_t b = 0;
    __m256i s[2][NX_LT];
    for (; nb - b >= 8; b += 8, w += 8 * 34) {
        NX_PF_R(w, rb, R, 5, NX_PF_L2(nt, nb * 32, 1));
        FN(lq8r_group)(w + 16, rb, a, b, s, nt, 8, R);
        __m256 dw[2];
        for (int r = 0; r < R; r++) dw[r] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + r * rb)));
        for (int t = 0; t < nt; t++) {
            const __m256 y = _mm256_loadu_ps(dy[t] + b);
            for (int r = 0; r < R; r++)
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r][t]), _mm256_mul_ps(dw[r], y), acc[r][t]);
        }
    }
    if (nb - b >= 4) {
        FN(lq8r_group)(w + 8, rb, a, b, s, nt, 4, R);
        __m128 dw[2];
        for (int r = 0; r < R; r++) dw[r] = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(w + r * rb)));
        for (int t = 0; t < nt; t++) {
            const __m128 y = _mm_loadu_ps(dy[t] + b);
            for (int r = 0; r < R; r++) {
                const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s[r][t]), _mm256_extracti128_si256(s[r][t], 1));
                acc4[r][t] = _mm_fmadd_ps(_mm_cvtepi32_ps(h), _mm_mul_ps(dw[r], y), acc4[r][t]);
            }
        }
        b += 4;
        w += 4 * 34;
    }
    for (; b < nb; b++, w += 34) {   /* the last nb % 4 blocks, ggml blocks */
        float d[2];
        __m256i qv[2], cu[2];   /* cu: the VNNI correction, or the codes' magnitudes (AVX2) */
        for (int r = 0; r < R; r++) {
            d[r] = H2F(FN(rd16)(w + r * rb));
            qv[r] = FN(ld256)(w + r * rb + 2);
#if NX_PATH == 2
            cu[r] = _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, _mm256_set1_epi8((char)0x80), qv[r]));
#else
            cu[r] = _mm256_abs_epi8(qv[r]);
#endif
        }
        for (int t = 0; t < nt; t++) {
            const __m256i yv = FN(ld256)((const int8_t *)a[t] + 32 * b);
            for (int r = 0; r < R; r++) {
#if NX_PATH == 2
                const __m256i p = _mm256_dpbusd_epi32(cu[r], yv, qv[r]);
#else
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(cu[r], _mm256_sign_epi8(yv, qv[r])), _mm256_set1_epi16(1));
#endif
                accl[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d[r] * dy[t][b]), accl[r][t]);
            }
        }
    }
    (void)zero;
    for (int r = 0; r < R; r++)
        for (int t = 0; t < nt; t++) {
            const float s8 = FN(hsum256)(acc[r][t]), s4 = FN(hsum128)(acc4[r][t]), sl = FN(hsum256)(accl[r][t]);
            res[r][t] = (s8 + s4) + sl;
        }
}

/* Q4_K_R8 against KR activations, R rows: register r holds word r of the 8 sub-blocks in lane i, so 8
 * integer dots leave the sub-block sums S_i in the lanes; per token
 *   acc += d_y * (S * (d * sc) - bsum32 * (dmin * m))
 * with d*sc and dmin*m (exact in float) formed once per block. */
NX_FUSED void FN(lq4kr)(const uint8_t *restrict w, const int64_t rb, const int64_t nb, const uint8_t *const *a,
                        const uint8_t *const *x2, float *const *res, const int nt, const int R) {
    const __m256i m4 = _mm256_set1_epi8(15);
    const ak256 *ab[NX_LT];
    const float *bf[NX_LT];
    __m256 acc[2][NX_LT];
    for (int t = 0; t < nt; t++) {
        ab[t] = (const ak256 *)a[t]; bf[t] = (const float *)x2[t];
        for (int r = 0; r < R; r++) acc[r][t] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++, w += 144) {
        NX_PF_R(w, rb, R, 3, NX_PF_L2(nt, nb * 256, 1));
        __m256i Q[2][8];
        __m256 dsc[2], dmm[2];
        for (int r = 0; r < R; r++) {
            const uint8_t *wr = w + r * rb;
            for (int k = 0; k < 8; k += 2) {
                const __m256i v = FN(ld256)(wr + 16 + 16 * k);
                Q[r][k] = _mm256_and_si256(v, m4);
                Q[r][k + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            }
            const float d = H2F(FN(rd16)(wr)), dmin = H2F(FN(rd16)(wr + 2));
            const __m256i ms = FN(k4_scales)(wr);
            dsc[r] = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(ms))));
            dmm[r] = _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(ms, 1))));
        }
        for (int t = 0; t < nt; t++) {
            const int8_t *y = ab[t][b].y;
            __m256i S[2];
#if NX_PATH == 2
            /* two chains of four dependent dots a row (integer: any grouping gives the same sum);
             * four chains of two cost two more adds a token and block, and ran 0.86-0.93x as
             * fast on GLM-4.5-Air's attn_output at 8-16 tokens (benchmarks/linear_ab.py) */
            __m256i s2[2][2];
            for (int r = 0; r < R; r++) s2[r][0] = s2[r][1] = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                const __m256i y0 = FN(ld256)(y + 64 * c), y1 = FN(ld256)(y + 64 * c + 32);
                for (int r = 0; r < R; r++) {
                    s2[r][0] = _mm256_dpbusd_epi32(s2[r][0], Q[r][2 * c], y0);
                    s2[r][1] = _mm256_dpbusd_epi32(s2[r][1], Q[r][2 * c + 1], y1);
                }
            }
            for (int r = 0; r < R; r++) S[r] = _mm256_add_epi32(s2[r][0], s2[r][1]);
#else
            /* codes <= 15: the 8 registers' products add in int16 (|lane| <= 8*2*15*127 < 2^15) */
            __m256i yv = FN(ld256)(y), p[2];
            for (int r = 0; r < R; r++) p[r] = _mm256_maddubs_epi16(Q[r][0], yv);
            for (int k = 1; k < 8; k++) {
                yv = FN(ld256)(y + 32 * k);
                for (int r = 0; r < R; r++) p[r] = _mm256_add_epi16(p[r], _mm256_maddubs_epi16(Q[r][k], yv));
            }
            for (int r = 0; r < R; r++) S[r] = _mm256_madd_epi16(p[r], _mm256_set1_epi16(1));
#endif
            const __m256 bv = _mm256_loadu_ps(bf[t] + 8 * b), dy = _mm256_set1_ps(ab[t][b].d);
            for (int r = 0; r < R; r++) {
                const __m256 m = _mm256_mul_ps(bv, dmm[r]);
                acc[r][t] = _mm256_fmadd_ps(_mm256_fmsub_ps(_mm256_cvtepi32_ps(S[r]), dsc[r], m), dy, acc[r][t]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < nt; t++) res[r][t] = FN(hsum256)(acc[r][t]);
}

#define NX_LT_SWITCH(call) \
    switch (nt) { case 1: { const int NTC = 1; call; } break; case 2: { const int NTC = 2; call; } break; \
                  case 3: { const int NTC = 3; call; } break; case 4: { const int NTC = 4; call; } break; \
                  case 5: { const int NTC = 5; call; } break; case 6: { const int NTC = 6; call; } break; \
                  case 7: { const int NTC = 7; call; } break; default: { const int NTC = 8; call; } break; }
/* res[t] = row . act[t] for t < nt (1..NX_LT), quantized lin_kind types */
static void FN(lin_dot)(int type, const uint8_t *w, int64_t n, const uint8_t *const *a, const uint8_t *const *x2,
                        float *res, int nt) {
    switch (type) {
    case NX_Q8_0_R8: NX_LT_SWITCH(FN(lq8r)(w, 0, n / 32, a, &res, NTC, 1)) break;
    case NX_Q4_K_R8: NX_LT_SWITCH(FN(lq4kr)(w, 0, n / 256, a, x2, &res, NTC, 1)) break;
    }
}

/* F16: a tile of R rows x NT tokens (compile-time after inlining); each (row, token) has one
 * vector accumulator over chunks of NX_FV elements (the halves converted once per chunk and row),
 * a fixed horizontal sum, then the n % NX_FV tail in order: the same operations whatever the
 * tile, so the same bits. */
#if NX_PATH == 2
#define NX_FV 16
#define NX_FR 4
typedef __m512 nx_fv;
#define NX_FLDH(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define NX_FLD(p) _mm512_loadu_ps(p)
#define NX_FFMA _mm512_fmadd_ps
#define NX_FZERO _mm512_setzero_ps
#define NX_FHSUM(v) FN(hsum256)(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)))
#else
#define NX_FV 8
#define NX_FR 2
typedef __m256 nx_fv;
#define NX_FLDH(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define NX_FLD(p) _mm256_loadu_ps(p)
#define NX_FFMA _mm256_fmadd_ps
#define NX_FZERO _mm256_setzero_ps
#define NX_FHSUM(v) FN(hsum256)(v)
#endif
/* the horizontal sums of a tile's NX_FR accumulators of one token, transposed: one hadd tree for
 * all of them instead of one reduction each (at the demo's 128 columns the reductions were a
 * third of the tile's work). Lanes fold as ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)) after the
 * 512-bit halves are added, the same for every accumulator (a missing row's is zero), so a row's
 * bits do not depend on the tile it is in. */
static inline __attribute__((always_inline)) void FN(f16_sums)(const nx_fv *a, float *sums) {
#if NX_PATH == 2
    __m256 y[4];
    for (int r = 0; r < 4; r++) y[r] = _mm256_add_ps(_mm512_castps512_ps256(a[r]), _mm512_extractf32x8_ps(a[r], 1));
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(y[0], y[1]), _mm256_hadd_ps(y[2], y[3]));
#else
    const __m256 h01 = _mm256_hadd_ps(a[0], a[1]);
    const __m256 h = _mm256_hadd_ps(h01, h01);
#endif
    _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
#define NX_FT 4   /* tokens per F16 tile */
NX_FUSED void FN(lf16)(const uint8_t *restrict w, size_t rb, const float *const *x, int64_t n, float *out, int64_t ld,
                       const int R, const int NT) {
    nx_fv acc[NX_FR][NX_FT];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < NT; t++) acc[r][t] = NX_FZERO();
    int64_t i = 0;
    for (; i + NX_FV <= n; i += NX_FV) {
        nx_fv h[NX_FR];
        for (int r = 0; r < R; r++) {
            if (NX_PFD > 0 && !(i & 31)) {   /* float activations: into L2 past NX_PF_ACT (NX_PF) */
                if (NX_PF_L2(NT, n, 4)) __builtin_prefetch(w + r * rb + 2 * i + NX_PFD, 0, 2);
                else __builtin_prefetch(w + r * rb + 2 * i + NX_PFD, 0, 0);
            }
            h[r] = NX_FLDH(w + r * rb + 2 * i);
        }
        for (int t = 0; t < NT; t++) {
            const nx_fv xv = NX_FLD(x[t] + i);
            for (int r = 0; r < R; r++) acc[r][t] = NX_FFMA(h[r], xv, acc[r][t]);
        }
    }
    for (int t = 0; t < NT; t++) {
        nx_fv a[NX_FR];
        for (int r = 0; r < NX_FR; r++) a[r] = r < R ? acc[r][t] : NX_FZERO();
        float sums[4];
        FN(f16_sums)(a, sums);
        for (int r = 0; r < R; r++) {
            float s = sums[r];
            for (int64_t j = i; j < n; j++) s = fmaf(H2F(FN(rd16)(w + r * rb + 2 * j)), x[t][j], s);
            out[t * ld + r] = s;
        }
    }
}
static void FN(lin_f16)(const uint8_t *w, size_t rb, const float *const *x, int64_t n, float *out, int64_t ld, int R, int NT) {
#define NX_F16_T(RR) switch (NT) { case 1: FN(lf16)(w, rb, x, n, out, ld, RR, 1); break; case 2: FN(lf16)(w, rb, x, n, out, ld, RR, 2); break; \
                                   case 3: FN(lf16)(w, rb, x, n, out, ld, RR, 3); break; default: FN(lf16)(w, rb, x, n, out, ld, RR, 4); break; }
    switch (R) {
    case 1: NX_F16_T(1) break;
#if NX_FR >= 4
    case 2: NX_F16_T(2) break;
    case 3: NX_F16_T(3) break;
    default: NX_F16_T(4) break;
#else
    default: NX_F16_T(2) break;
#endif
    }
#undef NX_F16_T
}

/* rows r0..r1-1 of w against all T tokens: out[t * ld + r] (ld: the output's row stride).
 * Token groups outside, rows inside: a unit's rows (<= 64, in L2) meet one group's activations
 * (in L1/L2) at a time. */
static void FN(dense_rows)(const nx_tensor *w, int64_t r0, int64_t r1, const uint8_t *a, size_t sa, const uint8_t *aux,
                         size_t sx, int64_t T, float *out, int64_t ld) {
    const int64_t H = w->cols;
    if (w->type == NX_F16) {
        for (int64_t j0 = 0; j0 < T; j0 += NX_FT) {
            const int nt = T - j0 < NX_FT ? (int)(T - j0) : NX_FT;
            const float *xp[NX_FT];
            for (int t = 0; t < nt; t++) xp[t] = (const float *)(a + (size_t)(j0 + t) * sa);
            for (int64_t r = r0; r < r1; r += NX_FR) {
                const int R = r1 - r < NX_FR ? (int)(r1 - r) : NX_FR;
                FN(lin_f16)(w->data + r * w->row_bytes, (size_t)w->row_bytes, xp, H, out + j0 * ld + r, ld, R, nt);
            }
        }
        return;
    }
    /* passes (NX_L1_ACT): Q4_K_R8 rows whose 4 tokens' activations fit in L1 in passes of 4 from
     * 8 tokens on; everything else in passes of NX_LT */
    const int fit4 = 4 * (sa + sx) <= NX_L1_ACT;
    const int gs = fit4 && T >= NX_LT && w->type == NX_Q4_K_R8 ? 4 : NX_LT;
    for (int64_t j0 = 0; j0 < T; j0 += gs) {
        const int nt = T - j0 < gs ? (int)(T - j0) : gs;
        const uint8_t *ap[NX_LT], *xp[NX_LT];
        for (int t = 0; t < nt; t++) { ap[t] = a + (size_t)(j0 + t) * sa; xp[t] = aux + (size_t)(j0 + t) * sx; }
        int64_t r = r0;
        /* Q8_0_R8 and Q4_K_R8 rows in pairs where the pass's activations are loaded from L2
         * (more than NX_L1_ACT bytes) or there are 8 tokens: one load feeds two dots.
         * GLM-4.5-Air shapes against one row at a time (benchmarks/linear_ab.py, 2 threads):
         * attn_output (12288 columns) 1.07-1.23x (Q8_0) and 1.02-1.29x (Q4_K) at 2-16 tokens;
         * Q8_0's 4096-column weights 1.04-1.08x at 8, but 0.85-0.94x at 2-4 tokens, where
         * their rows stream from DRAM best one at a time.  On AVX2, Q8_0_R8 pairs up to NX_R2MAX
         * tokens: lq8r_group holds R * nt accumulators, and 16 spill (benchmarks/lin_rate.c,
         * Zen 3, 8 tokens, rows in L2: 78 against 85 ns a row-token).  Q4_K_R8's passes of 4 from 8
         * tokens stay single: pairs there ran 0.97-1.03x (4096-column weights, AVX-512). */
        const int r2 = !(NX_PATH == 1 && w->type == NX_Q8_0_R8 && nt > NX_R2MAX);
        if ((w->type == NX_Q8_0_R8 || w->type == NX_Q4_K_R8) && nt > 1 && r2 && (nt >= 8 || (size_t)nt * (sa + sx) > NX_L1_ACT))
            for (; r + 2 <= r1; r += 2) {
                float v[NX_LT], v1[NX_LT];
                const uint8_t *wr = w->data + r * w->row_bytes;
                float *const rv[2] = {v, v1};
                if (w->type == NX_Q8_0_R8)
                    NX_LT_SWITCH(FN(lq8r)(wr, w->row_bytes, H / 32, ap, rv, NTC, 2))
                else
                    NX_LT_SWITCH(FN(lq4kr)(wr, w->row_bytes, H / 256, ap, xp, rv, NTC, 2))
                for (int t = 0; t < nt; t++) { out[(j0 + t) * ld + r] = v[t]; out[(j0 + t) * ld + r + 1] = v1[t]; }
            }
        for (; r < r1; r++) {
            float v[NX_LT];
            FN(lin_dot)(w->type, w->data + r * w->row_bytes, H, ap, xp, v, nt);
            for (int t = 0; t < nt; t++) out[(j0 + t) * ld + r] = v[t];
        }
    }
}
#else
static inline int FN(lin_kind)(int type) { (void)type; return 0; }
static inline size_t FN(lin_aux_bytes)(int type, int64_t H) { (void)type; (void)H; return 0; }
static void FN(lin_prep)(int type, uint8_t *act, int64_t H, uint8_t *aux) { (void)type; (void)act; (void)H; (void)aux; }
static void FN(dense_rows)(const nx_tensor *w, int64_t r0, int64_t r1, const uint8_t *a, size_t sa, const uint8_t *aux,
                         size_t sx, int64_t T, float *out, int64_t ld) {
    (void)w; (void)r0; (void)r1; (void)a; (void)sa; (void)aux; (void)sx; (void)T; (void)out; (void)ld;
}
#endif
