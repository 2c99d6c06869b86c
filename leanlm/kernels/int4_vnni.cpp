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
 * Layout: outputs in tiles of 16, one per 32-bit lane. `vpdpbusd` multiplies 64 unsigned codes by 64 signed
 * bytes and adds each 4 adjacent products into one of 16 lanes; with 4 activations broadcast to every lane,
 * lane l gets output l's 4-term dot product. So vector i (i = 0..7) of group g of a tile holds, in lane l,
 * the codes of output 16 t + l at k = 32 g + 4 i .. 32 g + 4 i + 3; eight dpbusd finish a group for 16
 * outputs, and one FMA per row applies the group's 16 scales. No horizontal sums, any K % 32 == 0.
 * Worked example: the code of output n = 37, k = 77 is in tile 2 (37 / 16), lane 5 (37 % 16), group 2
 * (77 / 32), vector 3 ((77 % 32) / 4), byte 1 (77 % 4): byte 4 * 5 + 1 = 21 of that vector.
 * Packing: vectors 2t and 2t + 1 share 64 bytes, 2t in the low nibbles, so a group of a tile is 256 bytes and
 * a tile is 8 K bytes; its scales and minimums are (G, 16) fp16, group-major.
 * Wider codes (5 to 8 bits: Q5_0, Q5_1, Q5_K, Q8_0 kept at their own size instead of two 4-bit planes) add H
 * bit planes after each group's 256 bytes: plane p is 8 masks of 64 bits, mask i bit j = bit 4 + p of byte j
 * of vector i, set by one masked add of 16 << p. A group is then 256 + 64 H bytes.
 * Scales 16 wide (Q6_K's sub-blocks; S16): each group has two scales and minimums per output, vectors 0-3 and
 * 4-7 are summed apart, and the activations' sums come per half group.
 */
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

#include "amx.h"
#include "vnni.h"

namespace {

// Software prefetch distance along a tile's weights (bytes): the hardware prefetcher alone left a decode
// step's weight stream at ~25 GB/s; 4 KB ahead measured 4-6% faster Gemma 3 steps (bench/NOTES.md)
constexpr int64_t PF = 4096;
using vnni::add_high_bits;
using vnni::bcast4;
using vnni::f16x16;

// Where results go: fp32, or bf16 rounded here once (to nearest even, as torch's cast), sparing a copy per call.
struct Out {
    void *p;
    bool bf16;
    void store(int64_t i, __m512 v) const {
        if (bf16) _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), (__m256i)_mm512_cvtneps_pbh(v));
        else _mm512_storeu_ps((float *)p + i, v);
    }
};

// Tiles t .. t + NT - 1 (outputs 16 t .. 16 (t + NT) - 1) for rows m0 .. m0 + R - 1 of y (M, N). R and NT
// are compile-time counts so the accumulators stay in registers; with NT = 2 each broadcast activation
// feeds two dpbusd. Every row is computed by the same instructions whatever R and NT are, so results do
// not depend on how many rows come along.
template <int R, int NT, int H, bool S16>
void tile(const int8_t *xq, const float *dx, const float *sx, const uint8_t *w, const uint16_t *sc,
          const uint16_t *mn, Out y, int64_t N, int64_t K, int64_t m0, int64_t t) {
    constexpr int NS = S16 ? 2 : 1;  // scales per group
    const int64_t G = K / 32, GS = 256 + 64 * H;  // bytes per group of a tile
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512 acc[R][NT];
#pragma GCC unroll 8
    for (int j = 0; j < R; j++)
        for (int u = 0; u < NT; u++) acc[j][u] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512i isum[R][NT][NS];
#pragma GCC unroll 8
        for (int j = 0; j < R; j++)
            for (int u = 0; u < NT; u++)
                for (int e = 0; e < NS; e++) isum[j][u][e] = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int h = 0; h < 4; h++) {  // vectors 2h (low nibbles) and 2h + 1 (high nibbles)
            const int e = S16 ? h / 2 : 0;  // which scale: inputs 0-15 or 16-31 of the group
            __m512i q0[NT], q1[NT];
#pragma GCC unroll 2
            for (int u = 0; u < NT; u++) {
                const uint8_t *wg = w + ((t + u) * G + g) * GS;
                const __m512i v = _mm512_loadu_si512((const void *)(wg + h * 64));
                _mm_prefetch((const char *)(wg + PF + h * 64), _MM_HINT_T0);
                if (h == 0) {  // this tile's scales and minimums, as far ahead (32 bytes each per 256)
                    const int64_t at = ((t + u) * NS * G + NS * g) * 16 + NS * PF / 16;
                    _mm_prefetch((const char *)(sc + at), _MM_HINT_T0);
                    _mm_prefetch((const char *)(mn + at), _MM_HINT_T0);
                }
                q0[u] = _mm512_and_si512(v, low4), q1[u] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                add_high_bits<H>(wg + 256, 2 * h, q0[u], q1[u]);
            }
#pragma GCC unroll 4
            for (int j = 0; j < R; j++) {
                const int8_t *xr = xq + (m0 + j) * K + g * 32 + h * 8;
                const __m512i x0 = bcast4(xr), x1 = bcast4(xr + 4);
#pragma GCC unroll 2
                for (int u = 0; u < NT; u++)
                    isum[j][u][e] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(isum[j][u][e], q0[u], x0), q1[u], x1);
            }
        }
