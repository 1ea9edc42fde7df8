/* gpt2kit's float32 and bfloat16 products for decode steps and small batches (M <= 16 input rows), where a product
 * is bound by reading W from memory (4 or 2 bytes a weight) and the ops around it (the block's layer norm before,
 * its GELU and residual add after: rows.h) cost as much as their arithmetic is worth:
 *     y[M, N] = ln(x)[M, K] @ W + bias, then act and + residual,
 * W in either layout: [K, N] (GPT-2's Conv1D, the blocks' projections) or [N, K] (nn.Linear: the tied head).
 * float32: summed in another order than MKL's (within ~1e-6 relative), as oneDNN's packed products are.
 * bfloat16: the weights widened to float32 in registers (exact) and summed in float32, rounded to bfloat16 where
 * the module path rounds (the layer norm's output, the product's with its bias and GELU, the residual sum), as
 * oneDNN's bf16 products do; plain AVX-512F or AVX2 (simd.h), so also on CPUs without native bf16 products.
 * Built with quantized.c and attention.c into one library (native/__init__.py). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rows.h"

#define DENSE_MAX_M 16
/* [N, K] rows ahead to prefetch at one input row (four rows a step): one row is 3 KB for GPT-2 small's head, too
 * short for the hardware prefetcher to ramp up on four read side by side (as in quantized.c) */
#define DENSE_PREFETCH_ROWS 16

/* [K, N]: the rows of W are cut into chunks of KN_CHUNK rows, each read as one contiguous stream (column blocks would
 * jump N * 4 bytes every row, a new page each step, which the hardware prefetcher does not follow), four rows at a
 * time into the chunk's own partial sums (M, N) (in L1/L2: one load and store of them per four weights); the chunks'
 * sums are added in chunk order at the end, so the result does not depend on which thread ran which chunk. */
#ifndef KN_CHUNK
#define KN_CHUNK 64
#endif
#ifndef KN_AHEAD
#define KN_AHEAD 8  /* rows ahead prefetched (two groups of four) */
#endif
/* 16 weights from element i of a float32 (bf16 = 0) or bfloat16 (bf16 = 1) array, as float32 */
static inline __attribute__((always_inline)) vf load_w(const void *w, int64_t i, vm live, const int bf16) {
    return bf16 ? vf_bf16_load((const uint16_t *)w + i, live) : vf_loadm((const float *)w + i, live);
}

static inline __attribute__((always_inline)) void kn_chunk(const float *x, int64_t M, int64_t ldx, const void *w,
                                                           int64_t N, int64_t Np, int64_t k0, int64_t k1, float *p,
                                                           const int bf16) {
    const int64_t es = bf16 ? 2 : 4;  /* bytes a weight */
    memset(p, 0, (size_t)(M * Np) * sizeof(float));
    for (int64_t k = k0; k < k1;) {
        const int R = k1 - k >= 4 ? 4 : 1;  /* a tail of K % 4 rows goes one by one */
        const int64_t w0 = k * N;  /* element index of row k */
        for (int64_t n = 0; n < N; n += 16) {
            const vm live = vm_first(N - n);
            if (R == 4) {
#if KN_AHEAD
                if (!bf16 || (n & 31) == 0)  /* a line of 64 bytes: 16 float32 or 32 bf16 weights */
                    for (int r = 0; r < 4; r++)
                        _mm_prefetch((const char *)w + (w0 + (KN_AHEAD + r) * N + n) * es, _MM_HINT_T0);
#endif
                const vf a = load_w(w, w0 + n, live, bf16), b = load_w(w, w0 + N + n, live, bf16),
                             c = load_w(w, w0 + 2 * N + n, live, bf16), d = load_w(w, w0 + 3 * N + n, live, bf16);
                for (int64_t m = 0; m < M; m++) {
                    const float *xm = x + m * ldx + k;
                    vf acc = vf_loada(p + m * Np + n);
                    acc = vf_fmadd(a, vf_set1(xm[0]), acc);
                    acc = vf_fmadd(b, vf_set1(xm[1]), acc);
                    acc = vf_fmadd(c, vf_set1(xm[2]), acc);
                    acc = vf_fmadd(d, vf_set1(xm[3]), acc);
                    vf_storea(p + m * Np + n, acc);
                }
            } else {
                const vf a = load_w(w, w0 + n, live, bf16);
                for (int64_t m = 0; m < M; m++) {
                    const vf acc = vf_loada(p + m * Np + n);
                    vf_storea(p + m * Np + n, vf_fmadd(a, vf_set1(x[m * ldx + k]), acc));
                }
            }
        }
        k += R;
    }
}

