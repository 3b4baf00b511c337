/* nextn CPU expert kernels: shared declarations.
 *
 * Block layouts are ggml's (GGUF on disk).  Each weight type is decoded ("unpacked") one row at a
 * time into one of three canonical forms that the dot-product cores understand:
 *   NX_FAM_F   : float row                          (F32, F16, BF16)     x stays float
 *   NX_FAM_B32 : 32-element blocks  q[32], d, off   (Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 IQ4_NL)
 *                w_i = d*q_i + off; activations quantized to 8-bit blocks of 32 (Q8_0-like + sum)
 *   NX_FAM_K   : 256-element blocks q[256], int16 scale per 16 elements, float offset per 16, d
 *                w_i = d*sc_g*q_i + off_g          (Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_XS)
 *                activations quantized to 8-bit blocks of 256 with per-16 sums (Q8_K-like)
 * q is unsigned (0..63, zero point folded into off) for most types, signed for Q8_0/IQ4_* (the
 * dot core then uses the abs/sign trick so maddubs never saturates).
 * These canonical forms are the generic path (and the ref path); on AVX2/AVX-512 the common types
 * are dotted straight from the packed blocks instead (moe_impl.h, fused_dot); both use the same
 * activation blocks (ab32 SoA / ak256).
 */
#ifndef NX_MOE_KERNELS_H
#define NX_MOE_KERNELS_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>

/* ggml type ids (gguf.GGMLQuantizationType) */
enum {
    NX_F32 = 0, NX_F16 = 1, NX_Q4_0 = 2, NX_Q4_1 = 3, NX_Q5_0 = 6, NX_Q5_1 = 7, NX_Q8_0 = 8,
    NX_Q2_K = 10, NX_Q3_K = 11, NX_Q4_K = 12, NX_Q5_K = 13, NX_Q6_K = 14, NX_IQ4_NL = 20,
    NX_IQ4_XS = 23, NX_BF16 = 30,
    /* not a ggml type: Q5_0 rows repacked once at load (same bytes per row, see below) */
    NX_Q5_0_R8 = 106,
    /* not ggml types: rows repacked once at load (same bytes per row, see below); id 100 + the
     * ggml type's */
    NX_Q4_K_R8 = 112, NX_Q5_K_R8 = 113, NX_Q4_0_R8 = 102, NX_Q8_0_R8 = 108, NX_IQ4_NL_R8 = 120,
    NX_Q2_K_R8 = 110, NX_Q3_K_R8 = 111, NX_Q6_K_R8 = 114, NX_IQ4_XS_R8 = 123
};

/* Activation families: F, B32 and K above; KR, K16R and B32R are K and B32 with the 8-bit values
 * transposed by words inside each block (K: 4-byte words for Q4_K_R8 / Q5_K_R8 / IQ4_XS_R8,
 * 2-byte for Q2_K_R8 / Q3_K_R8) or group of blocks (B32: Q5_0_R8 and the other 32-element
 * layouts), as the fused dots of the repacked layouts read them. */
enum { NX_FAM_F = 0, NX_FAM_B32 = 1, NX_FAM_K = 2, NX_FAM_KR = 3, NX_FAM_B32R = 4,
       NX_FAM_K16R = 5 /* K, y transposed by 2-byte words (Q2_K_R8 / Q3_K_R8 / Q6_K_R8's 16 sub-blocks) */ };

/* ---- on-disk blocks (ggml layouts) ---- */
#define QK 32
#define QKK 256
typedef uint16_t nx_half;