#pragma GCC unroll 2
        for (int u = 0; u < NT; u++) {
#pragma GCC unroll 2
            for (int e = 0; e < NS; e++) {
                const int64_t at = ((t + u) * NS * G + NS * g + e) * 16;
                const __m512 s16 = f16x16(sc + at), b16 = f16x16(mn + at);
#pragma GCC unroll 4
                for (int j = 0; j < R; j++) {
                    const __m512 dsum = _mm512_cvtepi32_ps(isum[j][u][e]);
                    acc[j][u] = _mm512_fmadd_ps(dsum, _mm512_mul_ps(s16, _mm512_set1_ps(dx[(m0 + j) * G + g])), acc[j][u]);
                    acc[j][u] = _mm512_fmadd_ps(b16, _mm512_set1_ps(sx[(m0 + j) * NS * G + NS * g + e]), acc[j][u]);
                }
            }
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < R; j++)
        for (int u = 0; u < NT; u++) y.store((m0 + j) * N + (t + u) * 16, acc[j][u]);
}

template <int NT, int H, bool S16>
void rows(const int8_t *xq, const float *dx, const float *sx, const uint8_t *w, const uint16_t *sc,
          const uint16_t *mn, Out y, int64_t M, int64_t N, int64_t K, int64_t t) {
    int64_t m0 = 0;
    for (; M - m0 >= 4; m0 += 4) tile<4, NT, H, S16>(xq, dx, sx, w, sc, mn, y, N, K, m0, t);
    switch (M - m0) {
        case 3: tile<3, NT, H, S16>(xq, dx, sx, w, sc, mn, y, N, K, m0, t); break;
        case 2: tile<2, NT, H, S16>(xq, dx, sx, w, sc, mn, y, N, K, m0, t); break;
        case 1: tile<1, NT, H, S16>(xq, dx, sx, w, sc, mn, y, N, K, m0, t); break;
        default: break;
    }
}

// Pairs of tiles p0 .. p1 - 1 (the last one single when N / 16 is odd). Both tiles of a pair share each
// broadcast activation from 5 rows on; for fewer rows one tile at a time measured faster (bench/NOTES.md).
template <int H, bool S16>
void tiles(const int8_t *xq, const float *dx, const float *sx, const uint8_t *w, const uint16_t *sc,
           const uint16_t *mn, Out y, int64_t M, int64_t N, int64_t K, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
        if (M > 4 && 2 * p + 1 < N / 16) {
            rows<2, H, S16>(xq, dx, sx, w, sc, mn, y, M, N, K, 2 * p);
        } else {
            rows<1, H, S16>(xq, dx, sx, w, sc, mn, y, M, N, K, 2 * p);
            if (2 * p + 1 < N / 16) rows<1, H, S16>(xq, dx, sx, w, sc, mn, y, M, N, K, 2 * p + 1);
        }
    }
}

