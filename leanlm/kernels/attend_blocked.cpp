/* Attention for a few queries per sequence (a decode step, a speculative block) over keys kept in blocks of
 * 16 slots (cache.py's blocked key layout), on AVX-512 BF16. attention.cpp's `attend` calls it when k is 6-D.
 *
 * Key layout: a block holds 16 slots as (hd / 2, 16, 2) bf16, so the 32-bit word d * 16 + j of a block is the
 * pair of dims (2d, 2d + 1) of its slot j, and one 512-bit load gives pair d of all 16 keys. E.g. hd = 64,
 * slot 37: block 2, slot 5 in it; its dims 10 and 11 are word 5 * 16 + 5 = 85 of block 2 (bf16 170 and 171).
 *
 *   scores of 16 keys, one query row:  sum over d of dpbf16(K block pair d, broadcast(q[2d], q[2d + 1]))
 *
 * The 16 keys sit in the lanes, so there is no transpose-and-add tree per 16 keys and query (the row layout
 * needs one: attention.cpp). The sums over d run as 4 interleaved chains (d mod 4), added at the end.
 * A task is one sequence, one key/value head and up to 4 of the query rows that read it (the group's query
 * heads times the T queries), so the key and value loads, and the values' widening to fp32, serve all of
 * them. Values are as in attention.cpp: rows (S, hd) bf16, p in fp32, each key added with FMAs in fp32, keys
 * alternating between two sets of sums. A row's arithmetic does not depend on the rows sharing its task, on
 * T or on the batch: a verified speculative block scores like single steps.
 * q (B, H, T, hd) rows contiguous; k (B, KV, S16 / 16, hd / 2, 16, 2) with contiguous blocks; v (B, KV, S, hd)
 * rows contiguous; mask (B, 1, T, S) bool. hd 64, 128 or 256.
 */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "few_queries.h"
#include "ops.h"

