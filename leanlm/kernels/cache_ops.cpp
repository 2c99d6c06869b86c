/* The K/V cache's writes and reads as torch operators, for prompts (decode steps write inside decode.cpp), in
 * any of cache.h's layouts:
 *   leanlm_native::cache_write(cache, slots, k, v)  k, v (B, KV, T, hd) bf16 stored at slots (B, T), as
 *                                                    KVBuffer.write / Int8KVBuffer.write do in PyTorch
 *   leanlm_native::cache_rows(cache, n) -> (k, v)   an int8 cache's first n slots dequantized to bf16 rows
 *                                                    (B, KV, n, hd), as Int8KVBuffer.view does in PyTorch
 * Why: in PyTorch these are ~20 small operations a layer (quantize, scatter, dequantize), about a quarter of a
 * 256-token prompt's time with an int8 cache; here one pass over the rows on the thread pool. Same bits.
 */
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "cache.h"

namespace {

using bf16 = at::BFloat16;

void cache_write(const std::vector<at::Tensor> &cache, const at::Tensor &slots, const at::Tensor &k,
                 const at::Tensor &v) {
    const int64_t B = k.size(0), KV = k.size(1), T = k.size(2), hd = k.size(3);
    TORCH_CHECK((cache.size() == 2 || cache.size() == 4) && k.scalar_type() == at::kBFloat16 &&
                v.scalar_type() == at::kBFloat16 && v.sizes() == k.sizes() && k.stride(3) == 1 && v.stride(3) == 1 &&
                slots.scalar_type() == at::kLong && slots.size(0) == B && slots.size(1) == T,
                "cache_write: k, v (B, KV, T, hd) bf16 with contiguous rows, slots (B, T) int64");
    const kvcache::Layer layer(cache, hd);
    TORCH_CHECK(layer.k().size(0) == B && layer.k().size(1) == KV && layer.v().size(3) == hd && hd % 16 == 0,
                "cache_write: the cache does not match k and v");
    const at::Tensor sl = slots.contiguous();
    const int64_t *sp = sl.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < B * T; i++) TORCH_CHECK(sp[i] >= 0 && sp[i] < layer.S, "cache_write: slot out of range");
    const bf16 *kp = k.const_data_ptr<bf16>(), *vp = v.const_data_ptr<bf16>();
    at::parallel_for(0, B * KV * T, 64, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; i++) {
            const int64_t b = i / (KV * T), g = i / T % KV, t = i % T, slot = sp[b * T + t];
            layer.key(b, g, slot, kp + b * k.stride(0) + g * k.stride(1) + t * k.stride(2));
            layer.value(b, g, slot, vp + b * v.stride(0) + g * v.stride(1) + t * v.stride(2));
        }
    });
}

std::tuple<at::Tensor, at::Tensor> cache_rows(const std::vector<at::Tensor> &cache, int64_t n) {
    TORCH_CHECK(cache.size() == 4, "cache_rows: an int8 cache (k, k_scale, v, v_scale)");
    const at::Tensor &k = cache[0], &ks = cache[1], &v = cache[2], &vs = cache[3];
    const int64_t B = v.size(0), KV = v.size(1), hd = v.size(3);
    TORCH_CHECK(n >= 0 && n <= v.size(2) && k.dim() == 6 && v.stride(3) == 1 && ks.stride(2) == 1 &&
                vs.stride(2) == 1, "cache_rows: bad cache");
    const auto opts = at::TensorOptions().dtype(at::kBFloat16);
    at::Tensor ko = at::empty({B, KV, n, hd}, opts), vo = at::empty({B, KV, n, hd}, opts);
    bf16 *kd = ko.data_ptr<bf16>(), *vd = vo.data_ptr<bf16>();
    at::parallel_for(0, B * KV * n, 64, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; i++) {
            const int64_t b = i / (KV * n), g = i / n % KV, s = i % n;
            const uint8_t *blk = k.const_data_ptr<uint8_t>() + b * k.stride(0) + g * k.stride(1) + s / 16 * 16 * hd +
                                 s % 16 * 4;
            const int8_t *vr = v.const_data_ptr<int8_t>() + b * v.stride(0) + g * v.stride(1) + s * v.stride(2);
            const float sk = ks.const_data_ptr<float>()[b * ks.stride(0) + g * ks.stride(1) + s];
            const float sv = vs.const_data_ptr<float>()[b * vs.stride(0) + g * vs.stride(1) + s];
            for (int64_t d = 0; d < hd; d++) {  // (code - 128) * s rounded to bf16, as (k.float() - 128) * s
                kd[i * hd + d] = bf16(((float)blk[d / 4 * 64 + d % 4] - 128.0f) * sk);
                vd[i * hd + d] = bf16((float)vr[d] * sv);
            }
        }
    });
    return {ko, vo};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanlm_native, m) {
    m.def("cache_write(Tensor(a!)[] cache, Tensor slots, Tensor k, Tensor v) -> ()");
    m.def("cache_rows(Tensor[] cache, int n) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(leanlm_native, CPU, m) {
    m.impl("cache_write", cache_write);
    m.impl("cache_rows", cache_rows);
}
#endif
