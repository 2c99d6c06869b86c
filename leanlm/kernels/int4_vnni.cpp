/* 4-bit weights times int8-quantised activations on AVX-512 VNNI, as torch operators (leanlm_native::*).
 *
 * Torch operators in C++ (not ctypes): a compiled decode step calls them straight from its C++ wrapper,
 * some 120 times per token, where a Python custom op would cost tens of microseconds a call.
 *
 * Weights (`Int4Linear`'s "vnni" layout, packed by quant/int4.py `vnni_pack`): codes q in 0..15 and, per
 * group of 32 along K, an fp16 scale s and an fp16 minimum b: w = q * s + b (fp16 holds GGUF's own fp16
 * block scales exactly). Activations: each row of x is quantised per group of 32 to int8, xq, with its
 * own scale dx = max|x| / 127 (llama.cpp's Q8_0 for its dot products). Per row m, output n and group g:
 *     sum_k x w  ~  s * dx * sum_k q xq  +  b * dx * sum_k xq
 * which is exactly x' W^T for x' = dx * xq (with the exact sum of x in the second term the error would be
 * s * sum q (x' - x), codes 0..15 not cancelling: twice as large).
 *
 * `vpdpbusd` multiplies 64 unsigned codes by 64 signed xq and adds each 4 adjacent products into one of 16
 * 32-bit lanes. Blocks of 16 groups are interleaved so that lane l always belongs to group l: vector i
 * (i = 0..7) of a block holds, in lane l, positions 4i..4i+3 of group l. Eight dpbusd then leave each
 * group's whole sum in its own lane, and one multiply by the 16 groups' s * dx finishes the block.
 * Worked example: code (group 5, position 13) of a block is in vector 3 (13 / 4), lane 5, byte 1 (13 % 4),
 * i.e. byte 4 * 5 + 1 = 21 of vector 3. xq is interleaved the same way when it is quantised.
 * Packing: vectors 2t and 2t + 1 share 64 bytes, 2t in the low nibbles, so a block is 256 bytes.
 * Groups after the last whole block (K = 576: groups 16, 17) are in chunks of two groups in natural order,
 * 32 bytes: byte j holds code j in its low nibble and code 32 + j in its high nibble; a permute then
 * spreads the two groups' scales over lanes 0-7 and 8-15.
 */
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

namespace {

inline __m512 f16x16(const uint16_t *p, __mmask16 m) {  // 16 fp16 (masked) -> fp32
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

inline __m512 load16(const float *p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16 *p) {  // bf16 -> fp32: the high half of each float
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// x (M, K) fp32 or bf16 -> xq (M, K) int8 in the interleaved order (see top), dx and sx = dx * sum xq (M, Gp)
// per group, Gp = groups rounded up to 16 (zero padded).
template <typename T>
void quantize(const T *x, int64_t M, int64_t K, int64_t Gp, int8_t *xq, float *dx, float *sx) {
    const int64_t G = K / 32, full = G / 16 * 16;
    thread_local std::vector<int8_t> nat;
    nat.resize(K);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t g = 0; g < Gp; g++) {
            float *d = dx + m * Gp + g, *s = sx + m * Gp + g;
            if (g >= G) {
                *d = *s = 0.0f;
                continue;
            }
            const T *xr = x + m * K + g * 32;
            __m512 a = load16(xr), b = load16(xr + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            *d = amax / 127.0f;
            const float inv = amax > 0 ? 127.0f / amax : 0.0f;
            __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));  // round to nearest
            __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv)));
            *s = *d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
            _mm_storeu_si128((__m128i *)(nat.data() + g * 32), _mm512_cvtsepi32_epi8(qa));
            _mm_storeu_si128((__m128i *)(nat.data() + g * 32 + 16), _mm512_cvtsepi32_epi8(qb));
        }
        int8_t *out = xq + m * K;
        for (int64_t gb = 0; gb < full; gb += 16)  // 4-byte words: word (l, i) of the block -> (i, l)
            for (int i = 0; i < 8; i++)
                for (int l = 0; l < 16; l++)
                    std::memcpy(out + gb * 32 + (i * 16 + l) * 4, nat.data() + (gb + l) * 32 + i * 4, 4);
        std::memcpy(out + full * 32, nat.data() + full * 32, (size_t)(K - full * 32));
    }
}

// Outputs n0..n1 of rows m0..m0+R-1 of y (M, N) = x W^T. R is a compile-time count so that the
// accumulators stay in registers; two integer sums per row halve the dpbusd dependency chain.
template <int R>
void tile(const int8_t *xq, const float *dx, const float *sx, const uint8_t *w, const uint16_t *sc,
          const uint16_t *mn, float *y, int64_t N, int64_t K, int64_t Gp, int64_t m0, int64_t n0, int64_t n1) {
    const int64_t G = K / 32, full = G / 16 * 16;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512i spread[8];  // tail chunk c: lanes 0-7 take group 2c, lanes 8-15 group 2c + 1
    for (int c = 0; c < 8; c++)
        spread[c] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(2 * c)), _mm256_set1_epi32(2 * c + 1), 1);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * (K / 2);
        const uint16_t *sr = sc + n * G, *mr = mn + n * G;
        __m512 acc[R];