static void kn_product(const float *x, int64_t M, int64_t K, int64_t ldx, const void *w, int64_t N, const float *bias,
                       float *y, int64_t ldy, const int bf16) {
    const int64_t Np = (N + 15) / 16 * 16, part_len = M * Np, chunks = (K + KN_CHUNK - 1) / KN_CHUNK;
    float *part = (float *)aligned_alloc(64, (size_t)(chunks * part_len) * sizeof(float));
    #pragma omp parallel for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t k0 = c * KN_CHUNK, k1 = (c + 1) * KN_CHUNK < K ? (c + 1) * KN_CHUNK : K;
        if (bf16) kn_chunk(x, M, ldx, w, N, Np, k0, k1, part + c * part_len, 1);
        else kn_chunk(x, M, ldx, w, N, Np, k0, k1, part + c * part_len, 0);
    }
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n += 16) {
            const vm live = vm_first(N - n);
            vf s = vf_loada(part + m * Np + n);
            for (int64_t c = 1; c < chunks; c++) s = vf_add(s, vf_loada(part + c * part_len + m * Np + n));
            if (bias) s = vf_add(s, vf_loadm(bias + n, live));
            vf_storem(y + m * ldy + n, live, s);
        }
    free(part);
}

/* [N, K], one input row: four output rows at once (four independent FMA chains share each load of x) */
static inline __attribute__((always_inline)) void nk_rows4_m1(const float *x, int64_t K, const void *w,
                                                              const float *bias, int64_t n, float *y, const int bf16) {
    const int64_t r0 = n * K, es = bf16 ? 2 : 4;
    vf a[4];
    for (int r = 0; r < 4; r++) a[r] = vf_zero();
    for (int64_t k = 0; k < K; k += 16) {
        const vm live = vm_first(K - k);
        for (int r = 0; r < 4; r++) {
            if (!bf16 || (k & 31) == 0)
                _mm_prefetch((const char *)w + (r0 + (DENSE_PREFETCH_ROWS + r) * K + k) * es, _MM_HINT_T0);
            a[r] = vf_fmadd(load_w(w, r0 + r * K + k, live, bf16), vf_loadm(x + k, live), a[r]);
        }
    }
    for (int r = 0; r < 4; r++) y[n + r] = vf_sum(a[r]) + (bias ? bias[n + r] : 0.0f);
}

/* [N, K], output row n for MM input rows */
static inline __attribute__((always_inline)) void nk_row(const float *x, int64_t ldx, int64_t K, const void *w,
                                                         int64_t row, float b0, float *y, int64_t ldy, const int MM,
                                                         const int bf16) {
    vf acc[4];
    for (int m = 0; m < MM; m++) acc[m] = vf_zero();
    for (int64_t k = 0; k < K; k += 16) {
        const vm live = vm_first(K - k);
        const vf wv = load_w(w, row + k, live, bf16);
        for (int m = 0; m < MM; m++) acc[m] = vf_fmadd(wv, vf_loadm(x + m * ldx + k, live), acc[m]);
    }
    for (int m = 0; m < MM; m++) y[m * ldy] = vf_sum(acc[m]) + b0;
}

static inline __attribute__((always_inline)) void nk_body(const float *x, int64_t M, int64_t K, int64_t ldx,
                                                          const void *w, int64_t N, const float *bias, float *y,
                                                          int64_t ldy, const int bf16) {
    if (M == 1) {
        const int64_t N4 = N / 4 * 4;
        #pragma omp parallel for schedule(guided, 4)
        for (int64_t n = 0; n < N4; n += 4) nk_rows4_m1(x, K, w, bias, n, y, bf16);
        for (int64_t n = N4; n < N; n++) nk_row(x, ldx, K, w, n * K, bias ? bias[n] : 0.0f, y + n, ldy, 1, bf16);
        return;
    }
    #pragma omp parallel for schedule(dynamic, 16)
    for (int64_t n = 0; n < N; n++) {
        const float b0 = bias ? bias[n] : 0.0f;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const float *xm = x + m0 * ldx;
            float *ym = y + m0 * ldy + n;
            switch (M - m0 >= 4 ? 4 : M - m0) {
                case 1: nk_row(xm, ldx, K, w, n * K, b0, ym, ldy, 1, bf16); break;
                case 2: nk_row(xm, ldx, K, w, n * K, b0, ym, ldy, 2, bf16); break;
                case 3: nk_row(xm, ldx, K, w, n * K, b0, ym, ldy, 3, bf16); break;
                default: nk_row(xm, ldx, K, w, n * K, b0, ym, ldy, 4, bf16); break;
            }
        }
    }
}

