/* The operators of the other kernel files, for C++ callers in the same library (decode.cpp calls them directly,
 * skipping the dispatcher). Defined only where the CPU has AVX-512 with VNNI and BF16 (see each file). */
#pragma once

#include <ATen/core/Tensor.h>

// int4_vnni.cpp: x (M, K) -> (M, N) in x's dtype, w in the tiled 4-bit layout with fp16 scales and minimums
at::Tensor int4_mm(const at::Tensor &x, const at::Tensor &w, const at::Tensor &scales, const at::Tensor &mins);
// int8_head.cpp: x (M, K) -> (M, N) fp32, w uint8 codes + 128 in the tiled layout, scales (N,) bf16
at::Tensor int8_mm(const at::Tensor &x, const at::Tensor &w, const at::Tensor &scales);
// attention.cpp: q (B, H, T, hd), k, v (B, KV, S, hd), mask (B, 1, T, S) -> (B, H, T, hd) contiguous
at::Tensor attend(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &mask, double scale);
// attend_blocked.cpp: the same with keys in blocks of 16 slots, k (B, KV, S16 / 16, hd / 2, 16, 2): pair of dims,
// slot (cache.py's blocked key layout); S from the mask (attend calls it)
at::Tensor attend_blocked(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &mask,
                          double scale);
// attend_int8.cpp: the same over an int8 cache (kv_int8.py): k (B, KV, S16 / 16, hd / 4, 16, 4) uint8, scales
// (B, KV, S16) fp32, v (B, KV, S16, hd) int8
at::Tensor attend_int8(const at::Tensor &q, const at::Tensor &k, const at::Tensor &k_scale, const at::Tensor &v,
                       const at::Tensor &v_scale, const at::Tensor &mask, double scale);
// Are k's shape and strides those of blocked keys for B sequences, KV heads, S slots (or more), head dim hd?
inline bool blocked_keys_ok(const at::Tensor &k, int64_t B, int64_t KV, int64_t S, int64_t hd) {
    return k.dim() == 6 && k.size(0) == B && k.size(1) == KV && k.size(2) * 16 >= S && k.size(3) == hd / 2 &&
           k.size(4) == 16 && k.size(5) == 2 && k.stride(2) == 16 * hd && k.stride(3) == 32 && k.stride(4) == 2 &&
           k.stride(5) == 1;
}
