/* Attention for prompts (many queries per sequence) on AVX-512 BF16, as a torch operator
 * (leanlm_native::flash_attend); model.py calls it for more than FEW_QUERIES queries where it is available.
 *
 * Why: PyTorch's CPU flash attention takes an explicit mask as it comes and computes every (query, key)
 * pair, so a chunk of a long prompt paid for the keys of the whole rolling buffer on Gemma 3's sliding layers
 * and for the masked half of the causal ones: at 2048 tokens it took as long as all the weight matmuls.
 * Here the mask is read per block of 16 queries x 16 keys: a block with no allowed pair is skipped, one with
 * all pairs allowed is not masked element by element. The mask stays the one rule (cache.py) for causal,
 * sliding-window, rolling-buffer and batch-padding cases.
 *
 * Layout: queries in the 16 lanes of a vector. A task is one sequence, one head and 16 queries:
 *   scores   S^T[j] (lanes q) = sum over pairs d of dpbf16(Qp[d], broadcast(k_j[2d], k_j[2d + 1]))
 * with Qp the task's 16 queries packed as bf16 pairs per lane, and each key row read in place (no transpose);
 *   values   O^T[d] (lanes q) += sum over key pairs i of dpbf16(Pp[i], broadcast(v_2i[d], v_2i+1[d]))
 * with Pp the block's probabilities as bf16 pairs (rounded to bf16 for this product, as PyTorch's and the
 * flash-attention papers' kernels do) and V packed once per call as pairs of rows: word (i, d) holds
 * v_2i[d] in its low half and v_2i+1[d] in its high half. E.g. keys 6 and 7, column 3: pair row 3, word 3.
 * The softmax is the online one: per block, m' = max(m, block max), O and l scaled by e^(m - m'), p = e^(s - m').
 * q (B, H, T, hd) with rows contiguous along hd; k, v (B, KV, S, hd) cache views, or k in the cache's blocked
 * layout (B, KV, S16 / 16, hd / 2, 16, 2), whose pairs of dims are read in place the same way; mask (B, 1, T, S) bool;
 * hd one of 64, 96, 128, 256. Output (B, H, T, hd) bf16 as a view of (B, T, H, hd) memory, which is the layout
 * the output projection reads. A query with no allowed key gets zeros.
 */
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "few_queries.h"
#include "ops.h"
#include "vnni.h"

