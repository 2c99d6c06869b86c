/* Attention for a few queries per sequence over an 8-bit K/V cache (cache.py, kv_dtype "int8"), on AVX-512
 * VNNI: leanlm_native::attend_int8. Each cached key and value row (one token, one head) is int8 codes with one
 * fp32 scale, code = round(x / s), s = max |x| / 127: half the bytes of bf16 rows, which is what batched
 * decode attention is bound by (reading every sequence's K and V each step).
 *
 * Keys are stored offset by 128 (uint8) in blocks of 16 slots, (hd / 4, 16, 4): word d * 16 + j of a block is
 * dims 4d .. 4d + 3 of its slot j, so one 512-bit load gives 4 dims of 16 keys. E.g. hd = 64, slot 37, dim 10:
 * block 2, word 2 * 16 + 5 = 37, byte 2 of it. The query row is quantised the same way (per row, to int8), and
 *
 *   q . k_j = s_q s_j sum_d q8_d k8_j,d,  sum_d q8_d (k8_j,d + 128) = vpdpbusd sums, minus 128 sum_d q8_d
 *
 * (llama.cpp quantises activations for its q8_0 K cache the same way). Values: p_j s_j (fp32) times the
 * widened codes, FMAs in fp32, keys alternating between two sets of sums. A task is one sequence, one key/value
 * head and up to 4 of its query rows, as in attend_blocked.cpp; a row's arithmetic does not depend on the rows
 * sharing its task, on T or on the batch.
 * q (B, H, T, hd) bf16; k (B, KV, S16 / 16, hd / 4, 16, 4) uint8, k_scale (B, KV, S16) fp32; v (B, KV, S16, hd)
 * int8, v_scale (B, KV, S16) fp32 (rows contiguous; S16 >= S); mask (B, 1, T, S) bool; hd 64, 128 or 256.
 */
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "few_queries.h"

namespace {

using bf16 = at::BFloat16;
using fewq::KB;
constexpr int PFV = 16;  // keys ahead to prefetch values for

struct Call {
    const bf16 *q;
    const uint8_t *k;
    const int8_t *v;
    const float *ks, *vs;
    const bool *mask;
    bf16 *out;  // (B, H, T, hd)
    int64_t H, T, S, KV, rep, qs0, qs1, qs2, k0, k1, v0, v1, v2, ks0, ks1, vs0, vs1, ms0, ms2, ms3;
    float scale;
};

inline __mmask16 allowed16(const Call &c, int64_t b, int64_t t, int64_t s0) {
    return fewq::allowed16(c.mask + b * c.ms0 + t * c.ms2, c.ms3, c.S, s0);
}

// One query row (hd bf16) -> int8 codes, their scale and sum: code = round(x / s), s = max |x| / 127 (0: all 0)
template <int HD>
inline void quantize_query(const bf16 *x, int8_t *q8, float &s, int32_t &sum) {
    __m512 f[HD / 16], amax = _mm512_setzero_ps();
    for (int c = 0; c < HD / 16; c++) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(x + 16 * c));
        f[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        amax = _mm512_max_ps(amax, _mm512_abs_ps(f[c]));
    }
    s = _mm512_reduce_max_ps(amax) / 127.0f;
    __m512i acc = _mm512_setzero_si512();
    for (int c = 0; c < HD / 16; c++) {
        const __m512i code =
            s > 0 ? _mm512_cvtps_epi32(_mm512_div_ps(f[c], _mm512_set1_ps(s))) : _mm512_setzero_si512();
        acc = _mm512_add_epi32(acc, code);
        _mm_storeu_si128((__m128i *)(q8 + 16 * c), _mm512_cvtepi32_epi8(code));
    }
    sum = _mm512_reduce_add_epi32(acc);
}

// s: one row's scores (-inf where masked) -> the softmax times each key's value scale (0 where masked)
inline void weights_row(float *s, const float *vs, int64_t S16, __m512 mxv) {
    const __m512 inv = _mm512_set1_ps(fewq::exp_weights(s, S16, mxv));
    for (int64_t j0 = 0; j0 < S16; j0 += 16)
        _mm512_storeu_ps(s + j0, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(s + j0), inv), _mm512_loadu_ps(vs + j0)));
}

