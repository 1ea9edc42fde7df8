/* gpt2kit's CPU kernels for quantized projections: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), W decoded on the
 * fly from its quantized form, never materialised. For decode and small batches (M <= 16), where a product
 * is bound by reading W from memory: 4-bit weights are read as 0.5 byte each, int8 as 1 byte.
 *
 * 4-bit ("lut4"): two codes per byte, first in the high nibble, rows of K/2 bytes (bitsandbytes' layout);
 * every block of `bs` consecutive inputs has its own 16-entry table, table[c] = code[c] * scale + zero:
 * NF4/FP4 pass their code values with scale = the block's absmax, zero = 0; affine int4 passes code = c - 8
 * with its group's scale and zero. The table lives in one AVX-512 register and one vpermps looks up 16
 * codes at a time (on AVX2, two vpermps and a blend look up 8). Kernels by rows: one row, four output rows at a
 * time (NF4 / FP4 on AVX-512: codes read as dwords, lut4_packed_rows_m1; affine int4: the integer kernels); 2-7
 * rows, row at a time (lut4_row); 8 and more, tiled (tiled_product, for int8 too).
 * int8: rows of K int8 values and one scale per row.
 *
 * Rows are handed out 16 at a time (dynamic schedule; guided for batch 1, whose long runs of consecutive
 * rows prefetch well): on a shared machine a descheduled thread does not hold the others up at the end of
 * the loop.
 * A prologue applies the block's layer norm to x and an epilogue the tanh GELU and / or the residual add, where
 * the block asks (one call instead of up to four small ops, each slow with the caches the weight stream has just
 * evicted).
 * Built at run time by native/__init__.py, with attention.c, with the system C compiler for this CPU (-march=native); torch's own
 * OpenMP runtime runs the threads (the soname is already loaded when this library is opened).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "vecmath.h"
#include "rows.h"

#define MAX_M 16
/* Batch-1 kernels: how far ahead (in groups of four output rows) the rows are prefetched. A GPT-2 row is
 * only 384-3072 bytes, too short a stream for the hardware prefetcher to ramp up on four rows read side by
 * side: GPT-2 small's 49 int8 matrices (cold, 2 Xeon threads) took 12.5-17.2 ms without, 7.4-10.1 ms with
 * 8 groups ahead and a guided schedule (contiguous runs of rows per thread); int4 11.4-13.3 -> 7.9-8.4 ms */
#define PREFETCH_GROUPS 8
/* On AVX2 (measured on a 2-core AVX2-only EPYC, C harness, variants alternating in one process, 40 rounds): the
 * one-row int8 and int4 kernels instead prefetch the next group of four rows as one run of bytes, spread evenly over
 * the group's steps (a group's four rows are contiguous: its successor's bytes are the next 4 K of the stream), in
 * place of a burst of one line a row every few steps 8 groups on. int8: the head screen (50257 x 768) 1.98-2.29 ->
 * 1.47-1.85 ms (1.21-1.34x over five runs), small's 48 block matrices 1.12-1.33x; int4 g32 1.10-1.19x (it does more
 * work a line: 54-56 GB/s-equivalent from L2, 21-24 from memory); 2, 4 or 8 groups on instead of 1 ran no faster. No
 * AVX-512 CPU was at hand to measure it on: that build keeps the burst. */
#ifndef GPT2KIT_AVX512
#define LINEAR_PREFETCH 1
#endif

/* x (M, K), layer-normed first where ln_w is given -> its even and odd columns, so a byte's high/low nibbles
 * meet their inputs lane by lane (K % 32 == 0) */
static float *deinterleave(const float *x, int64_t M, int64_t K, int64_t ldx, const float *ln_w, const float *ln_b,
                           float eps) {
    float *normed = NULL;
    if (ln_w) {
        normed = alloc_rows(M, K);
        layer_norm_rows(x, M, K, ldx, ln_w, ln_b, eps, normed);
        x = normed, ldx = K;
    }
    float *buf = alloc_rows(M, K);
    for (int64_t m = 0; m < M; m++) {
        float *even = buf + m * K, *odd = even + K / 2;
        const float *row = x + m * ldx;
        for (int64_t j = 0; j < K / 2; j += 16) {  /* K % 32 == 0 */
            vf e, o;
            vf_even_odd(vf_load(row + 2 * j), vf_load(row + 2 * j + 16), &e, &o);
            vf_store(even + j, e);
            vf_store(odd + j, o);
        }
    }
    free(normed);
    return buf;
}

/* one output row n for MM inputs (MM a compile-time constant, so the accumulators stay in registers; two
 * per input row, for the high and low nibbles, to keep two FMA chains in flight) */
static inline __attribute__((always_inline)) void lut4_row(const float *xs, int64_t K, const uint8_t *row,
                                                           const vf table0, const float *scale, const float *zero,
                                                           int64_t g0, int64_t bs, float b0, float *y, int64_t ldy,
                                                           const int MM) {
    vf acc_hi[MAX_M], acc_lo[MAX_M];
    for (int m = 0; m < MM; m++) acc_hi[m] = acc_lo[m] = vf_zero();
    const int64_t half = K / 2, blocks = K / bs;
    for (int64_t b = 0; b < blocks; b++) {
        const vf table = zero ? vf_fmadd(table0, vf_set1(scale[g0 + b]), vf_set1(zero[g0 + b]))
                              : vf_mul(table0, vf_set1(scale[g0 + b]));
        for (int64_t j = b * bs / 2; j < (b + 1) * bs / 2; j += 16) {  /* 16 bytes = 32 weights */
            const vi bytes = vi_u8(row + j);
            const vf hi = vf_lut16(vi_srl4(bytes), table);
            const vf lo = vf_lut16(bytes, table);  /* the index's low 4 bits */
            for (int m = 0; m < MM; m++) {
                acc_hi[m] = vf_fmadd(hi, vf_load(xs + m * K + j), acc_hi[m]);
                acc_lo[m] = vf_fmadd(lo, vf_load(xs + m * K + half + j), acc_lo[m]);
            }
        }
    }
    for (int m = 0; m < MM; m++) y[m * ldy] = vf_sum(vf_add(acc_hi[m], acc_lo[m])) + b0;
}

/* one input row (batch-1 decode), four output rows at once: eight independent FMA chains (two per row) where
 * lut4_row at one input row has two, and is bound by their latency (measured ~4 GB/s for GPT-2 small's 48
 * matrices on 2 Xeon threads) */