namespace {

using bf16 = at::BFloat16;
constexpr int QB = 16, KB = 16;  // queries per task (one per lane), keys per block

struct Call {
    const bf16 *q, *k;
    const bool *mask;
    const uint32_t *vp;  // packed values (B, KV, S2 / 2, hd) words, S2 = S rounded up to KB
    bf16 *out;           // (B, T, H, hd)
    int64_t H, T, S, S2, rep, qs0, qs1, qs2, ks0, ks1, ks2, ms0, ms2, ms3, KV;
    float scale;
    bool blocked;  // keys in blocks of 16 slots (cache.py): pair d of slot s at block s / 16, word d * 16 + s % 16
    // where key s's dims start, and how far apart (in bf16) its pairs of dims lie
    const bf16 *key(int64_t b, int64_t g, int64_t s) const {
        const bf16 *base = k + b * ks0 + g * ks1;
        return blocked ? base + s / 16 * 16 * ks2 + s % 16 * 2 : base + s * ks2;  // blocked: ks2 = hd
    }
    int64_t pair_step() const { return blocked ? 32 : 2; }
};

// Which of keys s0 .. s0 + 15 query t of sequence b may see, as 16 bits (none past S).
inline uint16_t row_bits(const Call &c, int64_t b, int64_t t, int64_t s0) {
    return fewq::allowed16(c.mask + b * c.ms0 + t * c.ms2, c.ms3, c.S, s0);
}

template <int HD>
void task(const Call &c, int64_t b, int64_t h, int64_t t0) {
    static const bf16 zero_row[256] = {};
    const float ninf = -std::numeric_limits<float>::infinity();
    const int64_t g = h / c.rep, nq = std::min<int64_t>(QB, c.T - t0);
    alignas(64) uint32_t qp[HD / 2][QB];  // the 16 queries as bf16 pairs, query q in lane q
    for (int q = 0; q < QB; q++) {
        const bf16 *src = q < nq ? c.q + b * c.qs0 + h * c.qs1 + (t0 + q) * c.qs2 : zero_row;
        for (int d = 0; d < HD / 2; d++) std::memcpy(&qp[d][q], src + 2 * d, 4);
    }
    alignas(64) float ot[HD][QB] = {};  // O^T: column d of the 16 output rows
    __m512 m = _mm512_set1_ps(ninf), l = _mm512_setzero_ps();
    const uint32_t *vbase = c.vp + (b * c.KV + g) * (c.S2 / 2) * HD;
    const __m512 sc = _mm512_set1_ps(c.scale), ninfv = _mm512_set1_ps(ninf);
    const __m512i pair_idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t s0 = 0; s0 < c.S; s0 += KB) {
        uint16_t rows[QB] = {}, any = 0, all = 0xFFFF;
        for (int q = 0; q < QB; q++) {
            rows[q] = q < nq ? row_bits(c, b, t0 + q, s0) : 0;
            any |= rows[q], all &= rows[q];
        }
        if (any == 0) continue;  // nothing this block of queries may see here
        const bf16 *kr[KB];
        for (int j = 0; j < KB; j++)  // (a blocked buffer holds whole blocks: no row past them)
            kr[j] = s0 + j < c.S || c.blocked ? c.key(b, g, s0 + j) : zero_row;
        const int64_t step = c.pair_step();
        __m512 s[KB];
        for (int j = 0; j < KB; j++) s[j] = _mm512_setzero_ps();
        for (int d = 0; d < HD / 2; d++) {  // S^T = K Q^T, 32 products per instruction
            const __m512bh qv = (__m512bh)_mm512_load_si512((const void *)qp[d]);
#pragma GCC unroll 16
            for (int j = 0; j < KB; j++) {
                int32_t kk;
                std::memcpy(&kk, kr[j] + step * d, 4);
                s[j] = _mm512_dpbf16_ps(s[j], qv, (__m512bh)_mm512_set1_epi32(kk));
            }
        }
        __mmask16 cols[KB];  // per key, the queries that may see it (the rows' bits transposed)
        for (int j = 0; j < KB; j++) {
            if (all == 0xFFFF) {
                cols[j] = 0xFFFF;
                continue;
            }
            uint32_t bits = 0;
            for (int q = 0; q < QB; q++) bits |= ((rows[q] >> j) & 1u) << q;
            cols[j] = (__mmask16)bits;
        }
        __m512 bm = ninfv;
        for (int j = 0; j < KB; j++) {
            s[j] = _mm512_mask_mul_ps(ninfv, cols[j], s[j], sc);
            bm = _mm512_max_ps(bm, s[j]);
        }
        const __m512 mn = _mm512_max_ps(m, bm);
        const __mmask16 seen = _mm512_cmp_ps_mask(m, ninfv, _CMP_NEQ_OQ);
        const __m512 alpha = _mm512_maskz_mov_ps(seen, vnni::exp16(_mm512_sub_ps(m, mn)));
        __m512 psum = _mm512_setzero_ps();
        __m512i pp[KB / 2];
        for (int i = 0; i < KB / 2; i++) {
            const __m512 p0 = _mm512_maskz_mov_ps(cols[2 * i], vnni::exp16(_mm512_sub_ps(s[2 * i], mn)));
            const __m512 p1 = _mm512_maskz_mov_ps(cols[2 * i + 1], vnni::exp16(_mm512_sub_ps(s[2 * i + 1], mn)));
            psum = _mm512_add_ps(psum, _mm512_add_ps(p0, p1));
            pp[i] = _mm512_permutexvar_epi16(pair_idx, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
        }
        l = _mm512_fmadd_ps(l, alpha, psum);
        m = mn;
        const uint32_t *vb = vbase + (s0 / 2) * HD;
#pragma GCC unroll 4
        for (int d = 0; d < HD; d++) {  // O^T = O^T * alpha + V^T P^T
            __m512 acc = _mm512_mul_ps(_mm512_load_ps(ot[d]), alpha);
#pragma GCC unroll 8
            for (int i = 0; i < KB / 2; i++)
                acc = _mm512_dpbf16_ps(acc, (__m512bh)pp[i], (__m512bh)_mm512_set1_epi32((int)vb[i * HD + d]));
            _mm512_store_ps(ot[d], acc);
        }
    }
    const __mmask16 live = _mm512_cmp_ps_mask(l, _mm512_setzero_ps(), _CMP_GT_OQ);
    const __m512 inv = _mm512_maskz_div_ps(live, _mm512_set1_ps(1.0f), l);
    alignas(64) float col[QB];
    bf16 *o = c.out + (b * c.T + t0) * c.H * HD + h * HD;
    for (int d = 0; d < HD; d++) {
        _mm512_store_ps(col, _mm512_mul_ps(_mm512_load_ps(ot[d]), inv));
        for (int q = 0; q < nq; q++) o[q * c.H * HD + d] = bf16(col[q]);
    }
}

// V (B, KV, S, hd) -> words (B, KV, S2 / 2, hd): word (i, d) = v[2i][d] | v[2i + 1][d] << 16, zeros past S.
at::Tensor pack_values(const at::Tensor &v, int64_t S2) {
    const int64_t B = v.size(0), KV = v.size(1), S = v.size(2), hd = v.size(3);
    at::Tensor vp = at::empty({B, KV, S2 / 2, hd}, v.options().dtype(at::kInt));
    const uint16_t *src = reinterpret_cast<const uint16_t *>(v.const_data_ptr());
    uint32_t *dst = reinterpret_cast<uint32_t *>(vp.data_ptr());
    const int64_t s0 = v.stride(0), s1 = v.stride(1), s2 = v.stride(2);
    at::parallel_for(0, B * KV * (S2 / 2), 64, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; i++) {
            const int64_t bg = i / (S2 / 2), r = 2 * (i % (S2 / 2));
            const uint16_t *a = src + bg / KV * s0 + bg % KV * s1 + r * s2, *n = a + s2;
            uint32_t *w = dst + i * hd;
            for (int64_t d = 0; d < hd; d++)
                w[d] = (r < S ? a[d] : 0u) | (uint32_t)(r + 1 < S ? n[d] : 0u) << 16;
        }
    });
    return vp;
}

}  // namespace