// The codes of one group of a tile as codes[16][32] (output lane, k within the group): the layout's inverse.
template <int H>
void unpack_group(const uint8_t *wg, uint8_t codes[16][32]) {
    __m512i vec[8];
    vnni::spread_group<H>(wg, vec);
    for (int i = 0; i < 8; i++)  // word (vector i, lane l) -> inputs 4 i .. 4 i + 3 of output l
        for (int l = 0; l < 16; l++) std::memcpy(codes[l] + 4 * i, (const uint8_t *)&vec[i] + 4 * l, 4);
}

void unpack_group(const uint8_t *wg, int H, uint8_t codes[16][32]) {
    switch (H) {
        case 0: return unpack_group<0>(wg, codes);
        case 1: return unpack_group<1>(wg, codes);
        case 2: return unpack_group<2>(wg, codes);
        case 3: return unpack_group<3>(wg, codes);
        default: return unpack_group<4>(wg, codes);
    }
}

// Extra bit planes H of a (N, K) weight stored in `bytes_per_row` bytes per row; -1 if none fits.
int planes_of(int64_t K, int64_t bytes_per_row) {
    for (int H = 0; H <= 4; H++)
        if (bytes_per_row == K / 2 + H * K / 8) return H;
    return -1;
}

}  // namespace