static void nk_product(const float *x, int64_t M, int64_t K, int64_t ldx, const void *w, int64_t N, const float *bias,
                       float *y, int64_t ldy, const int bf16) {
    if (bf16) nk_body(x, M, K, ldx, w, N, bias, y, ldy, 1);
    else nk_body(x, M, K, ldx, w, N, bias, y, ldy, 0);
}

/* x (M, K) rows ldx apart; w: [K, N] (layout 0) or [N, K] (layout 1); bias (N,) or NULL; y (M, N) rows ldy apart;
 * ln_w, ln_b, eps: the layer norm applied to x first (ln_w NULL: none; K % 16 == 0); act (1: tanh GELU), residual
 * (M, N) rows ldy apart or NULL: the epilogue's. Returns 0, or -1 for arguments it refuses. */
int gpt2kit_f32_mm(const float *x, int64_t M, int64_t K, int64_t ldx, const float *w, int64_t N, int64_t layout,
                   const float *bias, float *y, int64_t ldy, int64_t act, const float *residual, const float *ln_w,
                   const float *ln_b, float eps) {
    if (M < 1 || M > DENSE_MAX_M || K < 1 || N < 1 || (layout != 0 && layout != 1) || (ln_w && K % 16)) return -1;
    float *normed = NULL;
    if (ln_w) {
        normed = alloc_rows(M, K);
        layer_norm_rows(x, M, K, ldx, ln_w, ln_b, eps, normed);
        x = normed, ldx = K;
    }
    if (layout == 0) kn_product(x, M, K, ldx, w, N, bias, y, ldy, 0);
    else nk_product(x, M, K, ldx, w, N, bias, y, ldy, 0);
    free(normed);
    epilogue(y, M, N, ldy, act, residual);
    return 0;
}

static float *widen(const uint16_t *src, int64_t M, int64_t K, int64_t ld) {  /* (M, K), rows ld apart -> float32 */
    float *out = alloc_rows(M, K);
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k += 16) {
            const vm live = vm_first(K - k);
            vf_storem(out + m * K + k, live, vf_bf16_load(src + m * ld + k, live));
        }
    return out;
}

/* gpt2kit_f32_mm for bfloat16 x, w, bias, y, residual and layer norm (the model's dtype). Returns 0, or -1. */
int gpt2kit_bf16_mm(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t N, int64_t layout,
                    const uint16_t *bias, uint16_t *y, int64_t ldy, int64_t act, const uint16_t *residual,
                    const uint16_t *ln_w, const uint16_t *ln_b, float eps) {
    if (M < 1 || M > DENSE_MAX_M || K < 1 || N < 1 || (layout != 0 && layout != 1) || (ln_w && K % 16)) return -1;
    float *xf = widen(x, M, K, ldx);
    if (ln_w) {  /* the layer norm in float32, its output rounded to bf16 as the module's is */
        float *lw = widen(ln_w, 1, K, K), *lb = widen(ln_b, 1, K, K), *normed = alloc_rows(M, K);
        layer_norm_rows(xf, M, K, K, lw, lb, eps, normed);
        for (int64_t i = 0; i < M * K; i += 16) vf_store(normed + i, vf_bf16_round(vf_load(normed + i)));
        free(xf), free(lw), free(lb);
        xf = normed;
    }
    float *bf = bias ? widen(bias, 1, N, N) : NULL, *yf = alloc_rows(M, N);
    if (layout == 0) kn_product(xf, M, K, K, w, N, bf, yf, N, 1);
    else nk_product(xf, M, K, K, w, N, bf, yf, N, 1);
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n += 16) {
            const vm live = vm_first(N - n);
            vf v = vf_loadm(yf + m * N + n, live);
            if (act) v = vf_gelu_tanh(v);
            if (residual)  /* the product (+ bias, GELU) in bf16, then the sum */
                v = vf_add(vf_bf16_round(v), vf_bf16_load(residual + m * ldy + n, live));
            vf_bf16_store(y + m * ldy + n, v, live);
        }
    free(xf), free(bf), free(yf);
    return 0;
}