at::Tensor flash_attend(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &mask,
                        double scale) {
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), hd = q.size(3), KV = v.size(1), S = v.size(2);
    const bool blocked = k.dim() == 6;  // (B, KV, S16 / 16, hd / 2, 16, 2), else (B, KV, S, hd)
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                v.scalar_type() == at::kBFloat16 && mask.scalar_type() == at::kBool,
                "flash_attend: bf16 and a bool mask");
    TORCH_CHECK((hd == 64 || hd == 96 || hd == 128 || hd == 256) && q.stride(3) == 1 && v.stride(3) == 1 &&
                v.size(0) == B && v.size(3) == hd && H % KV == 0 && mask.size(0) == B && mask.size(2) == T &&
                mask.size(3) == S &&
                    (blocked ? blocked_keys_ok(k, B, KV, S, hd) : k.sizes() == v.sizes() && k.stride(3) == 1),
                "flash_attend: bad shapes");
    const int64_t S2 = (S + KB - 1) / KB * KB;
    const at::Tensor vp = pack_values(v, S2);
    at::Tensor out = at::empty({B, T, H, hd}, q.options());
    const Call c{q.const_data_ptr<bf16>(), k.const_data_ptr<bf16>(), mask.const_data_ptr<bool>(),
                 reinterpret_cast<const uint32_t *>(vp.const_data_ptr()), out.data_ptr<bf16>(), H, T, S, S2, H / KV,
                 q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), blocked ? hd : k.stride(2),
                 mask.stride(0), mask.stride(2), mask.stride(3), KV, (float)scale, blocked};
    const int64_t nt = (T + QB - 1) / QB;
    // tasks (query block, sequence, head), later query blocks first: with a causal mask they see the most
    // keys, and handing out the largest tasks first keeps the threads' shares even
    const int64_t n = nt * B * H;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
    for (int64_t i = 0; i < n; i++) {
        const int64_t blk = nt - 1 - i / (B * H), b = i / H % B, h = i % H;
        switch (hd) {
            case 64: task<64>(c, b, h, blk * QB); break;
            case 96: task<96>(c, b, h, blk * QB); break;
            case 128: task<128>(c, b, h, blk * QB); break;
            default: task<256>(c, b, h, blk * QB); break;
        }
    }
    return out.permute({0, 2, 1, 3});
}

TORCH_LIBRARY_FRAGMENT(leanlm_native, m) {
    m.def("flash_attend(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(leanlm_native, CPU, m) { m.impl("flash_attend", flash_attend); }
#endif