typedef struct { nx_half d; int8_t qs[32]; } blk_q8_0;
typedef struct { nx_half d; uint8_t qs[16]; } blk_q4_0;
typedef struct { nx_half d; nx_half m; uint8_t qs[16]; } blk_q4_1;
typedef struct { nx_half d; uint8_t qh[4]; uint8_t qs[16]; } blk_q5_0;
typedef struct { nx_half d; nx_half m; uint8_t qh[4]; uint8_t qs[16]; } blk_q5_1;
typedef struct { nx_half d; uint8_t qs[16]; } blk_iq4_nl;
typedef struct { uint8_t scales[16]; uint8_t qs[64]; nx_half d; nx_half dmin; } blk_q2_K;
typedef struct { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; nx_half d; } blk_q3_K;
typedef struct { nx_half d; nx_half dmin; uint8_t scales[12]; uint8_t qs[128]; } blk_q4_K;
typedef struct { nx_half d; nx_half dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } blk_q5_K;
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; nx_half d; } blk_q6_K;
typedef struct { nx_half d; uint16_t scales_h; uint8_t scales_l[4]; uint8_t qs[128]; } blk_iq4_xs;

_Static_assert(sizeof(blk_q8_0) == 34, "q8_0");
_Static_assert(sizeof(blk_q4_0) == 18, "q4_0");
_Static_assert(sizeof(blk_q4_1) == 20, "q4_1");
_Static_assert(sizeof(blk_q5_0) == 22, "q5_0");
_Static_assert(sizeof(blk_q5_1) == 24, "q5_1");
_Static_assert(sizeof(blk_iq4_nl) == 18, "iq4_nl");
_Static_assert(sizeof(blk_q2_K) == 84, "q2_K");
_Static_assert(sizeof(blk_q3_K) == 110, "q3_K");
_Static_assert(sizeof(blk_q4_K) == 144, "q4_K");
_Static_assert(sizeof(blk_q5_K) == 176, "q5_K");
_Static_assert(sizeof(blk_q6_K) == 210, "q6_K");
_Static_assert(sizeof(blk_iq4_xs) == 136, "iq4_xs");

/* ---- canonical unpacked / activation blocks ---- */
/* 32-element blocks are laid out structure-of-arrays per row (q[32*nb], d[nb], off|s[nb]); these
 * structs only give the per-block byte count */
typedef struct { int8_t q[32]; float d; float off; } ub32;              /* unpacked weight, 32 */
typedef struct { int8_t y[32]; float d; float s; } ab32;                /* activation, s = d*sum(y) */
typedef struct {                                                         /* unpacked weight, 256 */
    int8_t q[256];
    int16_t scv[128];   /* scale of each maddubs int16 lane: scv[i] = sc[i/8] */
    float off[16];      /* per-16 offset, multiplies sum(y) of that group */
    float d;
    float pad[15];
} uk256;
/* Q8_K-like activation block: y = rint(x * 127/amax), d = amax/127, bsum[g] = sum of y[16g..16g+15],
 * bsum32[j] = bsum[2j] + bsum[2j+1] (the per-32 sums Q4_K/Q5_K mins need: computed once per token
 * here instead of once per weight row in the dot) */
typedef struct { int8_t y[256]; int16_t bsum[16]; float d; int16_t bsum32[8]; float pad[3]; } ak256;

_Static_assert(sizeof(ub32) == 40, "ub32");
_Static_assert(sizeof(ab32) == 40, "ab32");
_Static_assert(sizeof(uk256) == 640, "uk256");
_Static_assert(sizeof(ak256) == 320, "ak256");

/* one layer's stacked expert tensor: E x rows x cols, row_bytes per row */
typedef struct {
    const uint8_t *data;
    int32_t type;
    int64_t n_expert, rows, cols, row_bytes;
} nx_tensor;

/* calls with less work than this many bytes per thread use fewer threads (dispatch.c; tests set 0
 * to force every call onto all the threads it is given) */
extern int64_t nx_min_work_per_thread;

