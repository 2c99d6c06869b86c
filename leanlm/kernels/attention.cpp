/* Attention for a few queries per sequence (a decode step, a speculative block) on AVX-512, as a torch
 * operator (leanlm_native::attend); model.py's `_few_query_attention` calls it where it is available.
 *
 * Inside a compiled decode step the same math ran as inductor's fused loops, mostly on one thread: about
 * 36 us per SmolLM2 layer at 350 keys. Here each (sequence, head, query) is one task for the thread pool,
 * and each query row is computed the same way whatever the number of queries T, so a verified block
 * scores exactly like single steps (speculative decoding relies on it).
 *
 * Per task, with fp32 arithmetic throughout: s_j = scale * q . k_j for the keys the mask allows (others
 * -inf), p = softmax(s), o = sum_j p_j v_j. Scores are taken 16 keys at a time (16 partial dot products,
 * then one transpose-and-add tree gives their 16 sums in one register), exp is vectorised (exp16). Query head
 * h reads key/value head h / (H / KV) (grouped-query attention). q (B, H, T, hd), k and v (B, KV, S, hd) with
 * rows contiguous along hd (cache views), mask (B, 1, T, S) bool; hd a multiple of 16. Keys in the cache's
 * blocked layout (k 6-D) go to attend_blocked.cpp, which needs no tree.
 */
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "few_queries.h"
#include "ops.h"
#include "vnni.h"

