/* Row operations of the decode step (decode.cpp): model.py's small ops on one row of bf16 values, each
 * rounded to bf16 where eager PyTorch rounds, with fp32 inside. Included after <immintrin.h>. */
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

#include "vnni.h"

namespace rows {

using bf16 = at::BFloat16;

inline float rb(float v) { return (float)bf16(v); }  // round to bf16 (nearest even), as a float

// y = x / sqrt(mean(x^2) + eps) * w, in fp32, rounded to bf16 (model.py's RMSNorm). The sum of squares runs in
// 16 lanes (a scalar loop was ~1.5 us a 640-wide row: 5% of a Gemma prompt, ~0.2 ms of a decode step).
inline void rms_norm(const bf16 *x, const float *w, float eps, int64_t n, bf16 *y) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = vnni::load16(x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    float ss = _mm512_reduce_add_ps(acc);
    for (; i < n; i++) ss += (float)x[i] * (float)x[i];
    const float r = 1.0f / std::sqrt(ss / (float)n + eps);
    const __m512 rv = _mm512_set1_ps(r);
    for (i = 0; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_mul_ps(vnni::load16(x + i), rv), _mm512_loadu_ps(w + i));
        _mm256_storeu_si256((__m256i *)(y + i), (__m256i)_mm512_cvtneps_pbh(v));
    }
    for (; i < n; i++) y[i] = bf16((float)x[i] * r * w[i]);
}

// Rotate the first rd dims of one head (in place), cos/sin (rd / 2) already bf16 values: model.py's apply_rope
// on bf16 tensors, each product and sum rounded. Pairs (x0, x1), (x2, x3)... if interleaved, else (x_i, x_i+rd/2).
inline void rope(bf16 *x, const float *c, const float *s, int64_t rd, bool interleaved) {
    int64_t i = 0;
    if (!interleaved) {  // 16 pairs at a time, the same roundings
        const auto rb16 = [](__m512 v) {  // to bf16 (nearest even) and back
            return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
        };
        for (; i + 16 <= rd / 2; i += 16) {
            const __m512 x1 = vnni::load16(x + i), x2 = vnni::load16(x + i + rd / 2);
            const __m512 cv = _mm512_loadu_ps(c + i), sv = _mm512_loadu_ps(s + i);
            const __m512 a = _mm512_sub_ps(rb16(_mm512_mul_ps(x1, cv)), rb16(_mm512_mul_ps(x2, sv)));
            const __m512 b = _mm512_add_ps(rb16(_mm512_mul_ps(x2, cv)), rb16(_mm512_mul_ps(x1, sv)));
            _mm256_storeu_si256((__m256i *)(x + i), (__m256i)_mm512_cvtneps_pbh(a));
            _mm256_storeu_si256((__m256i *)(x + i + rd / 2), (__m256i)_mm512_cvtneps_pbh(b));
        }
    }
    for (; i < rd / 2; i++) {
        bf16 &a = interleaved ? x[2 * i] : x[i], &b = interleaved ? x[2 * i + 1] : x[i + rd / 2];
        const float x1 = a, x2 = b;
        a = bf16(rb(x1 * c[i]) - rb(x2 * s[i]));
        b = bf16(rb(x2 * c[i]) + rb(x1 * s[i]));
    }
}

// 0: silu, 1: gelu (tanh approximation) in fp32, the latter as g * sigmoid(2 y) = 0.5 g (1 + tanh(y)), which
// has no cancellation where tanh(y) is close to -1 (large negative g)
inline float act(float g, int64_t kind) {
    const float z = kind == 0 ? g : 2.0f * 0.7978845608028654f * (g + 0.044715f * g * g * g);
    return g / (1.0f + std::exp(-z));
}

inline __m512 act16(__m512 g, int64_t kind) {  // act on 16 lanes
    __m512 z = g;
    if (kind != 0) {
        const __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
        z = _mm512_mul_ps(_mm512_set1_ps(2.0f * 0.7978845608028654f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), g3, g));
    }
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(g, _mm512_add_ps(one, vnni::exp16(_mm512_sub_ps(_mm512_setzero_ps(), z))));
}

inline __m512 round16(__m512 v) {  // to bf16 and back, nearest even
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// h = bf16(bf16(act(g)) * u) over one row of n: F.silu / F.gelu then the product, each rounded as eager's
inline void gated(const bf16 *g, const bf16 *u, bf16 *h, int64_t n, int64_t kind) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        const __m512 a = round16(act16(vnni::load16(g + j), kind));
        _mm256_storeu_si256((__m256i *)(h + j), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(a, vnni::load16(u + j))));
    }
    for (; j < n; j++) h[j] = bf16(rb(act((float)g[j], kind)) * (float)u[j]);
}

}  // namespace rows