/* ---- Q5_0_R8: Q5_0 rows repacked at load for the SIMD dots (same size, same values) ----
 * A Q5_0 block keeps its 5th bits as a 32-bit mask and its nibbles as (element j, element j+16)
 * pairs, so the AVX2 dot spends ~7 vector ops per block just to rebuild 32 codes.  The repacked
 * row groups blocks so that one 32-byte load yields 64 codes' nibbles and one shift + mask a
 * register's 5th bits:
 *   group of 8 blocks (176 bytes): d[8] fp16 | hb[32] | qs[4][32]
 *   group of 4 blocks  (88 bytes): d[4] fp16 | hb[16] | qs[2][32]   (when 4..7 blocks remain)
 *   then the last nb % 4 blocks unchanged (22 bytes each)
 * Both groups are interleaved by 4-byte words like Q4_K_R8's sub-blocks, so a maddubs lane pair
 * stays in one block and the blocks' sums come out in int32 lanes. Element l of block i is word
 * w = l/4, byte k = l%4 of it; vector v (v = 2p: the low nibbles of qs[p], 2p+1: the high ones)
 * holds, at byte 4i+k of each 4*G-byte register, word w of block i:
 *   group of 8 (G = 8, one register per vector): w = v;
 *     qs[p][4i+k]: low nibble = low 4 bits of element 8p+k of block i, high = of element 8p+4+k;
 *     hb[4i+k]: bit v = 5th bit of element 4v+k of block i.
 *   group of 4 (G = 4, two 16-byte registers per vector, h = 0 low, 1 high): w = 2v+h;
 *     qs[p][16h+4i+k]: low nibble = element 4(4p+h)+k, high = element 4(4p+2+h)+k (low 4 bits);
 *     hb[4i+k]: bit 4h+v = 5th bit of element 4(2v+h)+k of block i.
 * The activations are word-transposed to match (word w of block i at byte 4*G*w + 4i of the
 * group's y: NX_FAM_B32R).
 * Block i of a row starts at byte 22*i in both layouts' accounting, so groups never straddle. */
/* bytes per block of a repacked type (its ggml type's), 0 for a type without a repacked layout */
static inline size_t nx_repacked_bs(int type) {
    switch (type) {
    case NX_Q4_0_R8: case NX_IQ4_NL_R8: return 18;
    case NX_Q5_0_R8: return 22;
    case NX_Q8_0_R8: return 34;
    case NX_Q2_K_R8: return 84;
    case NX_Q3_K_R8: return 110;
    case NX_IQ4_XS_R8: return 136;
    case NX_Q4_K_R8: return 144;
    case NX_Q5_K_R8: return 176;
    case NX_Q6_K_R8: return 210;
    default: return 0;
    }
}
/* where element l of block i of a group of g lives: byte `pos` of qs, nibble `nib` (0 low, 1
 * high), and bit `bit` of hb[4i + l%4] */
static inline void nx_r8_place(int g, int i, int l, int *pos, int *nib, int *bit) {
    const int w = l / 4, k = l % 4;
    const int v = g == 8 ? w : w / 2, h = g == 8 ? 0 : w % 2;
    *pos = 32 * (v / 2) + 16 * h + 4 * i + k;
    *nib = v % 2;
    *bit = 4 * h + v;
}
static inline void nx_r8_block(const uint8_t *row, int64_t nb, int64_t i, uint8_t out[22]) {
    const int64_t n8 = nb / 8 * 8, n4 = n8 + ((nb - n8) >= 4 ? 4 : 0);
    if (i >= n4) { for (int k = 0; k < 22; k++) out[k] = row[22 * i + k]; return; }
    const int g = i < n8 ? 8 : 4;
    const int64_t g0 = i < n8 ? i / 8 * 8 : n8;
    const uint8_t *base = row + 22 * g0, *hb = base + 2 * g, *qs = hb + 4 * g;
    const int j = (int)(i - g0);
    uint32_t qh = 0;
    out[0] = base[2 * j]; out[1] = base[2 * j + 1];
    for (int l = 0; l < 32; l++) {
        int pos, nib, bit;
        nx_r8_place(g, j, l, &pos, &nib, &bit);
        const int q = (qs[pos] >> (4 * nib)) & 15;
        const int h = (hb[4 * j + l % 4] >> bit) & 1;
        qh |= (uint32_t)h << l;
        if (l < 16) out[6 + l] = (uint8_t)q; else out[6 + l - 16] |= (uint8_t)(q << 4);
    }
    for (int k = 0; k < 4; k++) out[2 + k] = (uint8_t)(qh >> (8 * k));
}


