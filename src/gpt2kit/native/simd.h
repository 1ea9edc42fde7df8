/* The 16-lane float32 vector gpt2kit's kernels are written in, for the two instruction sets they are built for:
 * AVX-512 (one zmm register: vf is __m512) and AVX2 + FMA (two ymm registers: vf is a pair of __m256), so one
 * source serves both kinds of CPU this project runs on (an AVX-512 Xeon / EPYC, an AVX2-only Zen 3). Which one is
 * chosen by the compiler flags (native/__init__.py: -march=native, or -mno-avx512f for the AVX2 build). Every
 * helper is inline: compiled for AVX-512 they are the single instructions the kernels were first written in.
 *
 * vm is "the first n lanes live" (a masked load reads nothing past them, a masked store writes nothing past them):
 * a __mmask16 on AVX-512, the count n on AVX2 (whose masked moves take a vector mask built from it only in a tail).
 */
#ifndef GPT2KIT_SIMD_H
#define GPT2KIT_SIMD_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define AI static inline __attribute__((always_inline))

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define GPT2KIT_AVX512 1
typedef __m512 vf;
typedef __m512i vi;  /* 16 int32 lanes */
typedef __mmask16 vm;

AI vm vm_first(int64_t n) { return n >= 16 ? (vm)0xffff : (vm)((1u << n) - 1); }
AI vf vf_zero(void) { return _mm512_setzero_ps(); }
AI vf vf_set1(float a) { return _mm512_set1_ps(a); }
AI vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
AI vf vf_loada(const float *p) { return _mm512_load_ps(p); }  /* p 64-byte aligned */
AI void vf_store(float *p, vf v) { _mm512_storeu_ps(p, v); }
AI void vf_storea(float *p, vf v) { _mm512_store_ps(p, v); }
AI vf vf_loadm(const float *p, vm m) { return _mm512_maskz_loadu_ps(m, p); }
AI void vf_storem(float *p, vm m, vf v) { _mm512_mask_storeu_ps(p, m, v); }
AI vf vf_maskz(vm m, vf v) { return _mm512_maskz_mov_ps(m, v); }
AI vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
AI vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
AI vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
AI vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
AI vf vf_fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }    /* a b + c */
AI vf vf_fnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }  /* c - a b */
AI vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }  /* b where either is NaN */
AI vf vf_min(vf a, vf b) { return _mm512_min_ps(a, b); }  /* b where either is NaN */
AI vf vf_round(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
AI float vf_sum(vf a) { return _mm512_reduce_add_ps(a); }
AI float vf_hmax(vf a) { return _mm512_reduce_max_ps(a); }
AI vf vf_abs(vf a) { return _mm512_abs_ps(a); }
AI int vf_nonfinite(vf a) {  /* whether a lane is NaN or infinite: a - a is NaN there */
    return _mm512_cmp_ps_mask(_mm512_sub_ps(a, a), _mm512_setzero_ps(), _CMP_NEQ_UQ) != 0;
}
AI void vf_store_i8(int8_t *p, vf a) {  /* 16 lanes, integral and in [-128, 127], stored as int8 */
    _mm_storeu_si128((__m128i *)p, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(a)));
}
/* a 2^i, i integral in [-126, 127] */
AI vf vf_scale2(vf a, vf i) { return _mm512_scalef_ps(a, i); }

/* 16 bytes -> 16 int32 lanes (zero-extended); 16 int8 -> 16 float32 */
AI vi vi_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
AI vf vf_i8(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
AI vi vi_srl4(vi v) { return _mm512_srli_epi32(v, 4); }
/* table[idx & 15] lane by lane: a 16-entry table in one register, one vpermps (which reads the index's low 4 bits) */
AI vf vf_lut16(vi idx, vf table) { return _mm512_permutexvar_ps(idx, table); }
/* the 32 values a | b -> their even-indexed ones (0, 2, ..., 30) and odd-indexed ones */
AI void vf_even_odd(vf a, vf b, vf *even, vf *odd) {
    const __m512i ei = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i oi = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    *even = _mm512_permutex2var_ps(a, ei, b);
    *odd = _mm512_permutex2var_ps(a, oi, b);
}
/* the inverse: e, o -> e0 o0 e1 o1 ... e7 o7 (first) and e8 o8 ... e15 o15 (second) */
AI void vf_interleave(vf e, vf o, vf *first, vf *second) {
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    *first = _mm512_permutex2var_ps(e, lo, o);
    *second = _mm512_permutex2var_ps(e, hi, o);
}

/* bfloat16 <-> float32: bf16 is the high half of a float32, so widening is exact; rounding is to nearest even, as
 * PyTorch's and oneDNN's conversions (a NaN stays a quiet NaN). */
AI vf vf_bf16_load(const void *p, vm live) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
AI vf vf_bf16_round(vf v) {  /* v rounded to bf16 precision, kept as float32 */
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, b, _mm512_set1_epi32(0x00400000));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xFFFF0000)));
}
AI void vf_bf16_store(void *p, vf v, vm live) {  /* v rounded to bf16 and stored */
    const __m512i hi = _mm512_srli_epi32(_mm512_castps_si512(vf_bf16_round(v)), 16);
    _mm256_mask_storeu_epi16(p, live, _mm512_cvtepi32_epi16(hi));
}

