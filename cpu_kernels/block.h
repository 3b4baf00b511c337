/* Whole decoder blocks on the CPU: the structs the fused block call reads (block_impl.h).
 *
 * A decode step of a small model spends its time in host calls, not in bytes: ~20 torch calls per
 * block at a few microseconds each, against ~10 us of arithmetic for a demo-sized block.  So when
 * every unit of the model runs on the CPU, the loader describes each block once in these structs
 * (pointers into the weights the model already holds, never a copy) and a decode-sized forward
 * (1..17 rows) is one C call for all the blocks.  build.py reads these structs for cffi's cdef
 * (plain typedefs only: no other macro than NX_MAX_PARTS in them).
 */
#ifndef NX_BLOCK_H
#define NX_BLOCK_H
#include "moe_kernels.h"

#define NX_MAX_PARTS 4

/* a dense weight [sum of parts' rows, cols]: parts stacked by rows (q/k/v, gate/up), each one
 * matrix (n_expert 1) in any kernel type, F32 included; bias NULL or [sum rows] */
typedef struct {
    int32_t n_parts;
    nx_tensor parts[NX_MAX_PARTS];
    const float *bias;
} nx_lin;

typedef struct {
    const float *attn_norm;   /* [H] */
    nx_lin qkv;               /* [(n_heads + 2 n_kv) head_dim, H] */
    const float *qk_norm;     /* [n_heads + n_kv, head_dim] or NULL (no QK-norm) */
    nx_lin wo;                /* [H, n_heads head_dim] */
    const float *post_norm;   /* [H] */
    /* the dense FFN of a dense block, or the shared expert of an MoE block (n_parts 0: none) */
    nx_lin ffn_gate_up;       /* [2F, H]: gate rows, then up rows */
    nx_lin ffn_down;          /* [H, F] */
    /* MoE: router_w NULL for a dense block */
    const float *router_w;    /* [E, H] */
    const float *router_b;    /* [E]: selection only */
    int32_t n_expert, top_k, norm_topk;
    float scale;
    nx_tensor exp_gate, exp_up, exp_down;
    /* latent attention (nx_dims.kv_rank > 0, GLM-4.7-Flash): qkv holds attn_q_a's rows, then
     * attn_kv_a_mqa's [q_rank + kv_rank + rope, H]; q_b [n_heads (nope + rope), q_rank]; k_b
     * [n_heads][kv_rank, nope] and v_b [n_heads][v_dim, kv_rank] (one matrix a head); wo
     * [H, n_heads v_dim]. The cache row of a position: the normed latent, then the rotated rope key
     * (head_dim = kv_rank + rope floats, n_kv 1); no V. */
    const float *q_a_norm;    /* [q_rank] */
    const float *kv_a_norm;   /* [kv_rank] */
    nx_lin q_b;
    nx_tensor k_b, v_b;
} nx_block;

typedef struct {
    int32_t H, n_heads, n_kv, head_dim;
    float eps, attn_scale;
    /* per position, over the whole head: C = [c, c, 1...], S = [-s, s, 0...] (runtime/model.py
     * RoPE), so a head's rotation is x * C + x[swap halves of the rotated dims] * S */
    const float *rope_cos, *rope_sin;
    int64_t rope_len;
    int32_t rope_half;        /* rope_dim / 2 */
    /* latent attention: kv_rank > 0; the rope tables are then [positions, rope_dim] in adjacent
     * pairs: C = [c0, c0, c1, c1, ...], S = [-s0, s0, -s1, s1, ...] (x * C + x[swap each pair] * S) */
    int32_t q_rank, kv_rank, nope, v_dim;
} nx_dims;

/* per-path entry points (suffix = path name; dispatch.c picks one) */
/* Rows may belong to different sequences (a batched decode step): row t sits at rotary position
 * pos[t] and logical cache slot lslot[t] of its sequence, whose logical slot j lives at physical
 * slot maps[t][j] of the per-layer pools kc/vc ([pool_len, n_kv, head_dim] each, of float32 for
 * kv_type 0 or float16 for kv_type 1).  Row t writes its K/V at maps[t][lslot[t]] and attends over
 * its sequence's slots 0..lslot[t].  nx_to_f16: the cache's float32 -> float16 rounding. */
#define NX_DECL_BLOCKS(sfx) \
    int nx_blocks_forward_##sfx(const nx_dims *d, const nx_block *blocks, int32_t n_blocks, void **kc, \
                                void **vc, int64_t pool_len, int32_t kv_type, float *x, int64_t T, \
                                const int64_t *pos, const int64_t *lslot, const int32_t *const *maps, \
                                const float *final_norm, double *stats, int nthreads); \
    int nx_to_f16_##sfx(const float *x, uint16_t *out, int64_t n); \
    double nx_peak_rate_##sfx(int kind, int64_t n, int nthreads);
NX_DECL_BLOCKS(ref)
NX_DECL_BLOCKS(avx2)
NX_DECL_BLOCKS(avx512)

#endif