static inline void lut4_rows4_m1(const float *xs, int64_t K, const uint8_t *w, const vf table0,
                                 const float *scale, const float *zero, int64_t bs, const float *bias, int64_t n,
                                 float *y) {
    const int64_t half = K / 2, blocks = K / bs;
    vf hi[4], lo[4];
    for (int r = 0; r < 4; r++) hi[r] = lo[r] = vf_zero();
    for (int64_t b = 0; b < blocks; b++) {
        vf table[4];
        for (int r = 0; r < 4; r++) {
            const int64_t g = (n + r) * blocks + b;
            table[r] = zero ? vf_fmadd(table0, vf_set1(scale[g]), vf_set1(zero[g]))
                            : vf_mul(table0, vf_set1(scale[g]));
        }
        for (int64_t j = b * bs / 2; j < (b + 1) * bs / 2; j += 16) {  /* 16 bytes = 32 weights a row */
            if ((j & 63) == 0)
                for (int r = 0; r < 4; r++)
                    _mm_prefetch((const char *)(w + (n + r + PREFETCH_GROUPS * 4) * half + j), _MM_HINT_T0);
            const vf xe = vf_load(xs + j), xo = vf_load(xs + half + j);
            for (int r = 0; r < 4; r++) {
                const vi bytes = vi_u8(w + (n + r) * half + j);
                hi[r] = vf_fmadd(vf_lut16(vi_srl4(bytes), table[r]), xe, hi[r]);
                /* the lookup reads only the index's low 4 bits: the low nibble needs no mask (~5% a step) */
                lo[r] = vf_fmadd(vf_lut16(bytes, table[r]), xo, lo[r]);
            }
        }
    }
    for (int r = 0; r < 4; r++)
        y[n + r] = vf_sum(vf_add(hi[r], lo[r])) + (bias ? bias[n + r] : 0.0f);
}

#ifdef GPT2KIT_AVX512
/* NF4 / FP4 at one input row on AVX-512 (status 3, "fused-lut4-packed"): a row's codes are read 64 bytes (128
 * weights) at a time as 16 dwords, and vpermps, which reads the low 4 bits of each dword, looks up the code at
 * bits 4t .. 4t + 3 of every lane after one shift by 4t (t = 0..7): per 32 weights two lookups, about two shifts and
 * two FMAs, where lut4_rows4_m1 widens 16 bytes to dwords first (vpmovzxbd, a second shuffle-port instruction per 16
 * weights: the port these kernels are bound by; ~1.3x a thread on the Xeon). Lane i of shift t holds input
 * 128c + 8i + PACKED_ORDER[t] of chunk c (a byte's first code is in its high nibble), so x is permuted once into that
 * order (`pack_x`). The table is the bare code values and each chunk's sums are scaled by their blocks' absmax
 * (lanes 8i .. 8i + 7 of a chunk lie in block (128c + 8i) / bs): sum_k code_k x_k absmax instead of
 * sum_k (code_k absmax) x_k, the same float32 accuracy. */
#define PACKED_CHUNK 128
static const int PACKED_ORDER[8] = {1, 0, 3, 2, 5, 4, 7, 6};

/* x (K), layer-normed first where ln_w is given -> chunks of 128: x8[128c + 16t + i] = x[128c + 8i + ORDER[t]],
 * zero-padded to a whole chunk (a row's last 64 codes meet the padding's zeros past K) */
static float *pack_x(const float *x, int64_t K, const float *ln_w, const float *ln_b, float eps) {
    float *normed = NULL;
    if (ln_w) {
        normed = alloc_rows(1, K);
        layer_norm_rows(x, 1, K, K, ln_w, ln_b, eps, normed);
        x = normed;
    }
    const int64_t padded = (K + PACKED_CHUNK - 1) / PACKED_CHUNK * PACKED_CHUNK;
    float *x8 = alloc_rows(1, padded);
    const __m512i lane8 = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(8));
    for (int64_t c = 0; c < padded; c += PACKED_CHUNK)
        for (int t = 0; t < 8; t++) {
            const __m512i idx = _mm512_add_epi32(lane8, _mm512_set1_epi32((int)(c + PACKED_ORDER[t])));
            const __mmask16 live = _mm512_cmplt_epi32_mask(idx, _mm512_set1_epi32((int)K));
            _mm512_store_ps(x8 + c + 16 * t, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, idx, x, 4));
        }
    free(normed);
    return x8;
}

/* R (1..4) consecutive output rows from n; bs a power of 2, K % 64 == 0 */
static inline __attribute__((always_inline)) void lut4_packed_rows_m1(const float *x8, int64_t K, const uint8_t *w,
                                                                   const __m512 code, const float *scale, int64_t bs,
                                                                   const float *bias, int64_t n, float *y, const int R) {
    const int64_t half = K / 2, blocks = K / bs;
    const int shift = __builtin_ctzll((unsigned long long)bs);
    const __m512i gidx = _mm512_srli_epi32(_mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5,
                                                                                4, 3, 2, 1, 0), _mm512_set1_epi32(8)),
                                           shift);  /* a lane's block, counted from the chunk's first */
    __m512 tot[4];
    for (int r = 0; r < R; r++) tot[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < half; j += PACKED_CHUNK / 2) {  /* 64 bytes a row */
        for (int r = 0; r < R; r++)
            _mm_prefetch((const char *)(w + (n + r + PREFETCH_GROUPS * 4) * half + j), _MM_HINT_T0);
        const int64_t live = half - j < PACKED_CHUNK / 2 ? half - j : PACKED_CHUNK / 2;  /* 64, or the last 32 */
        const __mmask64 bytes = live == 64 ? ~0ULL : (1ULL << live) - 1;
        const int64_t g0 = (2 * j) >> shift, ng0 = (2 * live) >> shift, ng = ng0 ? ng0 : 1;
        const float *xp = x8 + 2 * j;
        for (int r = 0; r < R; r++) {
            const __m512i v = _mm512_maskz_loadu_epi8(bytes, w + (n + r) * half + j);
            __m512 a = _mm512_mul_ps(_mm512_permutexvar_ps(v, code), _mm512_load_ps(xp));
            __m512 b = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), code), _mm512_load_ps(xp + 16));
            a = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 8), code), _mm512_load_ps(xp + 32), a);
            b = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 12), code), _mm512_load_ps(xp + 48), b);
            a = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 16), code), _mm512_load_ps(xp + 64), a);
            b = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 20), code), _mm512_load_ps(xp + 80), b);
            a = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 24), code), _mm512_load_ps(xp + 96), a);
            b = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 28), code), _mm512_load_ps(xp + 112), b);
            const __m512 sv = _mm512_permutexvar_ps(gidx, _mm512_maskz_loadu_ps((__mmask16)((1u << ng) - 1),
                                                                                 scale + (n + r) * blocks + g0));
            tot[r] = _mm512_fmadd_ps(_mm512_add_ps(a, b), sv, tot[r]);
        }
    }
    for (int r = 0; r < R; r++) y[n + r] = _mm512_reduce_add_ps(tot[r]) + (bias ? bias[n + r] : 0.0f);
}

static void lut4_packed_m1(const float *x8, int64_t K, const uint8_t *w, int64_t N, const float *code,
                           const float *scale, int64_t bs, const float *bias, float *y) {
    const __m512 table = _mm512_loadu_ps(code);
    const int64_t N4 = N / 4 * 4;
    #pragma omp parallel for schedule(guided, 4)
    for (int64_t n = 0; n < N4; n += 4) lut4_packed_rows_m1(x8, K, w, table, scale, bs, bias, n, y, 4);
    for (int64_t n = N4; n < N; n++) lut4_packed_rows_m1(x8, K, w, table, scale, bs, bias, n, y, 1);
}
#endif

/* The integer int4 kernels: AVX512-VNNI's (status 1) or AVX2's (status 2); the AVX-512 build of a CPU without VNNI
 * has none (the float kernel runs) */
#if defined(GPT2KIT_AVX512) && defined(__AVX512VNNI__)
#define INT4_INTEGER 1
#elif !defined(GPT2KIT_AVX512)
#define INT4_INTEGER 2
#endif

