/* Vector math shared by gpt2kit's kernels (AVX-512). */
#ifndef GPT2KIT_VECMATH_H
#define GPT2KIT_VECMATH_H
#include <immintrin.h>

/* exp(x): 2^(x log2 e) = 2^i 2^f with i = round(x log2 e), |f| <= 1/2, e^(f ln 2) by its Taylor series to
 * degree 6 (relative error < 3e-7 on that range), 2^i applied by vscalefps (inf past ~88.7, 0 below -87) */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);  /* vmaxps returns its second operand for a NaN: kept */
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 i = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, i), _mm512_set1_ps(0.69314718055994531f));
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, i);
}

/* GELU, tanh form (OpenAI's gelu_new, PyTorch's approximate='tanh'): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715
 * x^3))), tanh(u) = 1 - 2 / (e^(2u) + 1) (saturating to +-1 where e^(2u) overflows or vanishes) */
static inline __m512 gelu_tanh512(__m512 x) {
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                   _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x));
    const __m512 e = exp512(_mm512_add_ps(u, u));
    const __m512 th = _mm512_sub_ps(_mm512_set1_ps(1.0f), _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.0f), th));
}

/* bfloat16 <-> float32: bf16 is the high half of a float32, so widening is exact; rounding is to nearest even, as
 * PyTorch's and oneDNN's conversions (a NaN stays a quiet NaN). 16 values, `live` lanes. */
static inline __m512 bf16_load512(const void *p, __mmask16 live) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

static inline __m512 bf16_round512(__m512 v) {  /* v rounded to bf16 precision, kept as float32 */
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, b, _mm512_set1_epi32(0x00400000));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xFFFF0000)));
}

static inline void bf16_store512(void *p, __m512 v, __mmask16 live) {  /* v rounded to bf16 and stored */
    const __m512i hi = _mm512_srli_epi32(_mm512_castps_si512(bf16_round512(v)), 16);
    _mm256_mask_storeu_epi16(p, live, _mm512_cvtepi32_epi16(hi));
}
#endif
