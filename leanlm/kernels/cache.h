/* One layer's K/V cache as decode.cpp sees it: where a head's new key and value rows go at a slot, and which
 * attention kernel reads the layout. The three layouts of cache.py / kv_int8.py:
 *   rows     k, v (B, KV, S, hd) bf16
 *   blocked  k (B, KV, S / 16, hd / 2, 16, 2) bf16: pair d of slot s is word d * 16 + s % 16 of block s / 16
 *   int8     k (B, KV, S / 16, hd / 4, 16, 4) uint8 (code + 128): dims 4d..4d+3 of slot s are word d * 16 + s % 16
 *            of block s / 16; k_scale (B, KV, S) fp32; v (B, KV, S, hd) int8; v_scale (B, KV, S) fp32
 * int8 codes: code = round(x / s), s = max |x| / 127 (0 for a row of zeros), as kv_int8.quantize_rows.
 */
#pragma once

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "ops.h"

namespace kvcache {

using bf16 = at::BFloat16;

// row (hd, a multiple of 16) -> codes and scale, as kv_int8.quantize_rows computes them (IEEE division and
// round-to-nearest-even in every lane, as torch's)
inline float quantize_row(const bf16 *row, int64_t hd, int8_t *codes) {
    const auto load16 = [&](int64_t d) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(row + d));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    };
    __m512 amax = _mm512_setzero_ps();
    for (int64_t d = 0; d < hd; d += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(d)));
    const float s = _mm512_reduce_max_ps(amax) / 127.0f;
    const __m512 sv = _mm512_set1_ps(s);
    for (int64_t d = 0; d < hd; d += 16) {
        const __m512i c = s > 0 ? _mm512_cvtps_epi32(_mm512_div_ps(load16(d), sv)) : _mm512_setzero_si512();
        _mm_storeu_si128((__m128i *)(codes + d), _mm512_cvtepi32_epi8(c));
    }
    return s;
}

struct Layer {
    std::vector<at::Tensor> t;  // k, v (rows, blocked) or k, k_scale, v, v_scale (int8)
    bool blocked, int8;
    int64_t S, hd;
    explicit Layer(std::vector<at::Tensor> tensors, int64_t head_dim)
        : t(std::move(tensors)), blocked(t[0].dim() == 6), int8(t.size() == 4), S(t[int8 ? 2 : 1].size(2)),
          hd(head_dim) {
        TORCH_CHECK(!blocked || (hd <= 256 && hd % 16 == 0), "Decoder: blocked keys need a head dim of 16k <= 256");
    }
    const at::Tensor &k() const { return t[0]; }
    const at::Tensor &v() const { return t[int8 ? 2 : 1]; }

    // store head g's key row (hd bf16) of sequence b at slot
    void key(int64_t b, int64_t g, int64_t slot, const bf16 *row) const {
        const at::Tensor &k = t[0];
        if (int8) {
            int8_t codes[256];
            t[1].data_ptr<float>()[b * t[1].stride(0) + g * t[1].stride(1) + slot] = quantize_row(row, hd, codes);
            uint8_t *blk =
                k.data_ptr<uint8_t>() + b * k.stride(0) + g * k.stride(1) + slot / 16 * 16 * hd + slot % 16 * 4;
            for (int64_t w = 0; w < hd / 4; w++) {  // 4 codes a word, each + 128 (flipping the top bit)
                uint32_t word;
                std::memcpy(&word, codes + 4 * w, 4);
                word ^= 0x80808080u;
                std::memcpy(blk + w * 64, &word, 4);
            }
        } else if (blocked) {
            bf16 *blk = k.data_ptr<bf16>() + b * k.stride(0) + g * k.stride(1) + slot / 16 * 16 * hd + slot % 16 * 2;
            for (int64_t d = 0; d < hd / 2; d++) std::memcpy(blk + d * 32, row + 2 * d, 2 * sizeof(bf16));
        } else {
            std::memcpy(k.data_ptr<bf16>() + b * k.stride(0) + g * k.stride(1) + slot * k.stride(2), row,
                        hd * sizeof(bf16));
        }
    }
    // store head g's value row of sequence b at slot
    void value(int64_t b, int64_t g, int64_t slot, const bf16 *row) const {
        const at::Tensor &v = this->v();
        if (int8) {
            int8_t *dst = v.data_ptr<int8_t>() + b * v.stride(0) + g * v.stride(1) + slot * v.stride(2);
            t[3].data_ptr<float>()[b * t[3].stride(0) + g * t[3].stride(1) + slot] = quantize_row(row, hd, dst);
        } else {
            std::memcpy(v.data_ptr<bf16>() + b * v.stride(0) + g * v.stride(1) + slot * v.stride(2), row,
                        hd * sizeof(bf16));
        }
    }
    // attention of q (B, H, T, hd) over the first n slots, mask (B, 1, T, n) -> (B, H, T, hd)
    at::Tensor attend(const at::Tensor &q, const at::Tensor &mask, int64_t n, double scale) const {
        if (int8) return attend_int8(q, t[0].slice(2, 0, (n + 15) / 16), t[1], t[2], t[3], mask, scale);
        return ::attend(q, t[0].slice(2, 0, blocked ? (n + 15) / 16 : n), t[1].slice(2, 0, n), mask, scale);
    }
};

}  // namespace kvcache