#pragma GCC unroll 4
        for (int j = 0; j < R; j++) acc[j] = _mm512_setzero_ps();
        for (int64_t gb = 0; gb < full; gb += 16) {  // whole blocks of 16 groups, 256 bytes each
            const uint8_t *blk = wr + gb * 16;
            __m512i isum[R][2];
#pragma GCC unroll 4
            for (int j = 0; j < R; j++) isum[j][0] = isum[j][1] = _mm512_setzero_si512();
#pragma GCC unroll 4
            for (int t = 0; t < 4; t++) {
                const __m512i v = _mm512_loadu_si512((const void *)(blk + t * 64));
                const __m512i q0 = _mm512_and_si512(v, low4), q1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
#pragma GCC unroll 4
                for (int j = 0; j < R; j++) {
                    const int8_t *xr = xq + (m0 + j) * K + gb * 32 + t * 128;
                    isum[j][0] = _mm512_dpbusd_epi32(isum[j][0], q0, _mm512_loadu_si512((const void *)xr));
                    isum[j][1] = _mm512_dpbusd_epi32(isum[j][1], q1, _mm512_loadu_si512((const void *)(xr + 64)));
                }
            }
            const __m512 s16 = f16x16(sr + gb, 0xFFFF), b16 = f16x16(mr + gb, 0xFFFF);
#pragma GCC unroll 4
            for (int j = 0; j < R; j++) {
                const __m512 dsum = _mm512_cvtepi32_ps(_mm512_add_epi32(isum[j][0], isum[j][1]));
                acc[j] = _mm512_fmadd_ps(dsum, _mm512_mul_ps(s16, _mm512_loadu_ps(dx + (m0 + j) * Gp + gb)), acc[j]);
                acc[j] = _mm512_fmadd_ps(b16, _mm512_loadu_ps(sx + (m0 + j) * Gp + gb), acc[j]);
            }
        }
        if (full < G) {  // the tail: chunks of two groups in natural order
            const __mmask16 gm = (__mmask16)((1u << (G - full)) - 1);
            const __m512 s16 = f16x16(sr + full, gm), b16 = f16x16(mr + full, gm);
            __m512 p16[R];
#pragma GCC unroll 4
            for (int j = 0; j < R; j++) {
                p16[j] = _mm512_mul_ps(s16, _mm512_loadu_ps(dx + (m0 + j) * Gp + full));
                acc[j] = _mm512_fmadd_ps(b16, _mm512_loadu_ps(sx + (m0 + j) * Gp + full), acc[j]);
            }
            for (int64_t c = 0; c < (G - full) / 2; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wr + full * 16 + c * 32));
                const __m256i l4 = _mm256_set1_epi8(0x0F);
                const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, l4)),
                                                     _mm256_and_si256(_mm256_srli_epi16(v, 4), l4), 1);
#pragma GCC unroll 4
                for (int j = 0; j < R; j++) {
                    const __m512i xv = _mm512_loadu_si512((const void *)(xq + (m0 + j) * K + full * 32 + c * 64));
                    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xv);
                    acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(spread[c], p16[j]), acc[j]);
                }
            }
        }
#pragma GCC unroll 4
        for (int j = 0; j < R; j++) y[(m0 + j) * N + n] = _mm512_reduce_add_ps(acc[j]);
    }
}

void rows(const int8_t *xq, const float *dx, const float *sx, const uint8_t *w, const uint16_t *sc,
          const uint16_t *mn, float *y, int64_t M, int64_t N, int64_t K, int64_t Gp, int64_t n0, int64_t n1) {
    int64_t m0 = 0;
    for (; M - m0 >= 4; m0 += 4) tile<4>(xq, dx, sx, w, sc, mn, y, N, K, Gp, m0, n0, n1);
    switch (M - m0) {
        case 3: tile<3>(xq, dx, sx, w, sc, mn, y, N, K, Gp, m0, n0, n1); break;
        case 2: tile<2>(xq, dx, sx, w, sc, mn, y, N, K, Gp, m0, n0, n1); break;
        case 1: tile<1>(xq, dx, sx, w, sc, mn, y, N, K, Gp, m0, n0, n1); break;
        default: break;
    }
}

// Row `wr`'s K codes in natural order (the inverse of the layout at the top).
void unpack_row(const uint8_t *wr, int64_t K, int64_t full, uint8_t *out) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    alignas(64) uint8_t vec[512];
    for (int64_t gb = 0; gb < full; gb += 16) {
        for (int t = 0; t < 4; t++) {
            const __m512i v = _mm512_loadu_si512((const void *)(wr + gb * 16 + t * 64));
            _mm512_store_si512((void *)(vec + 2 * t * 64), _mm512_and_si512(v, low4));
            _mm512_store_si512((void *)(vec + (2 * t + 1) * 64), _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
        }
        for (int i = 0; i < 8; i++)  // word (i, l) of the vectors -> word (l, i) of the 16 groups
            for (int l = 0; l < 16; l++) std::memcpy(out + (gb + l) * 32 + i * 4, vec + i * 64 + l * 4, 4);
    }
    for (int64_t k = full * 32; k < K; k += 64) {
        const uint8_t *src = wr + k / 2;
        for (int e = 0; e < 32; e++) out[k + e] = src[e] & 15, out[k + 32 + e] = src[e] >> 4;
    }
}

}  // namespace

