/* The output head on AVX-512 VNNI: int8 weights (one bf16 scale per output row) times activations quantised
 * to int8 per group of 32, as a torch operator (leanlm_native::int8_mm).
 *
 * The head is the largest matrix a decode step reads (Gemma 3: 262144 x 640), and for a batch of sequences
 * the costliest: with int16 activations (kernels/int8_vnni.c, `vpdpwssd`, 32 products per instruction) and
 * one horizontal sum per output and row, 8 rows took 2.2x one. Here, as in int4_vnni.cpp, outputs come in
 * tiles of 16, one per 32-bit lane, and `vpdpbusd` (64 products) multiplies 4 weights of each of 16 outputs
 * by 4 activations broadcast to every lane: no horizontal sums.
 *
 * `vpdpbusd` wants one operand unsigned: the codes are stored as u = w + 128 (0..255), and per group
 *     sum_k w xq = sum_k u xq - 128 sum_k xq
 * with the integer sum of xq from quantisation, so each group's dot product is exact in int32 before its
 * activation scale dx is applied; the row's weight scale multiplies the finished sum.
 * Layout (quant/int8.py `head_pack`): tile t is 16 K bytes; group g of it 512 bytes, 8 vectors of 64; lane l
 * of vector i holds u for output 16 t + l at k = 32 g + 4 i .. 32 g + 4 i + 3. E.g. output 37, k = 77: tile 2,
 * group 2, vector 3, lane 5, byte 1, i.e. byte 2 * 16 K + 2 * 512 + 3 * 64 + 5 * 4 + 1.
 */
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

#include "vnni.h"

namespace {

// Tiles t .. t + NT - 1 for rows m0 .. m0 + R - 1 of y (M, N); every row computed by the same instructions
// whatever R and NT are.
template <int R, int NT>
void tile(const vnni::Quantized &q, const uint8_t *w, const at::BFloat16 *sc, float *y, int64_t N, int64_t K,
          int64_t m0, int64_t t) {
    const int64_t G = K / 32;
    __m512 acc[R][NT];
#pragma GCC unroll 8
    for (int j = 0; j < R; j++)
        for (int u = 0; u < NT; u++) acc[j][u] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512i isum[R][NT];
#pragma GCC unroll 8
        for (int j = 0; j < R; j++)
            for (int u = 0; u < NT; u++) isum[j][u] = _mm512_set1_epi32(-128 * q.qs[(m0 + j) * G + g]);
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            __m512i v[NT];
#pragma GCC unroll 2
            for (int u = 0; u < NT; u++) v[u] = _mm512_loadu_si512((const void *)(w + (t + u) * 16 * K + g * 512 + i * 64));
#pragma GCC unroll 4
            for (int j = 0; j < R; j++) {
                const __m512i xv = vnni::bcast4(q.xq + (m0 + j) * K + g * 32 + i * 4);
#pragma GCC unroll 2
                for (int u = 0; u < NT; u++) isum[j][u] = _mm512_dpbusd_epi32(isum[j][u], v[u], xv);
            }
        }
#pragma GCC unroll 4
        for (int j = 0; j < R; j++) {
            const __m512 d = _mm512_set1_ps(q.dx[(m0 + j) * G + g]);
#pragma GCC unroll 2
            for (int u = 0; u < NT; u++) acc[j][u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[j][u]), d, acc[j][u]);
        }
    }
#pragma GCC unroll 2
    for (int u = 0; u < NT; u++) {
        const __m512 s = vnni::load16(sc + (t + u) * 16);  // 16 bf16 row scales
#pragma GCC unroll 4
        for (int j = 0; j < R; j++) _mm512_storeu_ps(y + (m0 + j) * N + (t + u) * 16, _mm512_mul_ps(acc[j][u], s));
    }
}

template <int NT>
void rows(const vnni::Quantized &q, const uint8_t *w, const at::BFloat16 *sc, float *y, int64_t M, int64_t N,
          int64_t K, int64_t t) {
    int64_t m0 = 0;
    for (; M - m0 >= 4; m0 += 4) tile<4, NT>(q, w, sc, y, N, K, m0, t);
    switch (M - m0) {
        case 3: tile<3, NT>(q, w, sc, y, N, K, m0, t); break;
        case 2: tile<2, NT>(q, w, sc, y, N, K, m0, t); break;
        case 1: tile<1, NT>(q, w, sc, y, N, K, m0, t); break;
        default: break;
    }
}

}  // namespace

// x (M, K) float, w (N, K) uint8 in the tiled layout, scales (N,) bf16 -> (M, N) fp32 logits.
// K % 32 == 0, N % 32 == 0.
at::Tensor int8_mm(const at::Tensor &x, const at::Tensor &w, const at::Tensor &scales) {
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    TORCH_CHECK(K % 32 == 0 && N % 32 == 0 && w.size(1) == K && scales.numel() == N, "int8_mm: bad shapes");
    const vnni::Quantized q = vnni::quantize_input(x, vnni::Sums::integer);
    at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
    const uint8_t *wp = w.data_ptr<uint8_t>();
    const auto *sp = scales.const_data_ptr<at::BFloat16>();
    float *yp = y.data_ptr<float>();
    at::parallel_for(0, N / 32, 8, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; p++) {
            if (M > 4) {
                rows<2>(q, wp, sp, yp, M, N, K, 2 * p);
            } else {
                rows<1>(q, wp, sp, yp, M, N, K, 2 * p);
                rows<1>(q, wp, sp, yp, M, N, K, 2 * p + 1);
            }
        }
    });
    return y;
}

TORCH_LIBRARY_FRAGMENT(leanlm_native, m) { m.def("int8_mm(Tensor x, Tensor w, Tensor scales) -> Tensor"); }
TORCH_LIBRARY_IMPL(leanlm_native, CPU, m) { m.impl("int8_mm", int8_mm); }
#endif