/* ---- Q8_0_R8, Q4_0_R8, IQ4_NL_R8: the same groups and word interleave as Q5_0_R8 ----
 * A group of G (8, then one of 4 when 4..7 blocks remain; the last nb % 4 unchanged) holds the G
 * fp16 scales, then the codes interleaved as Q5_0_R8's:
 *   Q8_0_R8  : d[G] | q[32G]: element l of block i (word w = l/4, byte k) at q[4Gw + 4i + k], the
 *              activations' own order (NX_FAM_B32R);
 *   Q4_0_R8, IQ4_NL_R8 : d[G] | qs[16G]: the 4-bit code of element l of block i in the nibble
 *              nx_r8_place gives (Q5_0_R8's without its 5th-bit plane). */
/* the byte (and nibble: 0 low, 1 high, -1 whole byte) of a group of g holding element l of block i */
static inline int nx_b32r_pos(int type, int g, int i, int l, int *nib) {
    if (type == NX_Q8_0_R8) { *nib = -1; return 2 * g + 4 * g * (l / 4) + 4 * i + l % 4; }
    int pos, bit;
    nx_r8_place(g, i, l, &pos, nib, &bit);
    return 2 * g + pos;
}
/* the group of block i of a row of nb: its size g (8, 4, or 0 for a loose block) and first block */
static inline void nx_b32r_group(int64_t nb, int64_t i, int64_t *g0, int *g) {
    const int64_t n8 = nb / 8 * 8, n4 = n8 + ((nb - n8) >= 4 ? 4 : 0);
    *g = i < n8 ? 8 : i < n4 ? 4 : 0;
    *g0 = i < n8 ? i / 8 * 8 : n8;
}
/* block i of a repacked row back in ggml form */
static inline void nx_b32r_block(int type, const uint8_t *row, int64_t nb, int64_t i, uint8_t *out) {
    const size_t bs = nx_repacked_bs(type);
    int64_t g0;
    int g;
    nx_b32r_group(nb, i, &g0, &g);
    if (!g) { memcpy(out, row + bs * i, bs); return; }
    const uint8_t *base = row + bs * g0;
    const int j = (int)(i - g0);
    out[0] = base[2 * j]; out[1] = base[2 * j + 1];
    if (type != NX_Q8_0_R8) memset(out + 2, 0, 16);
    for (int l = 0; l < 32; l++) {
        int nib;
        const int pos = nx_b32r_pos(type, g, j, l, &nib);
        if (nib < 0) { out[2 + l] = base[pos]; continue; }
        const int q = (base[pos] >> (4 * nib)) & 15;
        out[2 + l % 16] |= (uint8_t)(q << (l < 16 ? 0 : 4));
    }
}

/* ---- Q2_K_R8, Q3_K_R8: Q2_K / Q3_K blocks with their codes interleaved by 2-byte words ----
 * A Q2_K / Q3_K block has 16 sub-blocks of 16; ggml keeps element 128n+32j+l's low 2 bits at bits
 * 2j..2j+1 of qs[32n+l] (and Q3_K's high bit at bit 4n+j of hmask[l]), so one 32-code register
 * spans two sub-blocks and its scales need a shuffle per register per block.  The repacked block
 * keeps every other field where it was (Q2_K: scales[16] | qs[64] | d | dmin; Q3_K: hmask[32] |
 * qs[64] | scales[12] | d) and moves the codes so that register r (r = 0..7) holds elements
 * 2r, 2r+1 of each sub-block j at bytes 2j, 2j+1 (an int16 lane per sub-block):
 *   qs[32V + b], bits 2s..2s+1: low 2 bits of register r = 4V+s, byte b;
 *   Q3_K hmask[b], bit r: high bit of register r, byte b;
 * register r byte b = element 16(b/2) + 2r + b%2.  A token's 8 products add in int16 (codes <= 7:
 * |lane| <= 8*2*7*127 < 2^15) and one madd applies the 16 scales; the activations are transposed
 * by 2-byte words to match (NX_FAM_K16R). */
