/* Attention for a few queries per sequence (a decode step, a speculative block) on AVX-512, as a torch
 * operator (leanlm_native::attend); model.py's `_few_query_attention` calls it where it is available.
 *
 * Inside a compiled decode step the same math ran as inductor's fused loops, mostly on one thread: about
 * 36 us per SmolLM2 layer at 350 keys. Here each (sequence, head, query) is one task for the thread pool,
 * and each query row is computed the same way whatever the number of queries T, so a verified block
 * scores exactly like single steps (speculative decoding relies on it).
 *
 * Per task, with fp32 arithmetic throughout: s_j = scale * q . k_j for the keys the mask allows (others
 * -inf), p = softmax(s), o = sum_j p_j v_j. Query head h reads key/value head h / (H / KV) (grouped-query
 * attention). q (B, H, T, hd), k and v (B, KV, S, hd) with rows contiguous along hd (cache views), mask
 * (B, 1, T, S) bool; hd a multiple of 16.
 */
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

namespace {

inline __m512 load16(const float *p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16 *p) {  // bf16 -> fp32: the high half of each float
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
inline void store16(float *p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16 *p, __m512 v) {  // fp32 -> bf16, round to nearest even
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}

template <typename T>
void attend_rows(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &mask,
                 double scale, at::Tensor &out) {
    const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), hd = q.size(3), KV = k.size(1), S = k.size(2);
    const int64_t rep = H / KV, nv = hd / 16;
    const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
    const bool *mp = mask.const_data_ptr<bool>();
    T *op = out.data_ptr<T>();
    const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
    const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
    const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
    const int64_t ms0 = mask.stride(0), ms2 = mask.stride(2), ms3 = mask.stride(3);
    const float sc = (float)scale, ninf = -std::numeric_limits<float>::infinity();
    at::parallel_for(0, B * H * Tq, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> s(S);
        std::vector<__m512> qv(nv), acc(nv);
        for (int64_t i = i0; i < i1; i++) {
            const int64_t b = i / (H * Tq), h = i / Tq % H, t = i % Tq, g = h / rep;
            const T *qr = qp + b * qs0 + h * qs1 + t * qs2;
            for (int64_t c = 0; c < nv; c++) qv[c] = load16(qr + c * 16);
            const T *kb = kp + b * ks0 + g * ks1, *vb = vp + b * vs0 + g * vs1;
            const bool *mr = mp + b * ms0 + t * ms2;
            float mx = ninf;
            for (int64_t j = 0; j < S; j++) {  // scores
                if (!mr[j * ms3]) {
                    s[j] = ninf;
                    continue;
                }
                const T *kr = kb + j * ks2;
                __m512 d = _mm512_mul_ps(qv[0], load16(kr));
                for (int64_t c = 1; c < nv; c++) d = _mm512_fmadd_ps(qv[c], load16(kr + c * 16), d);
                s[j] = _mm512_reduce_add_ps(d) * sc;
                mx = s[j] > mx ? s[j] : mx;
            }
            float sum = 0.0f;
            for (int64_t j = 0; j < S; j++) {
                s[j] = s[j] == ninf ? 0.0f : std::exp(s[j] - mx);
                sum += s[j];
            }
            const float inv = sum > 0 ? 1.0f / sum : 0.0f;
            for (int64_t c = 0; c < nv; c++) acc[c] = _mm512_setzero_ps();
            for (int64_t j = 0; j < S; j++) {  // weighted values
                if (s[j] == 0.0f) continue;
                const __m512 p = _mm512_set1_ps(s[j] * inv);
                const T *vr = vb + j * vs2;
                for (int64_t c = 0; c < nv; c++) acc[c] = _mm512_fmadd_ps(p, load16(vr + c * 16), acc[c]);
            }
            T *orow = op + ((b * H + h) * Tq + t) * hd;
            for (int64_t c = 0; c < nv; c++) store16(orow + c * 16, acc[c]);
        }
    });
}

}  // namespace

// q (B, H, T, hd), k, v (B, KV, S, hd), mask (B, 1, T, S) bool -> (B, H, T, hd) contiguous, q's dtype
at::Tensor attend(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &mask,
                  double scale) {
    TORCH_CHECK(q.size(3) % 16 == 0 && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
                "attend: head dim must be a multiple of 16 with contiguous rows");
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "attend: dtypes differ");
    at::Tensor out = at::empty(q.sizes(), q.options());
    if (q.scalar_type() == at::kBFloat16) {
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
