/* What the product kernels (quantized.c, dense.c) do to rows before and after a product: the block's layer norm as a
 * prologue, the tanh GELU and the residual add as an epilogue (one call instead of up to four small ops, each slow
 * with the caches the weight stream has just evicted). AVX-512. */
#ifndef GPT2KIT_ROWS_H
#define GPT2KIT_ROWS_H
#include <immintrin.h>
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
            const __mmask16 live = N - n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - n)) - 1);
            __m512 v = _mm512_maskz_loadu_ps(live, y + m * ldy + n);
            if (act) v = gelu_tanh512(v);
            if (residual) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, residual + m * ldy + n));
            _mm512_mask_storeu_ps(y + m * ldy + n, live, v);
        }
}

/* The layer norm a block applies before this projection: out (M, K) = (x - mean) / sqrt(var + eps) * w + b, row
 * by row (biased variance, as torch.layer_norm); K % 16 == 0 */
static inline void layer_norm_rows(const float *x, int64_t M, int64_t K, int64_t ldx, const float *w, const float *b,
                            float eps, float *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * ldx;
        __m512 s = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(row + k));
        const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(s) / (float)K);
        __m512 ss = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
            const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(row + k), mean);
            ss = _mm512_fmadd_ps(d, d, ss);
        }
        const __m512 rstd = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)K + eps));
        for (int64_t k = 0; k < K; k += 16) {
            const __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row + k), mean), rstd);
            _mm512_storeu_ps(out + m * K + k, _mm512_fmadd_ps(v, _mm512_loadu_ps(w + k), _mm512_loadu_ps(b + k)));
        }
    }
}

static inline float *alloc_rows(int64_t M, int64_t K) {
    const size_t bytes = ((size_t)(M * K) * sizeof(float) + 63) / 64 * 64;  /* aligned_alloc: a multiple of 64 */
    return (float *)aligned_alloc(64, bytes);
}

#endif
