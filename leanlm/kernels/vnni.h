/* What the VNNI weight kernels share (int4_vnni.cpp, int8_head.cpp): activations quantised to int8 per group
 * of 32 as llama.cpp's Q8_0 does, and small vector helpers. Included by .cpp files after <immintrin.h>. */
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace vnni {

inline __m512 f16x16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

inline __m512 load16(const float *p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16 *p) {  // bf16 -> fp32: the high half of each float
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// e^x (softmax after subtracting the max, activations): x = n ln2 + r, e^r by its Taylor series to r^7
// (|r| <= ln2 / 2: relative error < 2e-7), times 2^n; below -87 the result is 0 as float underflows anyway,
// above 88 it is inf.
inline __m512 exp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.0f);
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lo);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts: exact n * hi
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    const float c[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    for (float ci : c) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(ci));
    return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(p, n));
}

inline uint64_t load_u64(const uint8_t *p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
}

// Bits 4 .. 3 + H of the codes of vectors i and i + 1, from the H bit planes at `planes` (int4_vnni.cpp's layout).
template <int H>
inline void add_high_bits(const uint8_t *planes, int i, __m512i &q0, __m512i &q1) {
#pragma GCC unroll 4
    for (int p = 0; p < H; p++) {
        const __m512i bit = _mm512_set1_epi8((char)(16 << p));
        q0 = _mm512_mask_add_epi8(q0, _cvtu64_mask64(load_u64(planes + p * 64 + i * 8)), q0, bit);
        q1 = _mm512_mask_add_epi8(q1, _cvtu64_mask64(load_u64(planes + p * 64 + (i + 1) * 8)), q1, bit);
    }
}

// The codes of one group of a tile (int4_vnni.cpp's layout: 4 x 64 bytes of nibbles, then H bit planes) as
// 8 vectors of bytes: vector i holds, in lane l, the codes of output l at inputs 4 i .. 4 i + 3 of the group.
template <int H>
inline void spread_group(const uint8_t *wg, __m512i out[8]) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int h = 0; h < 4; h++) {  // vectors 2h (low nibbles) and 2h + 1 (high nibbles)
        const __m512i v = _mm512_loadu_si512((const void *)(wg + h * 64));
        __m512i q0 = _mm512_and_si512(v, low4), q1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        add_high_bits<H>(wg + 256, 2 * h, q0, q1);
        out[2 * h] = q0, out[2 * h + 1] = q1;
    }
}

inline __m512i bcast4(const int8_t *p) {  // 4 activations to every lane
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

// x (M, K) fp32 or bf16 -> xq (M, K) int8 with dx = max|x| / 127 per group of 32 (M, G), and the sums of xq
// each kernel wants (null pointers: not wanted): sx = dx * sum xq per group (M, G) and per half group
// (M, 2 G; for weights with 16-wide scales), or qs, the integer sums per group.
template <typename T>
void quantize(const T *x, int64_t M, int64_t K, int8_t *xq, float *dx, float *sx, float *sx16, int32_t *qs) {
    const int64_t G = K / 32;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t g = 0; g < G; g++) {
            const T *xr = x + m * K + g * 32;
            __m512 a = load16(xr), b = load16(xr + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            const float d = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
            __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));  // round to nearest
            __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv)));
            const int32_t sa = _mm512_reduce_add_epi32(qa), sb = _mm512_reduce_add_epi32(qb);
            dx[m * G + g] = d;
            if (sx != nullptr) sx[m * G + g] = d * (float)(sa + sb);
            if (sx16 != nullptr) sx16[m * 2 * G + 2 * g] = d * (float)sa, sx16[m * 2 * G + 2 * g + 1] = d * (float)sb;
            if (qs != nullptr) qs[m * G + g] = sa + sb;
            _mm_storeu_si128((__m128i *)(xq + m * K + g * 32), _mm512_cvtsepi32_epi8(qa));
            _mm_storeu_si128((__m128i *)(xq + m * K + g * 32 + 16), _mm512_cvtsepi32_epi8(qb));
        }
    }
}

// quantize() on the thread pool for many rows (a batch of 32 sequences, a prompt), in pieces of 16 rows or more
template <typename T>
void quantize_rows(const T *x, int64_t M, int64_t K, int8_t *xq, float *dx, float *sx, float *sx16, int32_t *qs) {
    const int64_t G = K / 32;
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
        quantize(x + m0 * K, m1 - m0, K, xq + m0 * K, dx + m0 * G, sx ? sx + m0 * G : nullptr,
                 sx16 ? sx16 + m0 * 2 * G : nullptr, qs ? qs + m0 * G : nullptr);
    });
}

// The quantised x of a call, in buffers kept per thread between calls (no allocation per call).
struct Quantized {
    const int8_t *xq;
    const float *dx, *sx;  // sx: per group, or per half group where the weights' scales are 16 wide
    const int32_t *qs;
};

enum class Sums { per_group, per_half_group, integer };

inline Quantized quantize_input(const at::Tensor &x, Sums sums) {
    const int64_t M = x.size(0), K = x.size(1), G = K / 32;
    thread_local std::vector<int8_t> xq;
    thread_local std::vector<float> dx, sx;
    thread_local std::vector<int32_t> qs;
    xq.resize(M * K), dx.resize(M * G), sx.resize(2 * M * G), qs.resize(M * G);
    float *sx32 = sums == Sums::per_group ? sx.data() : nullptr, *sx16 = sums == Sums::per_half_group ? sx.data() : nullptr;
    int32_t *qsp = sums == Sums::integer ? qs.data() : nullptr;
    if (x.scalar_type() == at::kBFloat16 && x.is_contiguous()) {
        quantize_rows(x.const_data_ptr<at::BFloat16>(), M, K, xq.data(), dx.data(), sx32, sx16, qsp);
    } else {
        at::Tensor xf = x.to(at::kFloat).contiguous();
        quantize_rows(xf.const_data_ptr<float>(), M, K, xq.data(), dx.data(), sx32, sx16, qsp);
    }
    return {xq.data(), dx.data(), sx.data(), qs.data()};  // pointers: a worker's thread_local is its own copy
}

}  // namespace vnni