#ifdef INT4_INTEGER
/* GPT2KIT_VNNI=0 turns the integer int4 kernel off (the float one runs): for A/B measurements and the tests that
 * hold one against the other; read every call, so a process can switch */
static int vnni_allowed(void) {
    const char *e = getenv("GPT2KIT_VNNI");
    return !e || e[0] != '0';
}
/* Affine int4 at one input row by integer dot products: VNNI's vpdpbusd multiplies 64 unsigned 4-bit codes by 64
 * signed bytes an instruction (AVX2's vpmaddubsw + vpmaddwd take two for 32), where the float kernel above spends
 * six instructions on 32 weights (a widening, a shift, two lookups, two FMAs; on AVX2 twice as many). x is split into
 * three 7-bit integer pieces, x ~ sigma (x1 + x2 / 128 + x3 / 128^2) with sigma = max|x| / 127 (|x1| <= 127, |x2|,
 * |x3| <= 64), exact to ~3e-7 max|x|, so no activation precision that float32 keeps is given up: the product stays
 * weight-only. With w = (q - 8) s + z per group g:
 *     sum_k w_k x_k = sum_g s_g sum_{k in g} q_k x_k + sum_g (z_g - 8 s_g) Sx_g,   Sx_g = sum_{k in g} x_k
 * (the integer split follows the usual multi-limb idea; llama.cpp's q4_0 x q8_0 products use vpdpbusd /
 * vpmaddubsw on one 8-bit piece, which rounds the activations). */
typedef struct {
    int8_t *pieces;  /* 6 arrays of `stride` bytes: piece 0..2 x (even inputs: high nibbles, odd: low nibbles) */
    int64_t stride;  /* K / 2 rounded up to 64, zero padded */
    float *gsum;     /* Sx_g, K / bs */
    float sigma;
} xsplit;

/* 0, or -1 where x holds a NaN or an infinity (the float kernel then runs, and propagates it). K % 32 == 0, bs % 32
 * == 0. Vectorised: this runs once a product, and a scalar loop (three roundings an input) cost ~0.4 ms of a GPT-2
 * small decode step. */
static int split_x(const float *x, int64_t K, int64_t bs, xsplit *out) {
    vf mx = vf_zero();
    int bad = 0;
    for (int64_t k = 0; k < K; k += 16) {
        const vf v = vf_load(x + k);
        bad |= vf_nonfinite(v);
        mx = vf_max(mx, vf_abs(v));
    }
    if (bad) return -1;
    const float m = vf_hmax(mx);
    const float sigma = m > 0.0f ? m / 127.0f : 1.0f;
    const vf inv = vf_set1(1.0f / sigma), r128 = vf_set1(128.0f);
    const int64_t stride = (K / 2 + 63) / 64 * 64;
    int8_t *buf = (int8_t *)aligned_alloc(64, (size_t)(6 * stride));
    float *gsum = (float *)aligned_alloc(64, ((size_t)(K / bs) * sizeof(float) + 63) / 64 * 64);
    memset(buf, 0, (size_t)(6 * stride));  /* the padding past K / 2 stays zero: the masked chunk's codes meet 0 */
    for (int64_t g = 0; g < K / bs; g++) gsum[g] = 0.0f;
    for (int64_t k = 0; k < K; k += 32) {  /* 32 inputs: 16 even, 16 odd */
        const vf lo = vf_load(x + k), hi = vf_load(x + k + 16);
        gsum[k / bs] += vf_sum(vf_add(lo, hi));
        vf parts[2];
        vf_even_odd(lo, hi, &parts[0], &parts[1]);
        for (int o = 0; o < 2; o++) {
            const vf v = vf_mul(parts[o], inv);
            const vf a = vf_round(v);
            const vf r = vf_mul(vf_sub(v, a), r128);  /* exact: v - a, and * 2^7 */
            const vf b = vf_round(r);
            const vf c = vf_round(vf_mul(vf_sub(r, b), r128));
            vf_store_i8(buf + (0 * 2 + o) * stride + k / 2, a);
            vf_store_i8(buf + (1 * 2 + o) * stride + k / 2, b);
            vf_store_i8(buf + (2 * 2 + o) * stride + k / 2, c);
        }
    }
    out->pieces = buf, out->stride = stride, out->gsum = gsum, out->sigma = sigma;
    return 0;
}

/* y[n + r] from the rows' integer sums `tot` (units of sigma / 2^14): + sum_g (z_g - 8 s_g) Sx_g and the bias */
static inline void int4_finish(const xsplit *xs, const float *scale, const float *zero, int64_t groups,
                               const float *bias, int64_t n, float tot, float *y) {
    float zt = 0.0f;
    const float *sr = scale + n * groups, *zr = zero + n * groups;
    for (int64_t g = 0; g < groups; g += 16) {
        const vm m = vm_first(groups - g);
        const vf off = vf_fnmadd(vf_set1(8.0f), vf_loadm(sr + g, m), vf_loadm(zr + g, m));
        zt += vf_sum(vf_mul(off, vf_loadm(xs->gsum + g, m)));
    }
    y[n] = tot * (xs->sigma / 16384.0f) + zt + (bias ? bias[n] : 0.0f);
}
#endif

#if INT4_INTEGER == 1
/* R (1..4) consecutive output rows from n; rows K / 2 bytes, scale / zero [N, K / bs] */
static inline __attribute__((always_inline)) void int4_integer_rows_m1(const xsplit *xs, int64_t K, const uint8_t *w,
                                                                    const float *scale, const float *zero, int64_t bs,
                                                                    const float *bias, int64_t n, float *y, const int R) {
    const int64_t half = K / 2, groups = K / bs, S = xs->stride;
    const __m512i nib = _mm512_set1_epi8(0x0F);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512 tot[4];
    for (int r = 0; r < R; r++) tot[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < half; j += 64) {  /* 64 bytes = 128 weights a row; lane i: bytes 4i .. 4i + 3 */
        const __mmask64 live = half - j >= 64 ? ~0ULL : (1ULL << (half - j)) - 1;
        for (int r = 0; r < R; r++)
            _mm_prefetch((const char *)(w + (n + r + PREFETCH_GROUPS * 4) * half + j), _MM_HINT_T0);
        const int8_t *p = xs->pieces + j;
        const __m512i e1 = _mm512_load_si512(p), o1 = _mm512_load_si512(p + S), e2 = _mm512_load_si512(p + 2 * S),
                      o2 = _mm512_load_si512(p + 3 * S), e3 = _mm512_load_si512(p + 4 * S), o3 = _mm512_load_si512(p + 5 * S);
        /* lane i's inputs 2j + 8i .. 2j + 8i + 7 are in group (2j + 8i) / bs: its scale, from the chunk's first */
        const int64_t g0 = 2 * j / bs, ng = groups - g0 < 16 ? groups - g0 : 16;
        const __m512i gidx = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)(2 * j)),
                                                                                _mm512_slli_epi32(lane, 3)),
                                                                __builtin_ctzll((unsigned long long)bs)),
                                              _mm512_set1_epi32((int)g0));
        for (int r = 0; r < R; r++) {
            const __m512i v = _mm512_maskz_loadu_epi8(live, w + (n + r) * half + j);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib), lo = _mm512_and_si512(v, nib);
            const __m512i a1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, e1), lo, o1);
            const __m512i a2 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, e2), lo, o2);
            const __m512i a3 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, e3), lo, o3);
            /* |a1| <= 8 * 15 * 127: a1 * 2^14 + a2 * 2^7 + a3 fits int32 */
            const __m512i a = _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(a1, 14), _mm512_slli_epi32(a2, 7)), a3);
            const __m512 sv = _mm512_permutexvar_ps(gidx, _mm512_maskz_loadu_ps((__mmask16)((1u << ng) - 1),
                                                                                 scale + (n + r) * groups + g0));
            tot[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), sv, tot[r]);
        }
    }
    for (int r = 0; r < R; r++) int4_finish(xs, scale, zero, groups, bias, n + r, _mm512_reduce_add_ps(tot[r]), y);
}

