/* gpt2kit's attention for decode steps, one layer in one call: per row b, its new key and value are written
 * into its cache slot, then for each head h, over the slot's first n[b] keys (the new one last),
 *   y[b, h] = softmax(scale * q[b, h] . k[b, h, s]) @ v[b, h, s],   s < n[b],
 * float32 or bfloat16, computed in float32.
 *
 * Why not PyTorch's SDPA: for one query its CPU kernel (flash attention, blocked for long query runs) spends
 * more time on its tiling than on the keys; measured on a 2-core Xeon, 12 heads of 64 over S keys:
 * batch 1, S = 64: 20 against 13 us; S = 640: 186 against 86 us; batch 32, S = 640: 9.0 against 4.2 ms.
 * Why the write too: in a decode step each small ATen op runs with caches the weight streams have just
 * evicted (~25-40 us each where warm they take 3-9 us), and splitting q, k, v, writing k and v and laying
 * out the output took ~11 of them a layer. Here each (row, head) is one pass over its keys (scores), one
 * over the scores (exp, sum), one over the values; the rows' lengths need no mask, so rows at different
 * positions share one call. Built with quantized.c into one library (native/__init__.py).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vecmath.h"

#define MAX_ND 16 /* head_dim up to 256, in vectors of 16 */

static inline vf load16(const void *p, int bf16) {
    return bf16 ? vf_bf16_load(p, vm_first(16)) : vf_load((const float *)p);
}

static inline void store16(void *p, vf x, int bf16) {
    if (bf16) vf_bf16_store(p, x, vm_first(16));
    else vf_store((float *)p, x);
}

/* one (row, head): nd vectors of 16 per head; ND a compile-time constant where it is GPT-2's 4 (head_dim 64) */
static inline __attribute__((always_inline)) void attend_one(const char *q, const char *k, const char *v,
                                                              int64_t ks, int64_t n, float scale, char *y,
                                                              float *p, int bf16, const int nd) {
    const int64_t es = bf16 ? 2 : 4;
    vf qv[MAX_ND], o[MAX_ND];
    for (int d = 0; d < nd; d++) {
        qv[d] = vf_mul(load16(q + d * 16 * es, bf16), vf_set1(scale));
        o[d] = vf_zero();
    }
    float m = -INFINITY;
    for (int64_t s = 0; s < n; s++) {
        const char *kr = k + s * ks * es;
        vf a = vf_mul(qv[0], load16(kr, bf16));
        for (int d = 1; d < nd; d++) a = vf_fmadd(qv[d], load16(kr + d * 16 * es, bf16), a);
        p[s] = vf_sum(a);
        m = p[s] > m ? p[s] : m;
    }
    const vf mv = vf_set1(m);
    vf sum = vf_zero();
    for (int64_t s = 0; s < n; s += 16) {
        const vm live = vm_first(n - s);
        const vf e = vf_maskz(live, vf_exp(vf_sub(vf_loadm(p + s, live), mv)));
        vf_storem(p + s, live, e);
        sum = vf_add(sum, e);
    }
    for (int64_t s = 0; s < n; s++) {
        const char *vr = v + s * ks * es;
        const vf ps = vf_set1(p[s]);
        for (int d = 0; d < nd; d++) o[d] = vf_fmadd(ps, load16(vr + d * 16 * es, bf16), o[d]);
    }
    const vf inv = vf_set1(1.0f / vf_sum(sum));
    for (int d = 0; d < nd; d++) store16(y + d * 16 * es, vf_mul(o[d], inv), bf16);
}

/* A decode step's whole attention for one layer: per row b, its new key and value (from its fused qkv row,
 * q | k | v, each H x D) go into its cache slot at position n[b] - 1, then its query attends over the slot's
 * first n[b] keys. qkv: (B, 3 H D) rows qkv_sb apart; k, v: the layer's cache buffers (slots, H, len, D),
 * contiguous; slot: (B,) each row's slot; n: (B,) keys per row after the write, 1 <= n <= len; y: (B, H D)
 * rows y_sb apart. Strides in elements; bf16: every tensor is bfloat16 (else float32). Each (row, head)
 * writes and reads only its own slot's rows, so the threads need no ordering. -1: a shape it does not take. */
int gpt2kit_decode_attention(const void *qkv, int64_t qkv_sb, void *k, void *v, int64_t slots, int64_t len,
                             const int64_t *slot, const int64_t *n, int64_t B, int64_t H, int64_t D, float scale,
                             int64_t bf16, void *y, int64_t y_sb) {
    if (D % 16 || D > 16 * MAX_ND || B < 1 || H < 1) return -1;
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) {
        if (n[b] < 1 || n[b] > len || slot[b] < 0 || slot[b] >= slots) return -1;
        longest = n[b] > longest ? n[b] : longest;
    }
    const int64_t es = bf16 ? 2 : 4, C = H * D;
    int failed = 0;
    #pragma omp parallel
    {
        float *p = (float *)aligned_alloc(64, (size_t)((longest + 15) / 16 * 16) * sizeof(float));
        if (p == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (p == NULL) continue;
            const int64_t b = bh / H, h = bh % H;
            const char *row = (const char *)qkv + b * qkv_sb * es;
            const int64_t at = ((slot[b] * H + h) * len) * D * es;  /* the slot's head h, position 0 */
            char *kk = (char *)k + at, *vv = (char *)v + at;
            memcpy(kk + (n[b] - 1) * D * es, row + (C + h * D) * es, (size_t)(D * es));
            memcpy(vv + (n[b] - 1) * D * es, row + (2 * C + h * D) * es, (size_t)(D * es));
            char *yy = (char *)y + (b * y_sb + h * D) * es;
            if (D == 64) attend_one(row + h * D * es, kk, vv, D, n[b], scale, yy, p, (int)bf16, 4);
            else attend_one(row + h * D * es, kk, vv, D, n[b], scale, yy, p, (int)bf16, (int)(D / 16));
        }
        free(p);
    }
    return failed ? -2 : 0;
}
