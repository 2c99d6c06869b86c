/* model.py's RMSNorm and gated activation on bf16 rows as torch operators (leanlm_native::rms_norm, ::gated):
 * the same row code as the decode step (rows.h), so a prompt's rows and a decoded token's are computed alike.
 * Eager PyTorch spent ~10% of a Gemma 3 prompt in these (an fp32 norm with its casts, a scalar-heavy bf16 gelu).
 */
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanlm_native, m) {
    m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
    m.def("gated(Tensor g, Tensor u, int kind) -> Tensor");
}
TORCH_LIBRARY_IMPL(leanlm_native, CPU, m) {
    m.impl("rms_norm", rms_norm);
    m.impl("gated", gated);
}
#endif