#elif INT4_INTEGER == 2
/* The same on AVX2: vpmaddubsw multiplies 32 unsigned codes by 32 signed bytes and adds neighbouring pairs into
 * int16 (at most 2 * 15 * 127: no saturation), two of them (high and low nibbles) add into one int16 vector
 * (<= 7620), and vpmaddwd by (2^14, 2^7, 1) per piece adds those pairs into int32 lanes already weighted (<= 2^28).
 * 32 bytes = 64 weights a row a step; lane i: bytes 4i .. 4i + 3, inputs 2j + 8i .. 2j + 8i + 7. */
/* one row's 64 weights (32 code bytes v) against the six x pieces at p: the integer sum in 8 int32 lanes, the pieces
 * weighted 2^14 / 2^7 / 1. The pieces are read from L1 as each product's memory operand, leaving registers for the
 * rows' sums: kept in registers instead, they pushed the sums, constants and pointers to the stack (GCC 12) */
static inline __attribute__((always_inline)) __m256i int4_dot64(__m256i v, const int8_t *p, int64_t S) {
    const __m256i nib = _mm256_set1_epi8(0x0F);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib), lo = _mm256_and_si256(v, nib);
    const __m256i a1 = _mm256_add_epi16(_mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)p)),
                                        _mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)(p + S))));
    const __m256i a2 = _mm256_add_epi16(_mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(p + 2 * S))),
                                        _mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)(p + 3 * S))));
    const __m256i a3 = _mm256_add_epi16(_mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(p + 4 * S))),
                                        _mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)(p + 5 * S))));
    return _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(a1, _mm256_set1_epi16(1 << 14)),
                                             _mm256_madd_epi16(a2, _mm256_set1_epi16(1 << 7))),
                            _mm256_madd_epi16(a3, _mm256_set1_epi16(1)));
}

static inline __attribute__((always_inline)) void int4_integer_rows_m1(const xsplit *xs, int64_t K, const uint8_t *w,
                                                                    const float *scale, const float *zero, int64_t bs,
                                                                    const float *bias, int64_t n, float *y, const int R) {
    const int64_t half = K / 2, groups = K / bs, S = xs->stride, full = half / 32 * 32;
    __m256 tot[4];
    for (int r = 0; r < R; r++) tot[r] = _mm256_setzero_ps();
    /* the next four rows' codes (128 bytes a step), scales and zero points (4 * 64 / bs floats each a step: a line
     * every 64 / that steps; their prefetch gave 1.13x over the codes' alone) */
    const char *next = (const char *)(w + (n + 4) * half), *next_s = (const char *)(scale + (n + 4) * groups),
               *next_z = (const char *)(zero + (n + 4) * groups);
    const int64_t param_step = 1024 / bs;  /* bytes; bs % 32 == 0, a power of 2 */
    for (int64_t j = 0; j < full; j += 32) {  /* whole 32-byte chunks */
        _mm_prefetch(next + 4 * j, _MM_HINT_T0);
        _mm_prefetch(next + 4 * j + 64, _MM_HINT_T0);
        const int64_t at = j / 32 * param_step;
        if ((at & 63) < param_step) {
            _mm_prefetch(next_s + at, _MM_HINT_T0);
            _mm_prefetch(next_z + at, _MM_HINT_T0);
        }
        const int64_t g0 = 2 * j / bs;  /* the chunk's 64 inputs: groups g0 and g0 + 1 (bs 32, lanes 0-3 and 4-7), or g0 */
        for (int r = 0; r < R; r++) {
            const __m256i a = int4_dot64(_mm256_loadu_si256((const __m256i *)(w + (n + r) * half + j)), xs->pieces + j, S);
            const float *sr = scale + (n + r) * groups + g0;
            const __m256 sv = bs == 32 ? _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_broadcast_ss(sr)),
                                                              _mm_broadcast_ss(sr + 1), 1)
                                       : _mm256_broadcast_ss(sr);
            tot[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), sv, tot[r]);
        }
    }
    if (full < half) {  /* the rows' last, partial chunk: its missing codes meet the pieces' zero padding */
        const int64_t j = full, g0 = 2 * j / bs, ng = groups - g0 < 8 ? groups - g0 : 8;
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i gidx = _mm256_sub_epi32(_mm256_srli_epi32(_mm256_add_epi32(_mm256_set1_epi32((int)(2 * j)),
                                                                                _mm256_slli_epi32(lane, 3)),
                                                                __builtin_ctzll((unsigned long long)bs)),
                                              _mm256_set1_epi32((int)g0));
        const __m256i gmask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)ng), lane);
        for (int r = 0; r < R; r++) {
            uint8_t t[32] = {0};
            memcpy(t, w + (n + r) * half + j, (size_t)(half - j));
            const __m256i a = int4_dot64(_mm256_loadu_si256((const __m256i *)t), xs->pieces + j, S);
            const __m256 sv = _mm256_permutevar8x32_ps(_mm256_maskload_ps(scale + (n + r) * groups + g0, gmask), gidx);
            tot[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), sv, tot[r]);
        }
    }
    for (int r = 0; r < R; r++) int4_finish(xs, scale, zero, groups, bias, n + r, hsum8(tot[r]), y);
}
#endif

#ifdef INT4_INTEGER
/* the whole batch-1 product, or -1 (x not finite): the float kernel runs instead */
static int int4_integer_m1(const float *x, int64_t K, const uint8_t *w, int64_t N, const float *scale, const float *zero,
                        int64_t bs, const float *bias, float *y) {
    xsplit xs;
    if (split_x(x, K, bs, &xs)) return -1;
    const int64_t N4 = N / 4 * 4;
    #pragma omp parallel for schedule(guided, 4)
    for (int64_t n = 0; n < N4; n += 4) int4_integer_rows_m1(&xs, K, w, scale, zero, bs, bias, n, y, 4);
    for (int64_t n = N4; n < N; n++) int4_integer_rows_m1(&xs, K, w, scale, zero, bs, bias, n, y, 1);
    free(xs.pieces);
    free(xs.gsum);
    return 0;
}
#endif