template <int HD, int NR>
void task(const Call &c, int64_t b, int64_t g, int64_t r0, float *s) {
    constexpr int NW = HD / 4;  // words of 4 dims
    const int64_t S16 = (c.S + KB - 1) / KB * KB;
    const float ninf = -std::numeric_limits<float>::infinity();
    alignas(64) int8_t q8[NR][HD];
    float sq[NR];
    int32_t qsum[NR];
    int64_t t[NR], h[NR];
    for (int r = 0; r < NR; r++) {
        h[r] = g * c.rep + (r0 + r) / c.T, t[r] = (r0 + r) % c.T;
        quantize_query<HD>(c.q + b * c.qs0 + h[r] * c.qs1 + t[r] * c.qs2, q8[r], sq[r], qsum[r]);
    }
    const uint8_t *kb = c.k + b * c.k0 + g * c.k1;
    const float *ks = c.ks + b * c.ks0 + g * c.ks1, *vs = c.vs + b * c.vs0 + g * c.vs1;
    const __m512 ninfv = _mm512_set1_ps(ninf);
    __m512 mx[NR];
    for (int r = 0; r < NR; r++) mx[r] = ninfv;
    for (int64_t s0 = 0; s0 < c.S; s0 += KB) {  // scores, 16 keys in the lanes
        __mmask16 al[NR], any = 0;
        for (int r = 0; r < NR; r++) any |= (al[r] = allowed16(c, b, t[r], s0));
        if (any == 0) {
            for (int r = 0; r < NR; r++) _mm512_storeu_ps(s + r * S16 + s0, ninfv);
            continue;
        }
        const uint8_t *blk = kb + s0 * HD;  // block s0 / 16: 16 * HD bytes
        if (s0 + 2 * KB < c.S)
            for (int l = 0; l < KB * HD; l += 64) _mm_prefetch((const char *)(blk + 2 * KB * HD + l), _MM_HINT_T0);
        __m512i a[NR][2];
        for (int r = 0; r < NR; r++) a[r][0] = a[r][1] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int w = 0; w < NW; w += 2) {
#pragma GCC unroll 2
            for (int i = 0; i < 2; i++) {
                const __m512i kv = _mm512_loadu_si512((const void *)(blk + (w + i) * 64));
                for (int r = 0; r < NR; r++) {
                    int32_t qw;
                    std::memcpy(&qw, q8[r] + 4 * (w + i), 4);
                    a[r][i] = _mm512_dpbusd_epi32(a[r][i], kv, _mm512_set1_epi32(qw));
                }
            }
        }
        const __m512 kscale = _mm512_loadu_ps(ks + s0);
        for (int r = 0; r < NR; r++) {
            const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(a[r][0], a[r][1]), _mm512_set1_epi32(128 * qsum[r]));
            const __m512 f =
                _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(sq[r] * c.scale)), kscale);
            const __m512 sr = _mm512_mask_mov_ps(ninfv, al[r], f);
            _mm512_storeu_ps(s + r * S16 + s0, sr);
            mx[r] = _mm512_max_ps(mx[r], sr);
        }
    }
    for (int r = 0; r < NR; r++) weights_row(s + r * S16, vs, S16, mx[r]);
    // values: columns in chunks of CW vectors of 16, keys alternating between two sets of sums
    constexpr int NC = HD / 16, CW = NR <= 2 ? std::min(NC, 4) : 2;
    const int8_t *vb = c.v + b * c.v0 + g * c.v1;
    for (int c0 = 0; c0 < NC; c0 += CW) {
        __m512 acc[2][NR][CW];
        for (int st = 0; st < 2; st++)
            for (int r = 0; r < NR; r++)
                for (int cc = 0; cc < CW; cc++) acc[st][r][cc] = _mm512_setzero_ps();
        const auto add_key = [&](int64_t j, int st) {
            const int8_t *row = vb + j * c.v2 + c0 * 16;
            if (c0 == 0 && j + PFV < c.S) _mm_prefetch((const char *)(row + PFV * c.v2), _MM_HINT_T0);
            __m512 x[CW];
#pragma GCC unroll 4
            for (int cc = 0; cc < CW; cc++)
                x[cc] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + cc * 16))));
            for (int r = 0; r < NR; r++) {
                const __m512 p = _mm512_set1_ps(s[r * S16 + j]);
#pragma GCC unroll 4
                for (int cc = 0; cc < CW; cc++) acc[st][r][cc] = _mm512_fmadd_ps(p, x[cc], acc[st][r][cc]);
            }
        };
        int64_t j = 0;
        for (; j + 2 <= c.S; j += 2) add_key(j, 0), add_key(j + 1, 1);
        if (j < c.S) add_key(j, 0);
        for (int r = 0; r < NR; r++) {
            bf16 *out = c.out + ((b * c.H + h[r]) * c.T + t[r]) * HD + c0 * 16;
            for (int cc = 0; cc < CW; cc++)
                _mm256_storeu_si256((__m256i *)(out + cc * 16),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[0][r][cc], acc[1][r][cc])));
        }
    }
}

}  // namespace