// x (M, K) float, w (N, K / 2) uint8, scales and mins (N, K / 32) fp16 -> (M, N) in x's dtype (fp32 sums,
// rounded once here: a cast left to the caller could be elided inside a compiled graph's fused loops, and
// differently for one token than for a block, which would break speculative decoding's exactness). K % 64 == 0.
at::Tensor int4_mm(const at::Tensor &x, const at::Tensor &w, const at::Tensor &scales, const at::Tensor &mins) {
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    TORCH_CHECK(K % 64 == 0 && w.size(1) * 2 == K && scales.size(1) * 32 == K, "int4_mm: bad shapes");
    const int64_t Gp = (K / 32 + 15) / 16 * 16;
    thread_local std::vector<int8_t> xq;  // scratch kept between calls (no allocation per call)
    thread_local std::vector<float> dx, sx;
    xq.resize(M * K), dx.resize(M * Gp), sx.resize(M * Gp);
    if (x.scalar_type() == at::kBFloat16 && x.is_contiguous()) {
        quantize(x.const_data_ptr<at::BFloat16>(), M, K, Gp, xq.data(), dx.data(), sx.data());
    } else {
        at::Tensor xf = x.to(at::kFloat).contiguous();
        quantize(xf.const_data_ptr<float>(), M, K, Gp, xq.data(), dx.data(), sx.data());
    }
    at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
    const uint8_t *wp = w.data_ptr<uint8_t>();
    const auto *sp = reinterpret_cast<const uint16_t *>(scales.data_ptr());
    const auto *mp = reinterpret_cast<const uint16_t *>(mins.data_ptr());
    float *yp = y.data_ptr<float>();
    // pointers, not the thread_local names: inside the lambda those would name each worker's own (empty) copy
    const int8_t *xqp = xq.data();
    const float *dxp = dx.data(), *sxp = sx.data();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        rows(xqp, dxp, sxp, wp, sp, mp, yp, M, N, K, Gp, n0, n1);
    });
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// The dense weight (N, K / P) in bf16 for prefill's matmul: planes p = 0..P-1 of each group of 32 inputs sit
// side by side along K (quant/int4.py, Int4Parts) and are summed in fp32, then rounded once.
at::Tensor int4_dense(const at::Tensor &w, const at::Tensor &scales, const at::Tensor &mins, int64_t P) {
    const int64_t N = w.size(0), K = w.size(1) * 2, G = K / 32, Ko = K / P, full = G / 16 * 16;
    TORCH_CHECK(K % 64 == 0 && G % P == 0, "int4_dense: bad shapes");
    at::Tensor out = at::empty({N, Ko}, w.options().dtype(at::kBFloat16));
    const uint8_t *wp = w.data_ptr<uint8_t>();
    const auto *sp = reinterpret_cast<const uint16_t *>(scales.data_ptr());
    const auto *mp = reinterpret_cast<const uint16_t *>(mins.data_ptr());
    auto *op = reinterpret_cast<uint16_t *>(out.data_ptr());
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        std::vector<float> row(Ko);
        std::vector<uint8_t> codes(K);
        for (int64_t n = n0; n < n1; n++) {
            std::fill(row.begin(), row.end(), 0.0f);
            unpack_row(wp + n * (K / 2), K, full, codes.data());
            for (int64_t g = 0; g < G; g++) {  // group g: plane g % P of input group g / P
                const __m512 s = _mm512_set1_ps(_cvtsh_ss(sp[n * G + g])), b = _mm512_set1_ps(_cvtsh_ss(mp[n * G + g]));
                float *dst = row.data() + (g / P) * 32;
                for (int h = 0; h < 32; h += 16) {
                    const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes.data() + g * 32 + h))));
                    _mm512_storeu_ps(dst + h, _mm512_add_ps(_mm512_loadu_ps(dst + h), _mm512_fmadd_ps(q, s, b)));
                }
            }
            for (int64_t k = 0; k < Ko; k += 16)
                _mm256_storeu_si256((__m256i *)(op + n * Ko + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row.data() + k)));
        }
    });
    return out;
}

TORCH_LIBRARY_FRAGMENT(leanlm_native, m) {
    m.def("int4_mm(Tensor x, Tensor w, Tensor scales, Tensor mins) -> Tensor");
    m.def("int4_dense(Tensor w, Tensor scales, Tensor mins, int planes) -> Tensor");
}
TORCH_LIBRARY_IMPL(leanlm_native, CPU, m) {
    m.impl("int4_mm", int4_mm);
    m.impl("int4_dense", int4_dense);
}
#endif