/* Two input rows and more (prefill chunks, batches): each thread takes TILE_N output rows at a time and walks their
 * inputs in chunks of CHUNK_BYTES codes a row: it decodes the chunk into float32 once (its scratch, in L1), then
 * multiplies every input row's matching inputs by it, TILE_M input rows x TILE_N output rows a pass (24 accumulators
 * on AVX-512, 12 single-ymm ones on AVX2), the partial sums kept in a small buffer between chunks. A decoded weight then
 * serves all M rows (the row-at-a-time kernel, lut4_row, decoded it again for every four input rows: 16 rows of GPT-2
 * XL's block products ran at ~50 GFLOP/s on 2 Xeon threads), and the chunk keeps the decoded weights in L1 (whole
 * decoded rows, 100 KB for 6400 inputs, left the product bound by L2 at ~75 GFLOP/s). The decoded values are those
 * gpt2kit_lut4_dequant writes (code * scale + zero, float32): the product is float32's over the exact weights. */
/* Tile and chunk by build, measured in a C harness on 2 Xeon threads, 8-48 rows of GPT-2 XL's products, each variant's
 * best of 6 interleaved runs: 4 x 6 tiles with 512-code chunks took 0.85-0.95x the time of 4 x 4 with 256 (24
 * accumulators, each x load feeding 6 FMAs; a 4 x 6 tile alone ran 103-122 GFLOP/s in L1 against 78-105 for 4 x 4) */
#ifdef GPT2KIT_AVX512
#define TILE_M 4
#define TILE_N 6
#define CHUNK_BYTES 512  /* 1024 inputs a row: TILE_N x 4 KB decoded (24 KB of L1); x streams from L2 */
#else
/* AVX2 (the AVX2-only EPYC, C harness, 2 threads, GPT-2 small's four int4 products, best of 30): a 3 x 4 tile of
 * single-ymm sums ran 8 / 16 / 32 rows at 77 / 92 / 103 GFLOP/s against 63 / 69 / 72 for 2 x 2 tiles of vf pairs;
 * 4 x 3 ran 64 / 75 / 81, 2 x 5 and 2 x 6 59 / 87-97 / 100 */
#define TILE_M 3
#define TILE_N 4
#define CHUNK_BYTES 256  /* 512 inputs a row: TILE_N x 2 KB decoded */
#endif
#define INT8_CHUNK 512  /* int8 inputs a chunk, either build (1024 ran 0.95x at 16-24 rows, 4 x 6 tiles) */
/* the fewest input rows the tiled kernel takes: below, lut4_row's re-decoding costs less than the tile's chunk
 * bookkeeping (2 Xeon threads, GPT-2 XL's 1600 x 6400 and 6400 x 1600: tiled 0.64x / 0.72x / 0.90x the row kernel's
 * speed at 2 / 4 / 6 rows of 1600 inputs, 1.14x / 1.48x at 8 / 16, 1.54x / 2.15x at 8 / 16 rows of 6400) */
#define TILED_MIN_M 8
#define TILED_MAX_M 256  /* and the most it takes (the callers choose how many they pass: quantization/modules.py) */
/* Past TILED_MAX_M rows (where AMX takes any number): CALL, an expression of m0 and rows, on each slab of at most
 * TILED_MAX_M input rows, then return the first slab's status (the kernel of most rows), or the first failure's */
#define BY_SLABS(M, CALL) do {                                                        \
        int first_ = -1;                                                              \
        for (int64_t m0 = 0; m0 < (M); m0 += TILED_MAX_M) {                           \
            const int64_t rows = (M) - m0 < TILED_MAX_M ? (M) - m0 : TILED_MAX_M;     \
            const int rc_ = (CALL);                                                   \
            if (rc_ < 0) return rc_;                                                  \
            if (m0 == 0) first_ = rc_;                                                \
        }                                                                             \
        return first_;                                                                \
    } while (0)

/* acc[m][r] += xs[m] . wt[r] over L floats (rows ldw, ldx apart); MM, RR compile-time, so the accumulators stay in
 * registers. A sum is a vf on AVX-512; on AVX2 one ymm register (both halves of a vf step added into it: 12 sums, 4
 * weight rows and an x row fill the 16 registers), kept in the vf buffer's first half. Every row's sum is taken in the
 * same order whatever the tile's shape at the edges, so a row's result does not depend on the rows beside it. */
#ifdef GPT2KIT_AVX512
typedef vf tile_sum;
#define TILE_STEP 16
AI tile_sum tile_from(vf acc) { return acc; }
AI vf tile_to(tile_sum a) { return a; }
AI tile_sum tile_loadw(const float *p) { return vf_loada(p); }
AI tile_sum tile_loadx(const float *p) { return vf_load(p); }
AI tile_sum tile_fma(tile_sum x, tile_sum w, tile_sum a) { return vf_fmadd(x, w, a); }
#else
typedef __m256 tile_sum;
#define TILE_STEP 8
AI tile_sum tile_from(vf acc) { return _mm256_add_ps(acc.a, acc.b); }
AI vf tile_to(tile_sum a) { return vf_pair(a, _mm256_setzero_ps()); }
AI tile_sum tile_loadw(const float *p) { return _mm256_load_ps(p); }
AI tile_sum tile_loadx(const float *p) { return _mm256_loadu_ps(p); }
AI tile_sum tile_fma(tile_sum x, tile_sum w, tile_sum a) { return _mm256_fmadd_ps(x, w, a); }
#endif
static inline __attribute__((always_inline)) void dot_tile(const float *xs, int64_t ldx, const float *wt, int64_t ldw,
                                                           int64_t L, vf *acc, const int MM, const int RR) {
    tile_sum a[TILE_M][TILE_N];
    for (int m = 0; m < MM; m++)
        for (int r = 0; r < RR; r++) a[m][r] = tile_from(acc[m * TILE_N + r]);
    for (int64_t k = 0; k < L; k += TILE_STEP) {
        tile_sum wv[TILE_N];
        for (int r = 0; r < RR; r++) wv[r] = tile_loadw(wt + r * ldw + k);
        for (int m = 0; m < MM; m++) {
            const tile_sum xv = tile_loadx(xs + m * ldx + k);
            for (int r = 0; r < RR; r++) a[m][r] = tile_fma(xv, wv[r], a[m][r]);
        }
    }
    for (int m = 0; m < MM; m++)
        for (int r = 0; r < RR; r++) acc[m * TILE_N + r] = tile_to(a[m][r]);
}

/* dot_tile at run-time MM <= TILE_M, RR <= TILE_N (the edges of M and N) */
static void dot_tile_any(const float *xs, int64_t ldx, const float *wt, int64_t ldw, int64_t L, vf *acc, int64_t MM,
                         int64_t RR) {
#define DT(a, b) case (a) * 8 + (b): if ((a) <= TILE_M && (b) <= TILE_N) dot_tile(xs, ldx, wt, ldw, L, acc, a, b); break;
#define DT6(a) DT(a, 1) DT(a, 2) DT(a, 3) DT(a, 4) DT(a, 5) DT(a, 6)
    switch (MM * 8 + RR) {
        DT6(1) DT6(2) DT6(3) DT6(4) DT6(5) DT6(6)
    }
#undef DT6
#undef DT
}

/* codes [j0, j1) of output row n (j0, j1 multiples of 16) decoded: their high nibbles (even inputs) to even, low
 * nibbles (odd inputs) to odd */
