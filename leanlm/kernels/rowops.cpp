/* model.py's RMSNorm and gated activation on bf16 rows as torch operators (leanlm_native::rms_norm, ::gated):
 * the same row code as the decode step (rows.h), so a prompt's rows and a decoded token's are computed alike.
 * Eager PyTorch spent ~10% of a Gemma 3 prompt in these (an fp32 norm with its casts, a scalar-heavy bf16 gelu).
 */
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <limits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "rows.h"

namespace {

// x (..., D) bf16, w (D,) fp32 -> x / sqrt(mean(x^2) + eps) * w, bf16
at::Tensor rms_norm(const at::Tensor &x, const at::Tensor &w, double eps) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kFloat && w.dim() == 1 &&
                x.size(-1) == w.size(0), "rms_norm: bf16 rows and fp32 weights");
    const at::Tensor xc = x.contiguous(), wc = w.contiguous();
    at::Tensor y = at::empty(x.sizes(), xc.options());
    const int64_t D = w.size(0), M = x.numel() / D;
    const auto *xp = xc.const_data_ptr<rows::bf16>();
    auto *yp = y.data_ptr<rows::bf16>();
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; m++) rows::rms_norm(xp + m * D, wc.const_data_ptr<float>(), (float)eps, D, yp + m * D);
    });
    return y;
}

// g, u (..., F) bf16 -> act(g) * u, each rounded to bf16 (kind 0: silu, 1: gelu with the tanh approximation)
at::Tensor gated(const at::Tensor &g, const at::Tensor &u, int64_t kind) {
    TORCH_CHECK(g.scalar_type() == at::kBFloat16 && u.scalar_type() == at::kBFloat16 && g.sizes() == u.sizes(),
                "gated: bf16 tensors of one shape");
    const at::Tensor gc = g.contiguous(), uc = u.contiguous();
    at::Tensor h = at::empty(g.sizes(), gc.options());
    const int64_t F = g.size(-1), M = g.numel() / F;
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; m++)
            rows::gated(gc.const_data_ptr<rows::bf16>() + m * F, uc.const_data_ptr<rows::bf16>() + m * F,
                        h.data_ptr<rows::bf16>() + m * F, F, kind);
    });
    return h;
}

// x (B, V) fp32 -> (B,) int64: the index of each row's maximum, the first one on ties (torch.argmax's rule).
// torch.argmax went through Gemma 3's 262144 logits at ~1.2 G a second (0.22 ms, 2.5% of a decode step); here
// 16 lanes keep their own first maximum and the smallest index among the lanes holding the row's wins.
// A row with a NaN is left to torch.argmax (which picks the first NaN).
at::Tensor argmax(const at::Tensor &x) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) > 0, "argmax: (B, V) fp32 logits");
    const at::Tensor xc = x.contiguous();
    const int64_t B = x.size(0), V = x.size(1);
    at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
    for (int64_t b = 0; b < B; b++) {
        const float *r = xc.const_data_ptr<float>() + b * V;
        __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        __m512i at = _mm512_set1_epi32(0), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __mmask16 nan = 0;
        const __m512i step = _mm512_set1_epi32(16);
        int64_t v = 0;
        for (; v + 16 <= V; v += 16, idx = _mm512_add_epi32(idx, step)) {
            const __m512 xv = _mm512_loadu_ps(r + v);
            const __mmask16 gt = _mm512_cmp_ps_mask(xv, best, _CMP_GT_OQ);
            nan |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
            best = _mm512_mask_mov_ps(best, gt, xv), at = _mm512_mask_mov_epi32(at, gt, idx);
        }
        alignas(64) float bv[16];
        alignas(64) int32_t bi[16];
        _mm512_store_ps(bv, best), _mm512_store_si512((void *)bi, at);
        float m = bv[0];
        int64_t i = bi[0];
        for (int l = 1; l < 16; l++)
            if (bv[l] > m || (bv[l] == m && bi[l] < i)) m = bv[l], i = bi[l];
        for (; v < V; v++) {
            if (r[v] != r[v]) nan = 1;
            if (r[v] > m) m = r[v], i = v;
        }
        if (nan != 0 || V > INT32_MAX) i = xc[b].argmax().item<int64_t>();
        out.data_ptr<int64_t>()[b] = i;
    }
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanlm_native, m) {
    m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
    m.def("gated(Tensor g, Tensor u, int kind) -> Tensor");
    m.def("argmax(Tensor x) -> Tensor");
}
TORCH_LIBRARY_IMPL(leanlm_native, CPU, m) {
    m.impl("rms_norm", rms_norm);
    m.impl("gated", gated);
    m.impl("argmax", argmax);
}
#endif
