/* What the product kernels (quantized.c, dense.c) do to rows before and after a product: the block's layer norm as a
 * prologue, the tanh GELU and the residual add as an epilogue (one call instead of up to four small ops, each slow
 * with the caches the weight stream has just evicted). */
#ifndef GPT2KIT_ROWS_H
#define GPT2KIT_ROWS_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vecmath.h"

/* After a product: y (M, N, rows ldy apart) = act(y) + residual (residual (M, N), rows ldy apart, or NULL);
 * act 1: the tanh GELU. What the block would otherwise run as two more small ops a projection. */
static inline void epilogue(float *y, int64_t M, int64_t N, int64_t ldy, int64_t act, const float *residual) {
    if (!act && !residual) return;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n += 16) {
            const vm live = vm_first(N - n);
            vf v = vf_loadm(y + m * ldy + n, live);
            if (act) v = vf_gelu_tanh(v);
            if (residual) v = vf_add(v, vf_loadm(residual + m * ldy + n, live));
            vf_storem(y + m * ldy + n, live, v);
        }
}

/* The layer norm a block applies before this projection: out (M, K) = (x - mean) / sqrt(var + eps) * w + b, row
 * by row (biased variance, as torch.layer_norm); K % 16 == 0 */
static inline void layer_norm_rows(const float *x, int64_t M, int64_t K, int64_t ldx, const float *w, const float *b,
                                   float eps, float *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * ldx;
        vf s = vf_zero();
        for (int64_t k = 0; k < K; k += 16) s = vf_add(s, vf_load(row + k));
        const vf mean = vf_set1(vf_sum(s) / (float)K);
        vf ss = vf_zero();
        for (int64_t k = 0; k < K; k += 16) {
            const vf d = vf_sub(vf_load(row + k), mean);
            ss = vf_fmadd(d, d, ss);
        }
        const vf rstd = vf_set1(1.0f / sqrtf(vf_sum(ss) / (float)K + eps));
        for (int64_t k = 0; k < K; k += 16) {
            const vf v = vf_mul(vf_sub(vf_load(row + k), mean), rstd);
            vf_store(out + m * K + k, vf_fmadd(v, vf_load(w + k), vf_load(b + k)));
        }
    }
}

static inline float *alloc_rows(int64_t M, int64_t K) {
    const size_t bytes = ((size_t)(M * K) * sizeof(float) + 63) / 64 * 64;  /* aligned_alloc: a multiple of 64 */
    return (float *)aligned_alloc(64, bytes);
}

#endif