#elif defined(__AVX2__) && defined(__FMA__)
typedef struct { __m256 a, b; } vf;     /* lanes 0-7, 8-15 */
typedef struct { __m256i a, b; } vi;
typedef int64_t vm;  /* live lanes: the first vm (0..16) */

AI vf vf_pair(__m256 a, __m256 b) { vf r = {a, b}; return r; }
AI __m256i mask8(int64_t n) {  /* lanes < n set */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
AI vm vm_first(int64_t n) { return n >= 16 ? 16 : n; }
AI vf vf_zero(void) { return vf_pair(_mm256_setzero_ps(), _mm256_setzero_ps()); }
AI vf vf_set1(float a) { return vf_pair(_mm256_set1_ps(a), _mm256_set1_ps(a)); }
AI vf vf_load(const float *p) { return vf_pair(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)); }
AI vf vf_loada(const float *p) { return vf_pair(_mm256_load_ps(p), _mm256_load_ps(p + 8)); }
AI void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v.a); _mm256_storeu_ps(p + 8, v.b); }
AI void vf_storea(float *p, vf v) { _mm256_store_ps(p, v.a); _mm256_store_ps(p + 8, v.b); }
AI vf vf_loadm(const float *p, vm m) {
    if (m >= 16) return vf_load(p);
    return vf_pair(_mm256_maskload_ps(p, mask8(m)), _mm256_maskload_ps(p + 8, mask8(m - 8)));
}
AI void vf_storem(float *p, vm m, vf v) {
    if (m >= 16) { vf_store(p, v); return; }
    _mm256_maskstore_ps(p, mask8(m), v.a);
    _mm256_maskstore_ps(p + 8, mask8(m - 8), v.b);
}
AI vf vf_maskz(vm m, vf v) {
    if (m >= 16) return v;
    return vf_pair(_mm256_and_ps(v.a, _mm256_castsi256_ps(mask8(m))), _mm256_and_ps(v.b, _mm256_castsi256_ps(mask8(m - 8))));
}
#define VF_BINARY(name, op) AI vf name(vf x, vf y) { return vf_pair(op(x.a, y.a), op(x.b, y.b)); }
VF_BINARY(vf_add, _mm256_add_ps)
VF_BINARY(vf_sub, _mm256_sub_ps)
VF_BINARY(vf_mul, _mm256_mul_ps)
VF_BINARY(vf_div, _mm256_div_ps)
VF_BINARY(vf_max, _mm256_max_ps)
VF_BINARY(vf_min, _mm256_min_ps)
#undef VF_BINARY
AI vf vf_fmadd(vf x, vf y, vf z) { return vf_pair(_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)); }
AI vf vf_fnmadd(vf x, vf y, vf z) { return vf_pair(_mm256_fnmadd_ps(x.a, y.a, z.a), _mm256_fnmadd_ps(x.b, y.b, z.b)); }
AI vf vf_round(vf x) {
    const int r = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    return vf_pair(_mm256_round_ps(x.a, r), _mm256_round_ps(x.b, r));
}
AI float hsum8(__m256 s) {  /* the sum of 8 lanes */
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
AI float vf_sum(vf x) { return hsum8(_mm256_add_ps(x.a, x.b)); }
AI float vf_hmax(vf x) {
    const __m256 s = _mm256_max_ps(x.a, x.b);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
AI vf vf_abs(vf x) {
    const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    return vf_pair(_mm256_and_ps(x.a, m), _mm256_and_ps(x.b, m));
}
AI int vf_nonfinite(vf x) {
    const __m256 z = _mm256_setzero_ps();
    return _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(_mm256_sub_ps(x.a, x.a), z, _CMP_NEQ_UQ),
                                           _mm256_cmp_ps(_mm256_sub_ps(x.b, x.b), z, _CMP_NEQ_UQ))) != 0;
}
AI void vf_store_i8(int8_t *p, vf x) {
    /* packs work within 128-bit halves: a0-3 b0-3 | a4-7 b4-7, put back in order, then to bytes */
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(_mm256_cvtps_epi32(x.a), _mm256_cvtps_epi32(x.b)), 0xD8);
    _mm_storeu_si128((__m128i *)p, _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
}
AI __m256 scale2_8(__m256 a, __m256 i) {  /* a 2^i: 2^i built in the exponent field (i in [-126, 127]: normal) */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(i), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(a, _mm256_castsi256_ps(e));
}
AI vf vf_scale2(vf a, vf i) { return vf_pair(scale2_8(a.a, i.a), scale2_8(a.b, i.b)); }

