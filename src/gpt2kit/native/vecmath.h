/* Vector math shared by gpt2kit's kernels, over simd.h's 16-lane vector (AVX-512 or AVX2). */
#ifndef GPT2KIT_VECMATH_H
#define GPT2KIT_VECMATH_H
#include "simd.h"

/* exp(x): 2^(x log2 e) = 2^i 2^f with i = round(x log2 e), |f| <= 1/2, e^(f ln 2) by its Taylor series to
 * degree 6 (relative error < 3e-7 on that range), 2^i applied exactly. x is clamped to [-87, 88] first (0 and inf
 * are then ~1.6e-38 and ~1.7e38: the GELU's tanh and a softmax, all that call this, cannot tell); vmaxps / vminps
 * return their second operand for a NaN, so a NaN stays one. */
AI vf vf_exp(vf x) {
    x = vf_min(vf_set1(88.0f), vf_max(vf_set1(-87.0f), x));
    const vf t = vf_mul(x, vf_set1(1.44269504088896341f));
    const vf i = vf_round(t);
    const vf f = vf_mul(vf_sub(t, i), vf_set1(0.69314718055994531f));
    vf p = vf_set1(1.0f / 720);
    p = vf_fmadd(p, f, vf_set1(1.0f / 120));
    p = vf_fmadd(p, f, vf_set1(1.0f / 24));
    p = vf_fmadd(p, f, vf_set1(1.0f / 6));
    p = vf_fmadd(p, f, vf_set1(0.5f));
    p = vf_fmadd(p, f, vf_set1(1.0f));
    p = vf_fmadd(p, f, vf_set1(1.0f));
    return vf_scale2(p, i);
}

/* GELU, tanh form (OpenAI's gelu_new, PyTorch's approximate='tanh'): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715
 * x^3))), tanh(u) = 1 - 2 / (e^(2u) + 1) (saturating to +-1 where e^(2u) overflows or vanishes) */
AI vf vf_gelu_tanh(vf x) {
    const vf u = vf_mul(vf_set1(0.7978845608028654f), vf_fmadd(vf_mul(vf_set1(0.044715f), x), vf_mul(x, x), x));
    const vf e = vf_exp(vf_add(u, u));
    const vf th = vf_sub(vf_set1(1.0f), vf_div(vf_set1(2.0f), vf_add(e, vf_set1(1.0f))));
    return vf_mul(vf_mul(vf_set1(0.5f), x), vf_add(vf_set1(1.0f), th));
}
#endif