/* one repacked block (Q2_K 84 or Q3_K 110 bytes) back in ggml form, element by element: the
 * reference that nx_repack_row is tested against */
static inline void nx_k16r_block(int type, const uint8_t *src, uint8_t *dst) {
    const int q3 = type == NX_Q3_K_R8, bs = q3 ? 110 : 84, qo = q3 ? 32 : 16;
    memcpy(dst, src, (size_t)bs);
    memset(dst + qo, 0, 64);
    if (q3) memset(dst, 0, 32);
    for (int r = 0; r < 8; r++)
        for (int b = 0; b < 32; b++) {
            const int e = 16 * (b / 2) + 2 * r + b % 2, n = e / 128, j = (e % 128) / 32, l = e % 32;
            const int lo = (src[qo + 32 * (r / 4) + b] >> (2 * (r % 4))) & 3;
            dst[qo + 32 * n + l] |= (uint8_t)(lo << (2 * j));
            if (q3) dst[l] |= (uint8_t)(((src[b] >> r) & 1) << (4 * n + j));
        }
}

/* ---- Q6_K_R8: Q6_K blocks in Q2_K_R8's register order (2-byte words, 16 sub-blocks in the
 * int16 lanes) ----
 * ggml keeps element 128n + 32q + l's low 4 bits in nibble q/2 of ql[64n + 32(q%2) + l] and its
 * high 2 at bits 2q of qh[32n + l]; the repacked block keeps scales[16] and d at 192 and 208 and
 * holds register r, byte b (element 16(b/2) + 2r + b%2):
 *   ql[32(r/2) + b], nibble r%2: low 4 bits;  qh[32(r/4) + b], bits 2(r%4): high 2 bits.
 * Two registers' products add in int16 (codes <= 63: |lane| <= 2*2*63*127 < 2^15) before a madd
 * applies the 16 scales. */
/* one repacked Q6_K block back in ggml form (the reference for nx_repack_row) */
static inline void nx_q6kr_block(const uint8_t *src, uint8_t *dst) {
    memcpy(dst, src, 210);
    memset(dst, 0, 192);
    for (int r = 0; r < 8; r++)
        for (int b = 0; b < 32; b++) {
            const int e = 16 * (b / 2) + 2 * r + b % 2, n = e / 128, q = (e % 128) / 32, l = e % 32;
            const int lo = (src[32 * (r / 2) + b] >> (4 * (r % 2))) & 15, hi = (src[128 + 32 * (r / 4) + b] >> (2 * (r % 4))) & 3;
            dst[64 * n + 32 * (q % 2) + l] |= (uint8_t)(lo << (4 * (q / 2)));
            dst[128 + 32 * n + l] |= (uint8_t)(hi << (2 * q));
        }
}

/* ---- Q4_K_R8, Q5_K_R8, IQ4_XS_R8: rows repacked at load for the SIMD dots (same size, same values) ----
 * A Q4_K block's nibbles hold sub-block 2j in the low and 2j+1 in the high nibbles of qs[32j..],
 * so one maddubs covers a single sub-block and the dot must fold sub-block pairs horizontally
 * (vphaddw: one per 64 weights per token, at 2 cycles each on Zen 3 and 3 uops on Intel).  The
 * repacked block interleaves the 8 sub-blocks in 4-byte words, so every register holds 4
 * elements of each sub-block at the same word (= int32 lane) position:
 *   d, dmin, scales[12] as in Q4_K (Q5_K: then qh[32]; IQ4_XS: its 8-byte header) | qs[4][32]
 *   qs[p][4i+k]: low nibble = element 8p+k of sub-block i, high nibble = element 8p+4+k;
 *   Q5_K qh[4i+k], bit r: 5th bit of element 4r+k of sub-block i.
 * Register r (r = 2p low nibbles, 2p+1 high) word i = elements 4r..4r+3 of sub-block i; the
 * activations are word-transposed to match (quant_act for NX_FAM_KR), and a token's registers'
 * products add in int16 (all 8 for Q4_K, 4 at a time for Q5_K) before a madd applies the 8
 * scales. */