// x (M, K) float, w (N, K / 2 + H K / 8) uint8, scales and mins (N, K / 32) fp16 (tiles of 16 outputs, see the top)
// -> (M, N) in x's dtype (fp32 sums, rounded once here: a cast left to the caller could be elided inside a
// compiled graph's fused loops, and differently for one token than for a block, which would break
// speculative decoding's exactness). K % 32 == 0, N % 16 == 0.
at::Tensor int4_mm(const at::Tensor &x, const at::Tensor &w, const at::Tensor &scales, const at::Tensor &mins) {
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / 32;
    const int H = planes_of(K, w.size(1));
    const bool s16 = scales.size(1) == 2 * G;  // 16-wide scales (only with 6-bit codes: Q6_K)
    TORCH_CHECK(K % 32 == 0 && N % 16 == 0 && (H == 0 || H == 1 || H == 2 || H == 4) &&
                (scales.size(1) == G || (s16 && H == 2)), "int4_mm: bad shapes");
    const vnni::Quantized q = vnni::quantize_input(x, s16 ? vnni::Sums::per_half_group : vnni::Sums::per_group);
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    at::Tensor y = at::empty({M, N}, x.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
    const uint8_t *wp = w.data_ptr<uint8_t>();
    const auto *sp = reinterpret_cast<const uint16_t *>(scales.data_ptr());
    const auto *mp = reinterpret_cast<const uint16_t *>(mins.data_ptr());
    const Out yp{y.data_ptr(), bf16};
    if (amx::int4_mm({q.xq, q.dx, q.sx, wp, sp, mp, y.data_ptr(), bf16, s16, M, N, K, H}))
        return bf16 || x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
    at::parallel_for(0, (N / 16 + 1) / 2, 1, [&](int64_t p0, int64_t p1) {
        if (s16) return tiles<2, true>(q.xq, q.dx, q.sx, wp, sp, mp, yp, M, N, K, p0, p1);
        switch (H) {
            case 0: tiles<0, false>(q.xq, q.dx, q.sx, wp, sp, mp, yp, M, N, K, p0, p1); break;
            case 1: tiles<1, false>(q.xq, q.dx, q.sx, wp, sp, mp, yp, M, N, K, p0, p1); break;
            case 2: tiles<2, false>(q.xq, q.dx, q.sx, wp, sp, mp, yp, M, N, K, p0, p1); break;
            default: tiles<4, false>(q.xq, q.dx, q.sx, wp, sp, mp, yp, M, N, K, p0, p1); break;
        }
    });
    return bf16 || x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// The dense weight (N, K / P) in bf16 for prefill's matmul, K codes per row: planes p = 0..P-1 of each group of
// 32 inputs sit side by side along K (quant/int4.py, Int4Parts) and are summed in fp32, then rounded once.
at::Tensor int4_dense(const at::Tensor &w, const at::Tensor &scales, const at::Tensor &mins, int64_t P, int64_t K) {
    const int64_t N = w.size(0), G = K / 32, NS = scales.size(1) / G, Ko = K / P;
    const int H = planes_of(K, w.size(1));
    TORCH_CHECK(K % 32 == 0 && N % 16 == 0 && G % P == 0 && H >= 0 && (NS == 1 || NS == 2) &&
                scales.size(1) == NS * G, "int4_dense: bad shapes");
    at::Tensor out = at::empty({N, Ko}, w.options().dtype(at::kBFloat16));
    const uint8_t *wp = w.data_ptr<uint8_t>();
    const auto *sp = reinterpret_cast<const uint16_t *>(scales.data_ptr());
    const auto *mp = reinterpret_cast<const uint16_t *>(mins.data_ptr());
    auto *op = reinterpret_cast<uint16_t *>(out.data_ptr());
    at::parallel_for(0, N / 16, 1, [&](int64_t t0, int64_t t1) {
        std::vector<float> rows(P > 1 ? 16 * Ko : 0);
        alignas(64) uint8_t codes[16][32];
        for (int64_t t = t0; t < t1; t++) {
            if (P == 1) {  // one plane: each weight rounded to bf16 straight into the output
                for (int64_t g = 0; g < G; g++) {
                    unpack_group(wp + (t * G + g) * (256 + 64 * H), H, codes);
                    for (int64_t e = 0; e < NS; e++) {
                        const uint16_t *st = sp + ((t * G + g) * NS + e) * 16, *bt = mp + ((t * G + g) * NS + e) * 16;
                        for (int l = 0; l < 16; l++) {
                            const __m512 s = _mm512_set1_ps(_cvtsh_ss(st[l])), b = _mm512_set1_ps(_cvtsh_ss(bt[l]));
                            for (int64_t h = 32 / NS * e; h < 32 / NS * (e + 1); h += 16) {
                                const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes[l] + h))));
                                _mm256_storeu_si256((__m256i *)(op + (t * 16 + l) * Ko + g * 32 + h),
                                                    (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(q, s, b)));
                            }
                        }
                    }
                }
                continue;
            }
            std::fill(rows.begin(), rows.end(), 0.0f);
            for (int64_t g = 0; g < G; g++) {  // group g: plane g % P of input group g / P
                unpack_group(wp + (t * G + g) * (256 + 64 * H), H, codes);
                for (int64_t e = 0; e < NS; e++) {  // the group's scales: 32 inputs each, or 16
                    const uint16_t *st = sp + ((t * G + g) * NS + e) * 16, *bt = mp + ((t * G + g) * NS + e) * 16;
                    for (int l = 0; l < 16; l++) {
                        const __m512 s = _mm512_set1_ps(_cvtsh_ss(st[l])), b = _mm512_set1_ps(_cvtsh_ss(bt[l]));
                        float *dst = rows.data() + l * Ko + (g / P) * 32;
                        for (int64_t h = 32 / NS * e; h < 32 / NS * (e + 1); h += 16) {
                            const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes[l] + h))));
                            _mm512_storeu_ps(dst + h, _mm512_add_ps(_mm512_loadu_ps(dst + h), _mm512_fmadd_ps(q, s, b)));
                        }
                    }
                }
            }
            for (int64_t i = 0; i < 16 * Ko; i += 16)
                _mm256_storeu_si256((__m256i *)(op + t * 16 * Ko + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(rows.data() + i)));
        }
    });
    return out;
}

TORCH_LIBRARY_FRAGMENT(leanlm_native, m) {
    m.def("int4_mm(Tensor x, Tensor w, Tensor scales, Tensor mins) -> Tensor");
    m.def("int4_dense(Tensor w, Tensor scales, Tensor mins, int planes, int k) -> Tensor");
}
TORCH_LIBRARY_IMPL(leanlm_native, CPU, m) {
    m.impl("int4_mm", int4_mm);
    m.impl("int4_dense", int4_dense);
}
#endif