/* The argmax of the float32 head's logits, exactly as gpt2kit_f32_mm computes them ([N, K], no bias: the same
 * per-row sums, nk_row), from a screen z (M rows ldz apart) of every logit that a cheaper product computed
 * (LMHead.argmax: an int8 copy of the head, a quarter of its bytes, or a bfloat16 one) and a bound on the
 * screen's error of the form |z[m, n] - logit[m, n]| <= |x[m]| * cw[n] + rel * |z[m, n]| (Cauchy-Schwarz over
 * the inputs' and weights' rounding, plus the sums' float32 rounding; rel: a screen rounded to bfloat16 on
 * output: model/linear.py screen_bounds, bf16_screen_bounds). No n with z + bound below the largest
 * z - bound can be the argmax: only the outputs left (a handful) are summed again from W in float32, and the
 * first largest of those is the answer. banned (n_banned ids): outputs a logits processor sets to -inf (eos before
 * min_new_tokens), never chosen. out[m]: the argmax; n_candidates[m]: outputs summed again. Returns 0; 1 where a
 * logit is not finite (or could overflow): the caller computes the logits instead; -1 for arguments it refuses. */
int gpt2kit_head_argmax(const float *x, int64_t M, int64_t K, int64_t ldx, const float *w, const float *z,
                        int64_t ldz, const float *cw, float rel, int64_t N, const int64_t *banned,
                        int64_t n_banned, int64_t *out, int64_t *n_candidates) {
    if (M < 1 || K < 1 || N < 1 || n_banned < 0 || !(rel >= 0.0f && rel < 1.0f)) return -1;
    for (int64_t i = 0; i < n_banned; i++)
        if (banned[i] < 0 || banned[i] >= N) return -1;
    char *is_banned = (char *)calloc((size_t)N, 1);
    if (is_banned == NULL) return -1;
    for (int64_t i = 0; i < n_banned; i++) is_banned[banned[i]] = 1;
    int status = 0;
    #pragma omp parallel for schedule(static) if (M > 1) reduction(|: status)
    for (int64_t m = 0; m < M; m++) {  /* rows are independent: a thread each */
        const float *xm = x + m * ldx, *zm = z + m * ldz;
        double ss = 0.0;
        for (int64_t k = 0; k < K; k++) ss += (double)xm[k] * xm[k];
        const float cx = (float)sqrt(ss) * (1.0f + 1e-6f);  /* |x|, rounded up */
        if (!isfinite(cx)) { status |= 1; continue; }
        /* the largest lower bound (the argmax's logit is at least this), and whether any screen value is a NaN or
         * inf or its sum could overflow; branch-free, so that the compiler vectorizes it */
        float lower = -INFINITY;
        int bad = 0;
        for (int64_t n = 0; n < N; n++) {
            const float a = fabsf(zm[n]), b = cx * cw[n] + rel * a;
            bad |= !(a + b < 1e37f);
            const float lo = is_banned[n] ? -INFINITY : zm[n] - b;
            lower = lo > lower ? lo : lower;
        }
        if (bad) { status |= 1; continue; }
        int64_t best = -1, count = 0;
        float best_v = -INFINITY;
        for (int64_t n = 0; n < N; n++) {
            if (is_banned[n] || zm[n] + cx * cw[n] + rel * fabsf(zm[n]) < lower) continue;
            float v;
            nk_row(xm, ldx, K, w, n * K, 0.0f, &v, 1, 1, 0);  /* what gpt2kit_f32_mm gives for output n */
            count++;
            if (!isfinite(v)) { bad = 1; break; }
            if (best < 0 || v > best_v) best = n, best_v = v;  /* ascending n: the first largest, as argmax */
        }
        if (bad || best < 0) status |= 1;  /* a logit not finite, or every output banned */
        out[m] = best, n_candidates[m] = count;
    }
    free(is_banned);
    return status;
}