at::Tensor attend_int8(const at::Tensor &q, const at::Tensor &k, const at::Tensor &k_scale, const at::Tensor &v,
                       const at::Tensor &v_scale, const at::Tensor &mask, double scale) {
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3), KV = k.size(1), S = mask.size(3);
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kByte && v.scalar_type() == at::kChar &&
                k_scale.scalar_type() == at::kFloat && v_scale.scalar_type() == at::kFloat &&
                mask.scalar_type() == at::kBool, "attend_int8: bf16 queries, uint8 keys, int8 values, fp32 scales");
    TORCH_CHECK((hd == 64 || hd == 128 || hd == 256) && q.stride(3) == 1 && H % KV == 0 && k.dim() == 6 &&
                k.size(0) == B && k.size(2) * KB >= S && k.size(3) == hd / 4 && k.size(4) == KB && k.size(5) == 4 &&
                k.stride(2) == KB * hd && k.stride(3) == 64 && k.stride(4) == 4 && k.stride(5) == 1 &&
                v.dim() == 4 && v.size(0) == B && v.size(1) == KV && v.size(2) >= S && v.size(3) == hd &&
                v.stride(3) == 1 && k_scale.size(2) >= k.size(2) * KB && v_scale.size(2) >= k.size(2) * KB &&
                k_scale.stride(2) == 1 && v_scale.stride(2) == 1 && mask.size(0) == B && mask.size(2) == T,
                "attend_int8: bad shapes");
    at::Tensor out = at::empty(q.sizes(), q.options());
    const Call c{q.const_data_ptr<bf16>(), k.const_data_ptr<uint8_t>(), v.const_data_ptr<int8_t>(),
                 k_scale.const_data_ptr<float>(), v_scale.const_data_ptr<float>(), mask.const_data_ptr<bool>(),
                 out.data_ptr<bf16>(), H, T, S, KV, H / KV, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
                 k.stride(1), v.stride(0), v.stride(1), v.stride(2), k_scale.stride(0), k_scale.stride(1),
                 v_scale.stride(0), v_scale.stride(1), mask.stride(0), mask.stride(2), mask.stride(3), (float)scale};
    fewq::row_tasks(B, KV, c.rep * T, S, [&](int64_t b, int64_t g, int64_t r0, int n, float *s) {
        fewq::with_sizes(hd, n, [&](auto HD, auto NR) {
            task<decltype(HD)::value, decltype(NR)::value>(c, b, g, r0, s);
        });
    });
    return out;
}

TORCH_LIBRARY_FRAGMENT(leanlm_native, m) {
    m.def("attend_int8(Tensor q, Tensor k, Tensor k_scale, Tensor v, Tensor v_scale, Tensor mask, float scale) "
          "-> Tensor");
}
TORCH_LIBRARY_IMPL(leanlm_native, CPU, m) { m.impl("attend_int8", attend_int8); }
#endif