namespace {

using bf16 = at::BFloat16;
using fewq::KB;
constexpr int PFV = 16;  // keys ahead to prefetch values for

struct Call {
    const bf16 *q, *k, *v;
    const bool *mask;
    bf16 *out;  // (B, H, T, hd)
    int64_t H, T, S, KV, rep, qs0, qs1, qs2, ks0, ks1, vs0, vs1, vs2, ms0, ms2, ms3;
    float scale;
};

// Which of keys s0 .. s0 + 15 query t of sequence b may see, as 16 bits (none past S).
inline __mmask16 allowed16(const Call &c, int64_t b, int64_t t, int64_t s0) {
    return fewq::allowed16(c.mask + b * c.ms0 + t * c.ms2, c.ms3, c.S, s0);
}

// s[0..S16): one row's scores (-inf where masked) with running maximum mxv -> the softmax (0 where masked)
inline void softmax_row(float *s, int64_t S16, __m512 mxv) {
    const __m512 inv = _mm512_set1_ps(fewq::exp_weights(s, S16, mxv));
    for (int64_t j0 = 0; j0 < S16; j0 += 16) _mm512_storeu_ps(s + j0, _mm512_mul_ps(_mm512_loadu_ps(s + j0), inv));
}

// Rows r0 .. r0 + NR - 1 of group g of sequence b (row r: query head g * rep + r / T, query t = r % T).
// s: NR * S16 floats of scratch.
template <int HD, int NR>
void task(const Call &c, int64_t b, int64_t g, int64_t r0, float *s) {
    constexpr int NP = HD / 2;            // pairs of dims
    constexpr int PF = HD < 256 ? 2 : 1;  // blocks ahead to prefetch (a block: 2, 4 or 8 KiB): large batches
                                          // otherwise wait on memory for every block of keys
    const int64_t S16 = (c.S + KB - 1) / KB * KB;
    const float ninf = -std::numeric_limits<float>::infinity();
    const uint32_t *qw[NR];  // each row's query as words of bf16 pairs
    int64_t t[NR], h[NR];
    for (int r = 0; r < NR; r++) {
        h[r] = g * c.rep + (r0 + r) / c.T, t[r] = (r0 + r) % c.T;
        qw[r] = reinterpret_cast<const uint32_t *>(c.q + b * c.qs0 + h[r] * c.qs1 + t[r] * c.qs2);
    }
    const uint32_t *kb = reinterpret_cast<const uint32_t *>(c.k + b * c.ks0 + g * c.ks1);
    const __m512 sc = _mm512_set1_ps(c.scale), ninfv = _mm512_set1_ps(ninf);
    __m512 mx[NR];
    for (int r = 0; r < NR; r++) mx[r] = ninfv;
    for (int64_t s0 = 0; s0 < c.S; s0 += KB) {  // scores, 16 keys in the lanes
        __mmask16 al[NR], any = 0;
        for (int r = 0; r < NR; r++) any |= (al[r] = allowed16(c, b, t[r], s0));
        if (any == 0) {
            for (int r = 0; r < NR; r++) _mm512_storeu_ps(s + r * S16 + s0, ninfv);
            continue;
        }
        const uint32_t *blk = kb + s0 * NP;  // block s0 / 16: 16 * NP words each
        if (s0 + PF * KB < c.S)
            for (int l = 0; l < NP * KB; l += 16) _mm_prefetch((const char *)(blk + PF * KB * NP + l), _MM_HINT_T0);
        __m512 a[NR][4];
        for (int r = 0; r < NR; r++)
            for (int i = 0; i < 4; i++) a[r][i] = _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int d = 0; d < NP; d += 4) {
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                const __m512bh kv = (__m512bh)_mm512_loadu_si512((const void *)(blk + (d + i) * KB));
                for (int r = 0; r < NR; r++)
                    a[r][i] = _mm512_dpbf16_ps(a[r][i], kv, (__m512bh)_mm512_set1_epi32((int)qw[r][d + i]));
            }
        }
        for (int r = 0; r < NR; r++) {
            const __m512 sum = _mm512_add_ps(_mm512_add_ps(a[r][0], a[r][1]), _mm512_add_ps(a[r][2], a[r][3]));
            const __m512 sr = _mm512_mask_mul_ps(ninfv, al[r], sum, sc);
            _mm512_storeu_ps(s + r * S16 + s0, sr);
            mx[r] = _mm512_max_ps(mx[r], sr);
        }
    }
    for (int r = 0; r < NR; r++) softmax_row(s + r * S16, S16, mx[r]);
    // values: columns in chunks of CW vectors of 32 (even and odd columns apart: a 32-bit lane holding two bf16
    // is the odd column's float once its low half is cleared, the even one's after a shift), keys alternating
    // between two sets of sums; a chunk's sums stay in registers (NR * CW * 4 of them)
    constexpr int NV = HD / 32, CW = NR == 1 ? std::min(NV, 4) : NR == 2 ? 2 : 1;
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                           6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const bf16 *vb = c.v + b * c.vs0 + g * c.vs1;
    for (int c0 = 0; c0 < NV; c0 += CW) {
        __m512 e[2][NR][CW], o[2][NR][CW];
        for (int st = 0; st < 2; st++)
            for (int r = 0; r < NR; r++)
                for (int cc = 0; cc < CW; cc++) e[st][r][cc] = o[st][r][cc] = _mm512_setzero_ps();
        const auto add_key = [&](int64_t j, int st) {
            if (c0 == 0 && j + PFV < c.S)
                for (int l = 0; l < NV; l++) _mm_prefetch((const char *)(vb + (j + PFV) * c.vs2 + l * 32), _MM_HINT_T0);
#pragma GCC unroll 4
            for (int cc = 0; cc < CW; cc++) {
                const __m512i x = _mm512_loadu_si512((const void *)(vb + j * c.vs2 + (c0 + cc) * 32));
                const __m512 xe = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
                const __m512 xo = _mm512_castsi512_ps(_mm512_and_si512(x, high));
                for (int r = 0; r < NR; r++) {
                    const __m512 p = _mm512_set1_ps(s[r * S16 + j]);
                    e[st][r][cc] = _mm512_fmadd_ps(p, xe, e[st][r][cc]);
                    o[st][r][cc] = _mm512_fmadd_ps(p, xo, o[st][r][cc]);
                }
            }
        };
        int64_t j = 0;
        for (; j + 2 <= c.S; j += 2) add_key(j, 0), add_key(j + 1, 1);
        if (j < c.S) add_key(j, 0);
        for (int r = 0; r < NR; r++) {
            bf16 *out = c.out + ((b * c.H + h[r]) * c.T + t[r]) * HD + c0 * 32;
            for (int cc = 0; cc < CW; cc++) {  // even and odd columns, rounded, interleaved back
                const __m512 ev = _mm512_add_ps(e[0][r][cc], e[1][r][cc]);
                const __m512 od = _mm512_add_ps(o[0][r][cc], o[1][r][cc]);
                const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(od, ev);  // ev in the low half
                _mm512_storeu_si512((void *)(out + cc * 32), _mm512_permutexvar_epi16(inter, both));
            }
        }
    }
}

}  // namespace

at::Tensor attend_blocked(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &mask,
                          double scale) {
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3), KV = k.size(1), S = mask.size(3);
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                v.scalar_type() == at::kBFloat16 && mask.scalar_type() == at::kBool, "attend: bf16 and a bool mask");
    TORCH_CHECK((hd == 64 || hd == 128 || hd == 256) && q.stride(3) == 1 && H % KV == 0 && mask.size(0) == B &&
                mask.size(2) == T && blocked_keys_ok(k, B, KV, S, hd) && v.dim() == 4 && v.size(0) == B &&
                v.size(1) == KV && v.size(2) == S && v.size(3) == hd && v.stride(3) == 1,
                "attend: bad shapes for blocked keys");
    at::Tensor out = at::empty(q.sizes(), q.options());
    const Call c{q.const_data_ptr<bf16>(), k.const_data_ptr<bf16>(), v.const_data_ptr<bf16>(),
                 mask.const_data_ptr<bool>(), out.data_ptr<bf16>(), H, T, S, KV, H / KV, q.stride(0), q.stride(1),
                 q.stride(2), k.stride(0), k.stride(1), v.stride(0), v.stride(1), v.stride(2), mask.stride(0),
                 mask.stride(2), mask.stride(3), (float)scale};
    fewq::row_tasks(B, KV, c.rep * T, S, [&](int64_t b, int64_t g, int64_t r0, int n, float *s) {
        fewq::with_sizes(hd, n, [&](auto HD, auto NR) {
            task<decltype(HD)::value, decltype(NR)::value>(c, b, g, r0, s);
        });
    });
    return out;
}
#endif