AI vi vi_u8(const uint8_t *p) {
    vi r = {_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)),
            _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)))};
    return r;
}
AI vf vf_i8(const int8_t *p) {
    return vf_pair(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))),
                   _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)))));
}
AI vi vi_srl4(vi v) { vi r = {_mm256_srli_epi32(v.a, 4), _mm256_srli_epi32(v.b, 4)}; return r; }
/* table[idx & 15]: vpermps looks up entries 0-7 and 8-15 by the index's low 3 bits, bit 3 (moved to the sign
 * bit, which vblendvps reads) picks between them; bits above 3 are ignored, as AVX-512's vpermps ignores them */
AI __m256 lut16_8(__m256i idx, vf table) {
    const __m256 lo = _mm256_permutevar8x32_ps(table.a, idx), hi = _mm256_permutevar8x32_ps(table.b, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
AI vf vf_lut16(vi idx, vf table) { return vf_pair(lut16_8(idx.a, table), lut16_8(idx.b, table)); }
AI __m256 pick8(__m256 x, __m256 y, const int sel) {  /* sel 0x88: the even elements of x | y, 0xDD: the odd */
    const __m256 s = sel == 0x88 ? _mm256_shuffle_ps(x, y, 0x88) : _mm256_shuffle_ps(x, y, 0xDD);
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), 0xD8));  /* 64-bit pairs 0, 2, 1, 3 */
}
AI void vf_even_odd(vf a, vf b, vf *even, vf *odd) {
    *even = vf_pair(pick8(a.a, a.b, 0x88), pick8(b.a, b.b, 0x88));
    *odd = vf_pair(pick8(a.a, a.b, 0xDD), pick8(b.a, b.b, 0xDD));
}
AI void vf_interleave(vf e, vf o, vf *first, vf *second) {
    const __m256 l0 = _mm256_unpacklo_ps(e.a, o.a), h0 = _mm256_unpackhi_ps(e.a, o.a);
    const __m256 l1 = _mm256_unpacklo_ps(e.b, o.b), h1 = _mm256_unpackhi_ps(e.b, o.b);
    *first = vf_pair(_mm256_permute2f128_ps(l0, h0, 0x20), _mm256_permute2f128_ps(l0, h0, 0x31));
    *second = vf_pair(_mm256_permute2f128_ps(l1, h1, 0x20), _mm256_permute2f128_ps(l1, h1, 0x31));
}

AI vf vf_bf16_load(const void *p, vm live) {
    __m256i h;
    if (live >= 16) {
        h = _mm256_loadu_si256((const __m256i *)p);
    } else {  /* a tail: AVX2 has no 16-bit masked load */
        uint16_t t[16] = {0};
        memcpy(t, p, (size_t)live * 2);
        h = _mm256_loadu_si256((const __m256i *)t);
    }
    const __m256i a = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), b = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1));
    return vf_pair(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)));
}
AI __m256 bf16_round8(__m256 v) {
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
    const __m256i quiet = _mm256_or_si256(b, _mm256_set1_epi32(0x00400000));
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    const __m256i k = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(quiet), nan));
    return _mm256_castsi256_ps(_mm256_and_si256(k, _mm256_set1_epi32((int)0xFFFF0000)));
}
AI vf vf_bf16_round(vf v) { return vf_pair(bf16_round8(v.a), bf16_round8(v.b)); }
AI void vf_bf16_store(void *p, vf v, vm live) {
    const vf r = vf_bf16_round(v);
    const __m256i a = _mm256_srli_epi32(_mm256_castps_si256(r.a), 16), b = _mm256_srli_epi32(_mm256_castps_si256(r.b), 16);
    /* packus packs within 128-bit halves: a0-3 b0-3 | a4-7 b4-7, put back in order */
    const __m256i h = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
    if (live >= 16) {
        _mm256_storeu_si256((__m256i *)p, h);
    } else {
        uint16_t t[16];
        _mm256_storeu_si256((__m256i *)t, h);
        memcpy(p, t, (size_t)live * 2);
    }
}
#else
#error "gpt2kit's kernels need AVX-512 (F, BW, VL) or AVX2 with FMA"
#endif

#endif
