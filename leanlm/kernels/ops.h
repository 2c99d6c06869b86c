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