static inline void lut4_decode_span(const uint8_t *row, int64_t j0, int64_t j1, const vf table0, const float *scale,
                                    const float *zero, int64_t bs, int64_t g0, float *even, float *odd) {
    const int64_t bb = bs / 2;  /* codes a block */
    for (int64_t j = j0, b = j0 / bb; j < j1; b++) {  /* one division a span: a 64-bit one a block cost more than
                                                       * the block's lookups */
        const int64_t end = (b + 1) * bb < j1 ? (b + 1) * bb : j1;
        const vf table = zero ? vf_fmadd(table0, vf_set1(scale[g0 + b]), vf_set1(zero[g0 + b]))
                              : vf_mul(table0, vf_set1(scale[g0 + b]));
        for (; j < end; j += 16) {
            const vi bytes = vi_u8(row + j);
            vf_storea(even + j - j0, vf_lut16(vi_srl4(bytes), table));
            vf_storea(odd + j - j0, vf_lut16(bytes, table));
        }
    }
}

/* What a tiled product decodes: 4-bit codes (x deinterleaved: a chunk is two spans of x, the even and the odd inputs)
 * or int8 values (a chunk is one span; each output row's sum is scaled by row_scale afterwards, as int8_row does) */
typedef struct {
    const uint8_t *codes;  /* 4-bit: rows of K / 2 bytes, with table0, scale, zero, bs as gpt2kit_lut4_mm takes them */
    vf table0;
    const float *scale, *zero;
    int64_t bs;
    const int8_t *int8;    /* int8: rows of K values */
    const float *row_scale;
} tiled_source;

/* chunk c of output row n (its inputs' positions [j0, j1) in the spans) decoded into dst (4-bit: even inputs at dst,
 * odd at dst + CHUNK_BYTES; int8: at dst) */
static inline void tiled_decode(const tiled_source *src, int64_t K, int64_t n, int64_t j0, int64_t j1, float *dst) {
    if (src->codes) {
        lut4_decode_span(src->codes + n * (K / 2), j0, j1, src->table0, src->scale, src->zero, src->bs,
                         n * (K / src->bs), dst, dst + CHUNK_BYTES);
        return;
    }
    const int8_t *row = src->int8 + n * K;
    for (int64_t k = j0; k < j1; k += 16) vf_storea(dst + k - j0, vf_i8(row + k));
}

static void tiled_product(const tiled_source *src, const float *x, int64_t ldx, int64_t M, int64_t K, int64_t N,
                          const float *bias, float *y, int64_t ldy) {
    const int four = src->codes != NULL;
    const int64_t groups = (N + TILE_N - 1) / TILE_N;
    const int64_t span = four ? K / 2 : K, step = four ? CHUNK_BYTES : INT8_CHUNK;  /* positions a chunk */
    const int64_t row_bytes = four ? K / 2 : K;
    const uint8_t *base = four ? src->codes : (const uint8_t *)src->int8;
    #pragma omp parallel
    {
        float *wt = alloc_rows(2 * TILE_N, CHUNK_BYTES);  /* row r: 2 * CHUNK_BYTES floats from 2r * CHUNK_BYTES */
        vf *acc = (vf *)aligned_alloc(64, ((size_t)(M * TILE_N) * sizeof(vf) + 63) / 64 * 64);
        #pragma omp for schedule(dynamic, 2)
        for (int64_t gi = 0; gi < groups; gi++) {
            const int64_t n = gi * TILE_N, R = N - n < TILE_N ? N - n : TILE_N;
            for (int64_t i = 0; i < M * TILE_N; i++) acc[i] = vf_zero();
            for (int64_t j0 = 0; j0 < span; j0 += step) {
                const int64_t j1 = j0 + step < span ? j0 + step : span, L = j1 - j0;
                for (int64_t r = 0; r < R; r++)  /* the rows' next chunk, in flight while this one is multiplied */
                    for (int64_t l = 0; l < step; l += 64)  /* step: a chunk's bytes (4-bit: positions a byte) */
                        _mm_prefetch((const char *)(base + (n + r) * row_bytes + j0 + step + l), _MM_HINT_T0);
                for (int64_t r = 0; r < R; r++) tiled_decode(src, K, n + r, j0, j1, wt + 2 * r * CHUNK_BYTES);
                for (int64_t m0 = 0; m0 < M; m0 += TILE_M) {
                    const int64_t MM = M - m0 < TILE_M ? M - m0 : TILE_M;
                    vf *a = acc + m0 * TILE_N;
                    for (int part = 0; part < (four ? 2 : 1); part++) {  /* 4-bit: the even inputs, then the odd */
                        const float *xm = x + m0 * ldx + (part ? K / 2 : 0) + j0, *wp = wt + part * CHUNK_BYTES;
                        if (MM == TILE_M && R == TILE_N) dot_tile(xm, ldx, wp, 2 * CHUNK_BYTES, L, a, TILE_M, TILE_N);
                        else dot_tile_any(xm, ldx, wp, 2 * CHUNK_BYTES, L, a, MM, R);
                    }
                }
            }
            for (int64_t m = 0; m < M; m++)
                for (int64_t r = 0; r < R; r++) {
                    const float sum = vf_sum(acc[m * TILE_N + r]);
                    y[m * ldy + n + r] = (src->row_scale ? sum * src->row_scale[n + r] : sum) + (bias ? bias[n + r] : 0.0f);
                }
        }
        free(acc);
        free(wt);
    }
}

#include "amx.h"
/* the fewest rows the AMX kernels take, by measurement against the tiled ones (2 Xeon threads, GPT-2 XL's and small's
 * four block products through the quantized modules, best of 7 calls, 3-7 runs alternating AMX on and off): int8
 * XL 0.95-1.13x at 8 rows, 1.34-1.82x at 16, 1.66-2.07x at 32, 1.96-2.38x at 128; small 0.58-0.75x at 8, 0.83-1.08x
 * at 16, 1.42-1.77x at 32, 1.48-2.22x at 128; 4-bit XL 0.92-1.50x at 16, 1.33-1.95x at 32, 1.22-1.88x at 48; small
 * 0.80-1.40x at 16, 1.11-1.72x at 32. 4-bit in fewer parts (a lower compute dtype; C harness, 2 threads, best of 10,
 * XL's and small's four shapes): one part 1.16-2.18x the tiled kernel at 8 rows, 1.35-2.86x at 12, 2.03-3.24x at 16
 * (XL); two parts 0.80-1.40x at 8, 0.82-2.65x at 12, 1.28-1.84x at 16 (XL) */
#define AMX_MIN_M_INT8 16
#ifdef GPT2KIT_AMX
static const int64_t AMX_MIN_M_LUT4[4] = {0, 8, 16, 32};  /* by parts */
#endif

/* Where the AMX kernels run (built for AMX-BF16, Linux granted the tile state, GPT2KIT_AMX is not 0): the fewest rows
 * they take, int8's (int8 != 0) or NF4 / FP4's in `parts` bf16 parts (1-3); else 0 */
int gpt2kit_amx_min_rows(int64_t int8, int64_t parts) {
#ifdef GPT2KIT_AMX
    if (!amx_permitted() || (!int8 && (parts < 1 || parts > 3))) return 0;
    return int8 ? AMX_MIN_M_INT8 : AMX_MIN_M_LUT4[parts];
#else
    (void)int8, (void)parts;
    return 0;
#endif
}