/* one repacked Q4_K / Q5_K / IQ4_XS block (type: its _R8 id) back in ggml form, element by
 * element (the reference for nx_repack_row). Element e of sub-block sb: ggml keeps its low 4 bits in nibble sb%2 of
 * qs[32(sb/2) + e] (IQ4_XS: nibble e/16 of qs[16sb + e%16]; Q5_K its 5th bit in bit sb of qh[e]);
 * the repacked block in nibble r%2 of qs[32(r/2) + 4sb + k] (and bit r of qh[4sb + k]), r = e/4,
 * k = e%4. */
static inline void nx_k4r_block(int type, const uint8_t *src, uint8_t *dst) {
    const int q5 = type == NX_Q5_K_R8, xs = type == NX_IQ4_XS_R8;
    const int bs = (int)nx_repacked_bs(type), hdr = xs ? 8 : 16, qo = q5 ? 48 : hdr;
    memcpy(dst, src, (size_t)bs);
    memset(dst + hdr, 0, (size_t)(bs - hdr));
    for (int sb = 0; sb < 8; sb++)
        for (int e = 0; e < 32; e++) {
            const int r = e / 4, k = e % 4;
            /* IQ4_XS keeps sub-block sb in qs[16sb..16sb+15]: element e in nibble e/16 of byte e%16 */
            const int nat = xs ? qo + 16 * sb + e % 16 : qo + 32 * (sb / 2) + e, nsh = xs ? 4 * (e / 16) : 4 * (sb % 2);
            const int rep = qo + 32 * (r / 2) + 4 * sb + k;
            dst[nat] |= (uint8_t)(((src[rep] >> (4 * (r % 2))) & 15) << nsh);
            if (q5) dst[16 + e] |= (uint8_t)(((src[16 + 4 * sb + k] >> r) & 1) << sb);
        }
}

/* ---- repacking a row (all layouts above): each block's (or group's) codes as one byte per
 * element, moved by whole words into register order, then packed; about 10x faster than placing
 * them element by element as the read-back functions above do (which the tests hold it to). */