namespace {

inline __m512 load16(const float *p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16 *p) {  // bf16 -> fp32: the high half of each float
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
inline void store16(float *p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16 *p, __m512 v) {  // fp32 -> bf16, round to nearest even
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}

// 16 vectors -> one vector whose lane i is the sum of v[i]'s lanes (a transpose-and-add tree, 45 ops)
inline __m512 sum16(__m512 *v) {
    __m512 a[8], b[4];
    for (int i = 0; i < 8; i++)  // per 128-bit block: [v2i 0+2, v2i+1 0+2, v2i 1+3, v2i+1 1+3]
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  // per 128-bit block: the block sums of v4i .. v4i+3
        b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 e01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
    __m512 e23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(e01, e23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(e01, e23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Pointers and strides of one call (q (B, H, T, hd), k and v (B, KV, S, hd), mask (B, 1, T, S)), and where
// task i = (b, h, t) reads and writes.
template <typename T>
struct Rows {
    const T *q, *k, *v;
    const bool *mask;
    T *out;
    int64_t H, Tq, hd, S, rep, qs0, qs1, qs2, ks0, ks1, ks2, vs0, vs1, vs2, ms0, ms2, ms3;
    Rows(const at::Tensor &q_, const at::Tensor &k_, const at::Tensor &v_, const at::Tensor &m_, at::Tensor &o_)
        : q(q_.const_data_ptr<T>()), k(k_.const_data_ptr<T>()), v(v_.const_data_ptr<T>()),
          mask(m_.const_data_ptr<bool>()), out(o_.data_ptr<T>()), H(q_.size(1)), Tq(q_.size(2)), hd(q_.size(3)),
          S(k_.size(2)), rep(q_.size(1) / k_.size(1)), qs0(q_.stride(0)), qs1(q_.stride(1)), qs2(q_.stride(2)),
          ks0(k_.stride(0)), ks1(k_.stride(1)), ks2(k_.stride(2)), vs0(v_.stride(0)), vs1(v_.stride(1)),
          vs2(v_.stride(2)), ms0(m_.stride(0)), ms2(m_.stride(2)), ms3(m_.stride(3)) {}
    struct Task {
        const T *q, *k, *v;
        const bool *mask;
        T *out;
    };
    Task task(int64_t i) const {
        const int64_t b = i / (H * Tq), h = i / Tq % H, t = i % Tq, g = h / rep;
        return {q + b * qs0 + h * qs1 + t * qs2, k + b * ks0 + g * ks1, v + b * vs0 + g * vs1, mask + b * ms0 + t * ms2,
                out + i * hd};
    }
};

// Scores of keys j0..j0+15 for one task: dot(key row) gives a vector whose lanes sum to q . k; keys the mask
// forbids (or past S) get -inf.
template <typename T, typename Dot>
inline __m512 score16(const Rows<T> &L, const typename Rows<T>::Task &r, int64_t j0, float sc, Dot dot) {
    const __mmask16 allowed = fewq::allowed16(r.mask, L.ms3, L.S, j0);
    const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    if (allowed == 0) return ninf;
    __m512 d[16];
    if (j0 + 16 <= L.S) {  // a whole block: every key's dot product, no branch per key (lanes not allowed are
#pragma GCC unroll 16      // replaced by -inf below, whatever their keys hold)
        for (int jj = 0; jj < 16; jj++) d[jj] = dot(r.k + (j0 + jj) * L.ks2);
    } else {  // the last block: only rows that exist
        for (int64_t jj = 0; jj < 16; jj++)
            d[jj] = (allowed >> jj) & 1 ? dot(r.k + (j0 + jj) * L.ks2) : _mm512_setzero_ps();
    }
    return _mm512_mask_blend_ps(allowed, ninf, _mm512_mul_ps(sum16(d), _mm512_set1_ps(sc)));
}

template <typename T>
void attend_rows(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &mask,
                 double scale, at::Tensor &out) {
    const Rows<T> L(q, k, v, mask, out);
    const int64_t S = L.S, nv = L.hd / 16;
    const float sc = (float)scale, ninf = -std::numeric_limits<float>::infinity();
    at::parallel_for(0, q.size(0) * L.H * L.Tq, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> s((S + 15) / 16 * 16);
        std::vector<__m512> qv(nv), acc(nv);
        for (int64_t i = i0; i < i1; i++) {
            const auto r = L.task(i);
            for (int64_t c = 0; c < nv; c++) qv[c] = load16(r.q + c * 16);
            __m512 mxv = _mm512_set1_ps(ninf);
            const auto dot = [&](const T *kr) {
                __m512 d = _mm512_setzero_ps();
                for (int64_t c = 0; c < nv; c++) d = _mm512_fmadd_ps(qv[c], load16(kr + c * 16), d);
                return d;
            };
            for (int64_t j0 = 0; j0 < S; j0 += 16) {  // scores, 16 keys at a time
                const __m512 sj = score16(L, r, j0, sc, dot);
                _mm512_storeu_ps(s.data() + j0, sj);
                mxv = _mm512_max_ps(mxv, sj);
            }
            const float inv = fewq::exp_weights(s.data(), S, mxv);
            for (int64_t c = 0; c < nv; c++) acc[c] = _mm512_setzero_ps();
            for (int64_t j = 0; j < S; j++) {  // weighted values
                if (s[j] == 0.0f) continue;
                const __m512 p = _mm512_set1_ps(s[j] * inv);
                const T *vr = r.v + j * L.vs2;
                for (int64_t c = 0; c < nv; c++) acc[c] = _mm512_fmadd_ps(p, load16(vr + c * 16), acc[c]);
            }
            for (int64_t c = 0; c < nv; c++) store16(r.out + c * 16, acc[c]);
        }
    });
}

// bf16 with hd % 32 == 0: scores by `vdpbf16ps` (32 exact bf16 products per instruction, summed in fp32),
// values widened without conversions: a 32-bit lane holding two bf16 is the odd element's float once its
// low half is cleared, and the even element's after a shift, so the accumulators hold even and odd columns.
template <int NV>  // hd / 32, a compile-time count: the vector loops unroll and stay in registers
void attend_bf16(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &mask,
                 double scale, at::Tensor &out) {
    using T = at::BFloat16;
    const Rows<T> L(q, k, v, mask, out);
    const int64_t S = L.S, hd = L.hd;
    const float sc = (float)scale, ninf = -std::numeric_limits<float>::infinity();
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    at::parallel_for(0, q.size(0) * L.H * L.Tq, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> s((S + 15) / 16 * 16), even(hd / 2), odd(hd / 2);
        __m512i qv[NV];
        __m512 ae[NV], ao[NV];
        for (int64_t i = i0; i < i1; i++) {
            const auto r = L.task(i);
            for (int c = 0; c < NV; c++) qv[c] = _mm512_loadu_si512((const void *)(r.q + c * 32));
            __m512 mxv = _mm512_set1_ps(ninf);
            const auto dot = [&](const T *kr) {
                __m512 d = _mm512_setzero_ps();
#pragma GCC unroll 8
                for (int c = 0; c < NV; c++)
                    d = _mm512_dpbf16_ps(d, (__m512bh)qv[c], (__m512bh)_mm512_loadu_si512((const void *)(kr + c * 32)));
                return d;
            };
            for (int64_t j0 = 0; j0 < S; j0 += 16) {
                const __m512 sj = score16(L, r, j0, sc, dot);
                _mm512_storeu_ps(s.data() + j0, sj);
                mxv = _mm512_max_ps(mxv, sj);
            }
            const float inv = fewq::exp_weights(s.data(), S, mxv);
            for (int c = 0; c < NV; c++) ae[c] = ao[c] = _mm512_setzero_ps();
            // (masked keys have p = 0: no branch.) With few columns a key's FMAs are short chains: keys
            // alternate between two sets of sums, added at the end, so the chains do not wait on each other
            constexpr int SETS = NV <= 4 ? 2 : 1;
            __m512 be[NV], bo[NV];
            for (int c = 0; c < NV; c++) be[c] = bo[c] = _mm512_setzero_ps();
            const auto add_key = [&](int64_t j, __m512 *e, __m512 *o) {
                const __m512 p = _mm512_set1_ps(s[j] * inv);
                const T *vr = r.v + j * L.vs2;
#pragma GCC unroll 8
                for (int c = 0; c < NV; c++) {
                    const __m512i x = _mm512_loadu_si512((const void *)(vr + c * 32));
                    e[c] = _mm512_fmadd_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), e[c]);
                    o[c] = _mm512_fmadd_ps(p, _mm512_castsi512_ps(_mm512_and_si512(x, high)), o[c]);
                }
            };
            int64_t j = 0;
            if (SETS == 2)
                for (; j + 2 <= S; j += 2) add_key(j, ae, ao), add_key(j + 1, be, bo);
            for (; j < S; j++) add_key(j, ae, ao);
            if (SETS == 2)
                for (int c = 0; c < NV; c++) ae[c] = _mm512_add_ps(ae[c], be[c]), ao[c] = _mm512_add_ps(ao[c], bo[c]);
            for (int c = 0; c < NV; c++) {
                _mm512_storeu_ps(even.data() + c * 16, ae[c]);
                _mm512_storeu_ps(odd.data() + c * 16, ao[c]);
            }
            for (int64_t e = 0; e < hd / 2; e++) r.out[2 * e] = T(even[e]), r.out[2 * e + 1] = T(odd[e]);
        }
    });
}

}  // namespace