#ifdef GPT2KIT_AMX
/* amx_product on x layer-normed first where ln_w is given; 0 when it ran */
static int amx_run(const float *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *codes, const float *code,
                   const float *scale, int64_t bs, int parts, const int8_t *int8, const float *row_scale, int64_t N,
                   const float *bias, float *y, int64_t ldy, const float *ln_w, const float *ln_b, float eps) {
    float *normed = NULL;
    if (ln_w) {
        normed = alloc_rows(M, K);
        layer_norm_rows(x, M, K, ldx, ln_w, ln_b, eps, normed);
        x = normed, ldx = K;
    }
    const int rc = amx_product(x, M, K, ldx, codes, code, scale, bs, parts, int8, row_scale, N, bias, y, ldy);
    free(normed);
    return rc;
}
#endif

/* ln_w, ln_b, eps: the layer norm applied to x first (ln_w NULL: none); act, residual: the epilogue's. parts: the
 * precision NF4 / FP4's AMX kernel computes in, 3 (float32's), 2 (~2^-16: for float16) or 1 (bf16's); the other
 * kernels compute in float32 whatever it says. Returns which kernel ran: 1 or 2 an integer int4 one (AVX512-VNNI's,
 * AVX2's), 3 the packed NF4 / FP4 one-row kernel, 4 the tiled one (TILED_MIN_M rows and more), 5 the AMX one
 * (AMX_MIN_M_LUT4[parts] rows and more, NF4 / FP4; any number past TILED_MAX_M in fewer than 3 parts, where it beats
 * decoding to float32 and BLAS), 0 the row-at-a-time float one; -1 for arguments it refuses. */
int gpt2kit_lut4_mm(const float *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *w, int64_t N,
                    const float *code, const float *scale, const float *zero, int64_t bs, int64_t parts,
                    const float *bias, float *y, int64_t ldy, int64_t act, const float *residual, const float *ln_w,
                    const float *ln_b, float eps) {
    if (M < 1 || K % bs || bs % 32 || N < 1 || parts < 1 || parts > 3) return -1;
#ifdef GPT2KIT_AMX
    if (M > TILED_MAX_M && parts < 3 && !zero && gpt2kit_amx_min_rows(0, parts))
        BY_SLABS(M, gpt2kit_lut4_mm(x + m0 * ldx, rows, K, ldx, w, N, code, scale, zero, bs, parts, bias, y + m0 * ldy,
                                    ldy, act, residual ? residual + m0 * ldy : NULL, ln_w, ln_b, eps));
#endif
    if (M > TILED_MAX_M) return -1;
#ifdef INT4_INTEGER
    if (M == 1 && zero && (bs & (bs - 1)) == 0 && vnni_allowed()) {  /* affine int4 (integer codes), bs a power of 2 */
        float *normed = NULL;
        if (ln_w) {
            normed = alloc_rows(1, K);
            layer_norm_rows(x, 1, K, ldx, ln_w, ln_b, eps, normed);
        }
        const int rc = int4_integer_m1(normed ? normed : x, K, w, N, scale, zero, bs, bias, y);
        free(normed);
        if (rc == 0) {
            epilogue(y, M, N, ldy, act, residual);
            return INT4_INTEGER;
        }
    }
#endif
#ifdef GPT2KIT_AVX512
    if (M == 1 && !zero && (bs & (bs - 1)) == 0) {  /* NF4 / FP4 */
        float *x8 = pack_x(x, K, ln_w, ln_b, eps);
        lut4_packed_m1(x8, K, w, N, code, scale, bs, bias, y);
        free(x8);
        epilogue(y, M, N, ldy, act, residual);
        return 3;
    }
#endif
#ifdef GPT2KIT_AMX
    if (M >= AMX_MIN_M_LUT4[parts] && !zero
        && amx_run(x, M, K, ldx, w, code, scale, bs, (int)parts, NULL, NULL, N, bias, y, ldy, ln_w, ln_b, eps) == 0) {
        epilogue(y, M, N, ldy, act, residual);
        return 5;
    }
#endif
    float *xs = deinterleave(x, M, K, ldx, ln_w, ln_b, eps);
    const vf table0 = vf_load(code);
    const int64_t blocks = K / bs, half = K / 2;
    if (M == 1) {
        const int64_t N4 = N / 4 * 4;
        #pragma omp parallel for schedule(guided, 4)
        for (int64_t n = 0; n < N4; n += 4) lut4_rows4_m1(xs, K, w, table0, scale, zero, bs, bias, n, y);
        for (int64_t n = N4; n < N; n++)
            lut4_row(xs, K, w + n * half, table0, scale, zero, n * blocks, bs, bias ? bias[n] : 0.0f, y + n, ldy, 1);
        free(xs);
        epilogue(y, M, N, ldy, act, residual);
        return 0;
    }
    if (M >= TILED_MIN_M) {
        const tiled_source src = {.codes = w, .table0 = table0, .scale = scale, .zero = zero, .bs = bs};
        tiled_product(&src, xs, K, M, K, N, bias, y, ldy);
        free(xs);
        epilogue(y, M, N, ldy, act, residual);
        return 4;
    }
    #pragma omp parallel for schedule(dynamic, 16)
    for (int64_t n = 0; n < N; n++) {
        const float b0 = bias ? bias[n] : 0.0f;
        const uint8_t *row = w + n * half;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {  /* input rows 4 at a time: registers for 8 accumulators */
            const float *xm = xs + m0 * K;
            float *ym = y + m0 * ldy + n;
            switch (M - m0 >= 4 ? 4 : M - m0) {
                case 1: lut4_row(xm, K, row, table0, scale, zero, n * blocks, bs, b0, ym, ldy, 1); break;
                case 2: lut4_row(xm, K, row, table0, scale, zero, n * blocks, bs, b0, ym, ldy, 2); break;
                case 3: lut4_row(xm, K, row, table0, scale, zero, n * blocks, bs, b0, ym, ldy, 3); break;
                default: lut4_row(xm, K, row, table0, scale, zero, n * blocks, bs, b0, ym, ldy, 4); break;
            }
        }
    }
    free(xs);
    epilogue(y, M, N, ldy, act, residual);
    return 0;
}

/* W's rows [n0, n1), or with ids the rows ids[0 .. n1 - n0) (an embedding lookup), decoded into out (n1 - n0, K)
 * float32: for larger batches, which then multiply by BLAS */
int gpt2kit_lut4_dequant(const uint8_t *w, int64_t n0, int64_t n1, int64_t K, const float *code, const float *scale,
                         const float *zero, int64_t bs, float *out, const int64_t *ids) {
    if (K % bs || bs % 32) return -1;
    const vf table0 = vf_load(code);
    const int64_t blocks = K / bs, half = K / 2;
    #pragma omp parallel for schedule(dynamic, 16)
    for (int64_t i = n0; i < n1; i++) {
        const int64_t n = ids ? ids[i - n0] : i;
        const uint8_t *row = w + n * half;
        float *dst = out + (i - n0) * K;
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t g = n * blocks + b;
            const vf table = zero ? vf_fmadd(table0, vf_set1(scale[g]), vf_set1(zero[g]))
                                  : vf_mul(table0, vf_set1(scale[g]));
            for (int64_t j = b * bs / 2; j < (b + 1) * bs / 2; j += 16) {
                const vi bytes = vi_u8(row + j);
                const vf hi = vf_lut16(vi_srl4(bytes), table), lo = vf_lut16(bytes, table);
                vf first, second;  /* interleaved back: hi[i] is input 2i, lo[i] input 2i + 1 */
                vf_interleave(hi, lo, &first, &second);
                vf_store(dst + 2 * j, first);
                vf_store(dst + 2 * j + 16, second);
            }
        }
    }
    return 0;
}