/* words (ws bytes) [n_out][n_in] -> [n_in][n_out] */
static inline void nx_transpose_words(const uint8_t *src, uint8_t *dst, int n_out, int n_in, int ws) {
    for (int o = 0; o < n_out; o++)
        for (int i = 0; i < n_in; i++) memcpy(dst + ws * (i * n_out + o), src + ws * (o * n_in + i), (size_t)ws);
}
/* low nibbles from one 32-byte vector, high from the next: qs[32p + b] */
static inline void nx_pack_nibbles(const uint8_t *T, int nvec, uint8_t *qs) {
    for (int p = 0; p < nvec / 2; p++)
        for (int b = 0; b < 32; b++) qs[32 * p + b] = (uint8_t)((T[64 * p + b] & 15) | (T[64 * p + 32 + b] & 15) << 4);
}
/* bit `from` of T[32v + b] -> bit v of pl[b] (or, for 16-byte registers, bit 4(b/16) + v of pl[b%16]) */
static inline void nx_pack_bitplane(const uint8_t *T, int nvec, int from, int half, uint8_t *pl) {
    uint8_t acc[32];
    uint64_t a64[4] = {0, 0, 0, 0};
    for (int v = 0; v < nvec; v++)   /* 8 bytes at a time: each byte's bit moves inside its byte */
        for (int w = 0; w < 4; w++) {
            uint64_t x;
            memcpy(&x, T + 32 * v + 8 * w, 8);
            a64[w] |= ((x >> from) & 0x0101010101010101ULL) << v;
        }
    memcpy(acc, a64, 32);
    if (half)
        for (int b = 0; b < 16; b++) pl[b] = (uint8_t)(acc[b] | acc[b + 16] << 4);
    else
        memcpy(pl, acc, 32);
}
static inline void nx_repack_row(int type, const uint8_t *src, int64_t nb, uint8_t *dst) {
    uint8_t codes[256], T[256];
    if (type == NX_Q5_0_R8 || type == NX_Q4_0_R8 || type == NX_Q8_0_R8 || type == NX_IQ4_NL_R8) {
        const size_t bs = nx_repacked_bs(type);
        int64_t b = 0;
        while (nb - b >= 4) {
            const int G = nb - b >= 8 ? 8 : 4;
            const uint8_t *s = src + bs * b;
            uint8_t *d = dst + bs * b;
            for (int i = 0; i < G; i++, s += bs) {
                d[2 * i] = s[0]; d[2 * i + 1] = s[1];
                uint8_t *c = codes + 32 * i;
                if (type == NX_Q8_0_R8) { memcpy(c, s + 2, 32); continue; }
                const uint8_t *q = s + (type == NX_Q5_0_R8 ? 6 : 2);
                for (int l = 0; l < 16; l++) { c[l] = q[l] & 15; c[l + 16] = q[l] >> 4; }
                if (type == NX_Q5_0_R8)   /* the 32 fifth bits, 8 at a time: bit j of a byte -> bit 4 of
                                           * byte j of a little-endian word (x86, ARM) */
                    for (int w = 0; w < 4; w++) {
                        uint64_t spread = 0, c64;
                        for (int j = 0; j < 8; j++) spread |= (uint64_t)((s[2 + w] >> j) & 1) << (8 * j + 4);
                        memcpy(&c64, c + 8 * w, 8);
                        c64 |= spread;
                        memcpy(c + 8 * w, &c64, 8);
                    }
            }
            nx_transpose_words(codes, T, G, 8, 4);   /* byte 4Gw + 4i + k: word w of block i */
            uint8_t *q = d + 2 * G;
            if (type == NX_Q8_0_R8) { memcpy(q, T, (size_t)(32 * G)); b += G; continue; }
            if (type == NX_Q5_0_R8) { nx_pack_bitplane(T, G == 8 ? 8 : 4, 4, G == 4, q); q += 4 * G; }
            nx_pack_nibbles(T, G, q);
            b += G;
        }
        memcpy(dst + bs * b, src + bs * b, bs * (size_t)(nb - b));
        return;
    }
    const int k16 = type == NX_Q2_K_R8 || type == NX_Q3_K_R8 || type == NX_Q6_K_R8;
    const size_t bs = nx_repacked_bs(type);
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *s = src + bs * (size_t)i;
        uint8_t *d = dst + bs * (size_t)i;
        memcpy(d, s, bs);
        if (type == NX_Q6_K_R8) {   /* element 128n + 32q + l: nibble q/2 of ql[64n + 32(q%2) + l], bits 2q of qh[32n + l] */
            for (int n = 0; n < 2; n++)
                for (int l = 0; l < 32; l++) {
                    const uint8_t l0 = s[64 * n + l], l1 = s[64 * n + 32 + l], h = s[128 + 32 * n + l];
                    uint8_t *c = codes + 128 * n + l;
                    c[0] = (uint8_t)((l0 & 15) | (h & 3) << 4);
                    c[32] = (uint8_t)((l1 & 15) | ((h >> 2) & 3) << 4);
                    c[64] = (uint8_t)((l0 >> 4) | ((h >> 4) & 3) << 4);
                    c[96] = (uint8_t)((l1 >> 4) | ((h >> 6) & 3) << 4);
                }
        } else if (k16) {   /* element 128n + 32j + l: bits 2j of qs[32n + l] (Q3_K: bit 4n+j of hmask[l]) */
            const uint8_t *qs = s + (type == NX_Q3_K_R8 ? 32 : 16);
            for (int n = 0; n < 2; n++)
                for (int j = 0; j < 4; j++)
                    for (int l = 0; l < 32; l++) {
                        uint8_t c = (uint8_t)((qs[32 * n + l] >> (2 * j)) & 3);
                        if (type == NX_Q3_K_R8) c |= (uint8_t)(((s[l] >> (4 * n + j)) & 1) << 2);
                        codes[128 * n + 32 * j + l] = c;
                    }
        } else if (type == NX_IQ4_XS_R8) {   /* sub-block sb in qs[16sb..]: element x in nibble x/16 */
            for (int sb = 0; sb < 8; sb++)
                for (int x = 0; x < 16; x++) {
                    codes[32 * sb + x] = s[8 + 16 * sb + x] & 15;
                    codes[32 * sb + 16 + x] = s[8 + 16 * sb + x] >> 4;
                }
        } else {            /* Q4_K / Q5_K: sub-blocks 2p, 2p+1 in the nibbles of qs[32p..] */
            const uint8_t *qs = s + (type == NX_Q5_K_R8 ? 48 : 16);
            for (int sb = 0; sb < 8; sb++)
                for (int x = 0; x < 32; x++) {
                    uint8_t c = (uint8_t)((qs[32 * (sb / 2) + x] >> (4 * (sb % 2))) & 15);
                    if (type == NX_Q5_K_R8) c |= (uint8_t)(((s[16 + x] >> sb) & 1) << 4);
                    codes[32 * sb + x] = c;
                }
        }
        if (type == NX_Q6_K_R8) {   /* 2-byte words as Q2_K's; low nibbles, then 2-bit planes */
            nx_transpose_words(codes, T, 16, 8, 2);
            nx_pack_nibbles(T, 8, d);
            for (int V = 0; V < 2; V++)
                for (int b = 0; b < 32; b++) {
                    uint8_t q = 0;
                    for (int k = 0; k < 4; k++) q |= (uint8_t)(((T[32 * (4 * V + k) + b] >> 4) & 3) << (2 * k));
                    d[128 + 32 * V + b] = q;
                }
        } else if (k16) {   /* 2-byte words: byte 32r + 2j + k = element 16j + 2r + k */
            nx_transpose_words(codes, T, 16, 8, 2);
            uint8_t *qs = d + (type == NX_Q3_K_R8 ? 32 : 16);
            for (int V = 0; V < 2; V++)
                for (int b = 0; b < 32; b++) {
                    uint8_t q = 0;
                    for (int k = 0; k < 4; k++) q |= (uint8_t)((T[32 * (4 * V + k) + b] & 3) << (2 * k));
                    qs[32 * V + b] = q;
                }
            if (type == NX_Q3_K_R8) nx_pack_bitplane(T, 8, 2, 0, d);
        } else {     /* 4-byte words: byte 32r + 4sb + k = element 4r + k of sub-block sb */
            nx_transpose_words(codes, T, 8, 8, 4);
            const int qo = type == NX_Q5_K_R8 ? 48 : type == NX_IQ4_XS_R8 ? 8 : 16;
            nx_pack_nibbles(T, 8, d + qo);
            if (type == NX_Q5_K_R8) nx_pack_bitplane(T, 8, 4, 0, d + 16);
        }
    }
}

/* per-path entry points (suffix = path name) */
#define NX_DECL_PATH(sfx) \
    int nx_moe_forward_##sfx(const float *x, int64_t T, const int32_t *ids, const float *wts, \
                             int64_t K, const nx_tensor *gate, const nx_tensor *up, \
                             const nx_tensor *down, float *out, int nthreads); \
    int nx_linear_##sfx(const float *x, int64_t T, const nx_tensor *w, float *out, int64_t ld, int nthreads); \
    int nx_linear_heads_##sfx(const float *x, int64_t T, const nx_tensor *w, float *out, int nthreads); \
    int nx_dequant_rows_##sfx(const nx_tensor *w, const int64_t *rows, int64_t n, float *out, int nthreads);

NX_DECL_PATH(ref)
NX_DECL_PATH(avx2)
NX_DECL_PATH(avx512)

#endif
