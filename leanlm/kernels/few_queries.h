/* What the attention kernels for a few queries per sequence share (attention.cpp, attend_blocked.cpp,
 * attend_int8.cpp; flash.cpp reads its mask the same way): a mask row's bits for 16 keys, the softmax weights
 * of a row of scores, and the split of a call into tasks of one sequence, one key/value head and up to
 * MAX_ROWS of the query rows that read it (the head's query heads times the T queries).
 */
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "vnni.h"

namespace fewq {

constexpr int KB = 16, MAX_ROWS = 4;  // keys per block, query rows per task at most

// Which of keys s0 .. s0 + 15 a query may see, as 16 bits: its mask row m (ms3 apart per key), none past S.
inline __mmask16 allowed16(const bool *m, int64_t ms3, int64_t S, int64_t s0) {
    if (ms3 == 1 && s0 + KB <= S)
        return _mm_cmpneq_epi8_mask(_mm_loadu_si128((const __m128i *)(m + s0)), _mm_setzero_si128());
    __mmask16 bits = 0;
    for (int j = 0; j < KB && s0 + j < S; j++) bits |= (__mmask16)((m[(s0 + j) * ms3] ? 1u : 0u) << j);
    return bits;
}

// s[0..S16) holds one row's scores (-inf where masked, S16 a multiple of 16) and mxv their running maximum:
// s becomes exp(s - max) (0 where masked); returns 1 / sum (0 for a row that sees no key).
inline float exp_weights(float *s, int64_t S16, __m512 mxv) {
    const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mxv));
    __m512 sumv = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < S16; j0 += 16) {
        const __m512 sj = _mm512_loadu_ps(s + j0);
        const __mmask16 live = _mm512_cmp_ps_mask(sj, ninf, _CMP_NEQ_OQ);
        const __m512 e = _mm512_maskz_mov_ps(live, vnni::exp16(_mm512_sub_ps(sj, mx)));
        _mm512_storeu_ps(s + j0, e);
        sumv = _mm512_add_ps(sumv, e);
    }
    const float sum = _mm512_reduce_add_ps(sumv);
    return sum > 0 ? 1.0f / sum : 0.0f;
}

// Calls run(b, g, r0, nr, scratch) on the thread pool for every task: rows r0 .. r0 + nr - 1 of the R query
// rows of key/value head g of sequence b; scratch holds MAX_ROWS * S16 floats (S16: S rounded up to 16). A
// task takes as many rows as share a key/value head, up to MAX_ROWS, fewer where that leaves under two tasks
// a thread (SmolLM2 at batch 1: 3 heads of 3 rows -> 6 tasks of 2 and 1 rows).
template <typename F>
void row_tasks(int64_t B, int64_t KV, int64_t R, int64_t S, const F &run) {
    const int64_t threads = at::get_num_threads();
    int64_t nr = std::min<int64_t>(MAX_ROWS, R);
    while (nr > 1 && B * KV * ((R + nr - 1) / nr) < 2 * threads) nr--;
    const int64_t per = (R + nr - 1) / nr, S16 = (S + KB - 1) / KB * KB;
    at::parallel_for(0, B * KV * per, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> scratch(MAX_ROWS * S16);
        for (int64_t i = i0; i < i1; i++) {
            const int64_t bg = i / per, r0 = i % per * nr;
            run(bg / KV, bg % KV, r0, (int)std::min(nr, R - r0), scratch.data());
        }
    });
}

// f(HD, NR) with both as std::integral_constant (compile-time sizes for a task's registers): head dim 64, 128
// or 256, 1 to MAX_ROWS rows
template <typename F>
inline void with_sizes(int64_t hd, int nr, const F &f) {
    const auto rows = [&](auto HD) {
        switch (nr) {
            case 1: f(HD, std::integral_constant<int, 1>{}); break;
            case 2: f(HD, std::integral_constant<int, 2>{}); break;
            case 3: f(HD, std::integral_constant<int, 3>{}); break;
            default: f(HD, std::integral_constant<int, MAX_ROWS>{}); break;
        }
    };
    if (hd == 64) rows(std::integral_constant<int, 64>{});
    else if (hd == 128) rows(std::integral_constant<int, 128>{});
    else rows(std::integral_constant<int, 256>{});
}

}  // namespace fewq