static inline __attribute__((always_inline)) void int8_row(const float *x, int64_t ldx, int64_t K, const int8_t *row,
                                                           float s, float b0, float *y, int64_t ldy, const int MM) {
    vf acc0[MAX_M], acc1[MAX_M];
    for (int m = 0; m < MM; m++) acc0[m] = acc1[m] = vf_zero();
    for (int64_t k = 0; k < K; k += 32) {  /* K % 32 == 0 */
        const vf w0 = vf_i8(row + k), w1 = vf_i8(row + k + 16);
        for (int m = 0; m < MM; m++) {
            acc0[m] = vf_fmadd(w0, vf_load(x + m * ldx + k), acc0[m]);
            acc1[m] = vf_fmadd(w1, vf_load(x + m * ldx + k + 16), acc1[m]);
        }
    }
    for (int m = 0; m < MM; m++) y[m * ldy] = vf_sum(vf_add(acc0[m], acc1[m])) * s + b0;
}

/* one input row (decode at batch 1), four output rows at once: four independent FMA chains share each load
 * of x, and each weight goes int8 -> int32 in one vpmovsxbd straight from memory. The two-row-chain kernel
 * above is bound by the FMA latency and its three widening shuffles per 16 weights at one input row
 * (measured 304 us for a 3072 x 768 matrix on one Xeon thread, ~6.5 cycles per 32 weights) */
static inline void int8_rows4_m1(const float *x, int64_t K, const int8_t *w, const float *scale, const float *bias,
                                 int64_t n, float *y) {
    const int8_t *r0 = w + n * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
    vf a0 = vf_zero(), a1 = vf_zero(), a2 = vf_zero(), a3 = vf_zero();
#ifndef LINEAR_PREFETCH
    const int64_t ahead = PREFETCH_GROUPS * 4 * K;  /* the same columns of the rows PREFETCH_GROUPS groups on */
#endif
    for (int64_t k = 0; k < K; k += 16) {  /* K % 32 == 0 */
#ifdef LINEAR_PREFETCH
        _mm_prefetch((const char *)(r0 + 4 * K + 4 * k), _MM_HINT_T0);  /* the next four rows: a line a step */
#else
        if ((k & 63) == 0) {
            _mm_prefetch((const char *)(r0 + ahead + k), _MM_HINT_T0);
            _mm_prefetch((const char *)(r1 + ahead + k), _MM_HINT_T0);
            _mm_prefetch((const char *)(r2 + ahead + k), _MM_HINT_T0);
            _mm_prefetch((const char *)(r3 + ahead + k), _MM_HINT_T0);
        }
#endif
        const vf xv = vf_load(x + k);
        a0 = vf_fmadd(vf_i8(r0 + k), xv, a0);
        a1 = vf_fmadd(vf_i8(r1 + k), xv, a1);
        a2 = vf_fmadd(vf_i8(r2 + k), xv, a2);
        a3 = vf_fmadd(vf_i8(r3 + k), xv, a3);
    }
    y[n] = vf_sum(a0) * scale[n] + (bias ? bias[n] : 0.0f);
    y[n + 1] = vf_sum(a1) * scale[n + 1] + (bias ? bias[n + 1] : 0.0f);
    y[n + 2] = vf_sum(a2) * scale[n + 2] + (bias ? bias[n + 2] : 0.0f);
    y[n + 3] = vf_sum(a3) * scale[n + 3] + (bias ? bias[n + 3] : 0.0f);
}

/* ln_w, ln_b, eps: the layer norm applied to x first (ln_w NULL: none); act, residual: the epilogue's. Returns 1 where
 * the tiled kernel ran (TILED_MIN_M rows and more), 2 the AMX one (AMX_MIN_M_INT8 rows and more, and any number past
 * TILED_MAX_M), 0 the row kernels, -1 for arguments it refuses. */
int gpt2kit_int8_mm(const float *x, int64_t M, int64_t K, int64_t ldx, const int8_t *w, int64_t N,
                    const float *scale, const float *bias, float *y, int64_t ldy, int64_t act, const float *residual,
                    const float *ln_w, const float *ln_b, float eps) {
    if (M < 1 || K % 32 || N < 1) return -1;
#ifdef GPT2KIT_AMX
    if (M > TILED_MAX_M && gpt2kit_amx_min_rows(1, 3))  /* AMX, or where it refuses the shape the tiled kernel */
        BY_SLABS(M, gpt2kit_int8_mm(x + m0 * ldx, rows, K, ldx, w, N, scale, bias, y + m0 * ldy, ldy, act,
                                    residual ? residual + m0 * ldy : NULL, ln_w, ln_b, eps));
#endif
    if (M > TILED_MAX_M) return -1;
    float *normed = NULL;
    if (ln_w) {
        normed = alloc_rows(M, K);
        layer_norm_rows(x, M, K, ldx, ln_w, ln_b, eps, normed);
        x = normed, ldx = K;
    }
    if (M == 1) {
        const int64_t N4 = N / 4 * 4;
        #pragma omp parallel for schedule(guided, 4)
        for (int64_t n = 0; n < N4; n += 4) int8_rows4_m1(x, K, w, scale, bias, n, y);
        for (int64_t n = N4; n < N; n++) int8_row(x, ldx, K, w + n * K, scale[n], bias ? bias[n] : 0.0f, y + n, ldy, 1);
        free(normed);
        epilogue(y, M, N, ldy, act, residual);
        return 0;
    }
#ifdef GPT2KIT_AMX
    if (M >= AMX_MIN_M_INT8 && amx_product(x, M, K, ldx, NULL, NULL, NULL, 0, 3, w, scale, N, bias, y, ldy) == 0) {
        free(normed);
        epilogue(y, M, N, ldy, act, residual);
        return 2;
    }
#endif
    if (M >= TILED_MIN_M) {
        const tiled_source src = {.int8 = w, .row_scale = scale};
        tiled_product(&src, x, ldx, M, K, N, bias, y, ldy);
        free(normed);
        epilogue(y, M, N, ldy, act, residual);
        return 1;
    }
    #pragma omp parallel for schedule(dynamic, 16)
    for (int64_t n = 0; n < N; n++) {
        const float s = scale[n], b0 = bias ? bias[n] : 0.0f;
        const int8_t *row = w + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const float *xm = x + m0 * ldx;
            float *ym = y + m0 * ldy + n;
            switch (M - m0 >= 4 ? 4 : M - m0) {
                case 1: int8_row(xm, ldx, K, row, s, b0, ym, ldy, 1); break;
                case 2: int8_row(xm, ldx, K, row, s, b0, ym, ldy, 2); break;
                case 3: int8_row(xm, ldx, K, row, s, b0, ym, ldy, 3); break;
                default: int8_row(xm, ldx, K, row, s, b0, ym, ldy, 4); break;
            }
        }
    }
    free(normed);
    epilogue(y, M, N, ldy, act, residual);
    return 0;
}