// q (B, H, T, hd), k, v (B, KV, S, hd), mask (B, 1, T, S) bool -> (B, H, T, hd) contiguous, q's dtype
at::Tensor attend(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &mask,
                  double scale) {
    if (k.dim() == 6) return attend_blocked(q, k, v, mask, scale);  // keys in blocks of 16 slots
    TORCH_CHECK(q.size(3) % 16 == 0 && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
                "attend: head dim must be a multiple of 16 with contiguous rows");
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "attend: dtypes differ");
    at::Tensor out = at::empty(q.sizes(), q.options());
    const int64_t hd = q.size(3);
    if (q.scalar_type() == at::kBFloat16 && (hd == 64 || hd == 128 || hd == 256)) {
        if (hd == 64) attend_bf16<2>(q, k, v, mask, scale, out);
        if (hd == 128) attend_bf16<4>(q, k, v, mask, scale, out);
        if (hd == 256) attend_bf16<8>(q, k, v, mask, scale, out);
    } else if (q.scalar_type() == at::kBFloat16) {
        attend_rows<at::BFloat16>(q, k, v, mask, scale, out);
    } else {
        TORCH_CHECK(q.scalar_type() == at::kFloat, "attend: bf16 or fp32 only");
        attend_rows<float>(q, k, v, mask, scale, out);
    }
    return out;
}

TORCH_LIBRARY_FRAGMENT(leanlm_native, m) {
    m.def("attend(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(leanlm_native, CPU, m) { m.impl("attend", attend); }
#endif
