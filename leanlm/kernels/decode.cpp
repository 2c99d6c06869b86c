/* The decode step as one C++ call: leanlm_native::Decoder, a torch class built once per model by
 * leanlm/runtime/steps/cpp.py, runs model.py's forward for a few tokens per sequence (a decode step, a speculative
 * block) without returning to Python or the dispatcher between operations.
 *
 * Why: after the weight kernels, a compiled decode step still spent ~1.5 ms per token around them (inductor's
 * wrapper and its fused loops as ~200 small parallel regions, plus the graph's Python entry), and importing
 * dynamo and loading a step costs ~140 MiB. Here the small work (norms, rope, the cache write, the
 * activation, the residual adds) is plain loops on rows of a few hundred numbers, and the weight and
 * attention kernels are called as C++ functions (kernels/ops.h).
 *
 * The arithmetic is model.py's in bf16, op for op: every value eager PyTorch would round to bf16 (a norm's
 * output, each product and sum of the rotary embedding, the activation, the product gate * up, the residual
 * sums) is rounded here at the same point, with fp32 inside each op, and the norms and activations are the
 * row code (rows.h) the eager model's own operators run (rowops.cpp): on SmolLM2 this step's logits equal
 * the eager step's bit for bit. Each row of a call is computed the same way whatever the number of rows
 * (speculative decoding relies on a verified block scoring like single steps).
 */
#include <torch/custom_class.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "cache.h"
#include "ops.h"
#include "named.h"
#include "rows.h"

namespace {

using rows::bf16;
using rows::gated;
using rows::rb;
using rows::rms_norm;
using rows::rope;

struct Linear {  // an Int4Linear in the VNNI layout (outputs padded to tiles of 16; callers read what they need)
    at::Tensor w, scales, mins;
    at::Tensor operator()(const at::Tensor &x) const { return int4_mm(x, w, scales, mins); }  // (M, N16) bf16
};

struct Layer {
    at::Tensor attn_norm, ffn_norm, post_attn_norm, post_ffn_norm, q_norm, k_norm;  // fp32, (1 + w) already
    std::vector<Linear> qkv, gate_up;  // one fused module, or q, k, v / gate, up apart
    Linear o, down;
    int64_t window = -1, table = 0;  // window -1: full attention; table: which of the cache's slot tables
    bool local = false;              // rotary embedding with the local base (Gemma 3's sliding layers)
};

// a loop over rows, on the thread pool only when there are many (a decode step's few rows stay inline)
template <typename F>
void for_rows(int64_t M, const F &f) {
    at::parallel_for(0, M, 8, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) f(r);
    });
}

struct Decoder : torch::CustomClassHolder {
    int64_t D, H, KV, hd, rd, F, act_kind;
    bool interleaved, qk_norm, post_norms;
    double eps, attn_scale, embed_scale, softcap, rope_scale;  // embed_scale, softcap: 0 = none
    at::Tensor freq_global, freq_local, emb_codes, emb_scales, norm, head_codes, head_scales;
    std::vector<Layer> layers;

    // Built by runtime/steps/cpp.py `decoder_args`: the tensors in the order its docstring lists, and every
    // integer and float by name (`DecoderSpec`'s fields; per-layer values as "name.layer"). A name missing,
    // unknown or given twice stops here with that name, so the two sides cannot drift apart silently.
    Decoder(std::vector<at::Tensor> t, std::vector<std::string> int_names, std::vector<int64_t> ints,
            std::vector<std::string> float_names, std::vector<double> floats) {
        Named<int64_t> I(int_names, ints);
        Named<double> Fl(float_names, floats);
        size_t ti = 0;
        const auto T = [&] { return t.at(ti++); };
        D = I("dim"), H = I("heads"), KV = I("kv_heads"), hd = I("head_dim"), rd = I("rope_dims");
        F = I("hidden"), act_kind = I("act");
        interleaved = I("interleaved"), qk_norm = I("qk_norm"), post_norms = I("post_norms");
        const int64_t n_layers = I("layers");
        eps = Fl("eps"), attn_scale = Fl("attn_scale"), embed_scale = Fl("embed_scale"), softcap = Fl("softcap");
        rope_scale = Fl("rope_scale");
        freq_global = T(), freq_local = T(), emb_codes = T(), emb_scales = T(), norm = T();
        head_codes = T(), head_scales = T();
        const auto lin = [&] {
            Linear l;
            l.w = T(), l.scales = T(), l.mins = T();
            return l;
        };
        for (int64_t l = 0; l < n_layers; l++) {
            Layer L;
            const auto per_layer = [&](const char *name) { return I(std::string(name) + "." + std::to_string(l)); };
            L.window = per_layer("windows"), L.table = per_layer("tables"), L.local = per_layer("local");
            const int64_t n_qkv = per_layer("n_qkv"), n_gate_up = per_layer("n_gate_up");
            L.attn_norm = T(), L.ffn_norm = T();
            if (post_norms) L.post_attn_norm = T(), L.post_ffn_norm = T();
            if (qk_norm) L.q_norm = T(), L.k_norm = T();
            for (int64_t j = 0; j < n_qkv; j++) L.qkv.push_back(lin());
            L.o = lin();
            for (int64_t j = 0; j < n_gate_up; j++) L.gate_up.push_back(lin());
            L.down = lin();
            layers.push_back(std::move(L));
        }
        TORCH_CHECK(ti == t.size(), "Decoder: ", t.size(), " tensors given, ", ti, " used");
        I.check_all_used(), Fl.check_all_used();
    }

    // The embedding rows of tokens (M,) into x (M, D) bf16: codes * scale rounded as model.py's Int8Embedding,
    // from the head's tiled codes (uint8 = code + 128, kernels/int8_head.cpp), plain int8 rows, or bf16 rows.
    void embed(const int64_t *tok, int64_t M, bf16 *x) const {
        const auto dt = emb_codes.scalar_type();
        const float es = embed_scale != 0 ? rb((float)embed_scale) : 1.0f;
        for_rows(M, [&](int64_t m) {
            const int64_t n = tok[m];
            TORCH_CHECK(n >= 0 && n < emb_codes.size(0), "token id out of range");
            bf16 *y = x + m * D;
            if (dt == at::kBFloat16) {
                for (int64_t d = 0; d < D; d++) y[d] = emb_codes.const_data_ptr<bf16>()[n * D + d];
            } else {
                const float s = (float)emb_scales.const_data_ptr<bf16>()[n];
                for (int64_t d = 0; d < D; d++) {
                    // tiled: tile n / 16, group d / 32 (512 bytes), vector d % 32 / 4 (64 bytes), lane n % 16, byte d % 4
                    const int64_t at = (n / 16 * (D / 32) + d / 32) * 512 + d % 32 / 4 * 64 + n % 16 * 4 + d % 4;
                    const float c = dt == at::kByte ? (float)emb_codes.const_data_ptr<uint8_t>()[at] - 128.0f
                                                    : (float)emb_codes.const_data_ptr<int8_t>()[n * D + d];
                    y[d] = bf16(c * s);
                }
            }
            if (embed_scale != 0)
                for (int64_t d = 0; d < D; d++) y[d] = bf16((float)y[d] * es);
        });
    }

    // cos, sin (M, rd / 2) of each row's position, rounded to bf16 (model.py's rope_tables)
    std::pair<std::vector<float>, std::vector<float>> rope_tables(const int64_t *pos, int64_t M, bool local) const {
        const at::Tensor &fr = local ? freq_local : freq_global;
        const float scale = local ? 1.0f : (float)rope_scale;
        std::vector<float> c(M * rd / 2), s(M * rd / 2);
        for (int64_t m = 0; m < M; m++)
            for (int64_t i = 0; i < rd / 2; i++) {
                const float a = ((float)pos[m] / scale) * fr.const_data_ptr<float>()[i];
                c[m * rd / 2 + i] = rb(std::cos(a)), s[m * rd / 2 + i] = rb(std::sin(a));
            }
        return {c, s};
    }

    at::Tensor step(at::Tensor tokens, at::Tensor positions, int64_t kv_len, std::vector<at::Tensor> kv,
                    std::vector<at::Tensor> tables, bool last_only) const;
    at::Tensor attention(const Layer &L, const at::Tensor &xn, const int64_t *pos, int64_t B, int64_t T,
                         int64_t kv_len, const kvcache::Layer &cache, const at::Tensor &mask,
                         const std::pair<std::vector<float>, std::vector<float>> &cs) const;
    at::Tensor mlp(const Layer &L, const at::Tensor &xn) const;
};

// Mask (B, 1, T, n) of one slot table (B, S) and window (-1: none), cache.py's rule: the query at position q
// sees slot s iff 0 <= p[s] <= q and q - p[s] < W.
at::Tensor make_mask(const at::Tensor &tab, const int64_t *pos, int64_t B, int64_t T, int64_t n, int64_t W) {
    at::Tensor mask = at::empty({B, 1, T, n}, at::TensorOptions().dtype(at::kBool));
    bool *mp = mask.data_ptr<bool>();
    const int64_t *tp = tab.const_data_ptr<int64_t>(), st = tab.stride(0);
    for (int64_t m = 0; m < B * T; m++)
        for (int64_t s = 0; s < n; s++) {
            const int64_t p = tp[m / T * st + s], q = pos[m];
            mp[m * n + s] = p >= 0 && p <= q && (W < 0 || q - p < W);
        }
    return mask;
}

// x (M, D) += norm(y) (or y) per row, y's first D columns (its rows may be padded), rounded as bf16 sums
void add_rows(at::Tensor &x, const at::Tensor &y, const at::Tensor &norm, float eps) {
    const int64_t M = x.size(0), D = x.size(1), ys = y.size(1);
    bf16 *xp = x.data_ptr<bf16>();
    const bf16 *yp = y.const_data_ptr<bf16>();
    for_rows(M, [&](int64_t m) {
        std::vector<bf16> tmp(D);
        const bf16 *a = yp + m * ys;
        if (norm.defined()) rms_norm(a, norm.const_data_ptr<float>(), eps, D, tmp.data()), a = tmp.data();
        for (int64_t d = 0; d < D; d++) xp[m * D + d] = bf16((float)xp[m * D + d] + (float)a[d]);
    });
}

void norm_rows(const at::Tensor &x, const at::Tensor &w, float eps, at::Tensor &y) {
    const int64_t D = x.size(1);
    for_rows(x.size(0), [&](int64_t m) {
        rms_norm(x.const_data_ptr<bf16>() + m * D, w.const_data_ptr<float>(), eps, D, y.data_ptr<bf16>() + m * D);
    });
}

// One layer's attention for the normalised rows xn (M = B T, D): q, k, v projections, q/k norms, rotary
// embedding, the cache write at slot position % S, attention over the slots the mask allows, the output
// projection -> (M, D16) bf16.
at::Tensor Decoder::attention(const Layer &L, const at::Tensor &xn, const int64_t *pos, int64_t B, int64_t T,
                              int64_t kv_len, const kvcache::Layer &cache, const at::Tensor &mask,
                              const std::pair<std::vector<float>, std::vector<float>> &cs) const {
    const int64_t M = B * T, nq = H * hd, nk = KV * hd, h2 = rd / 2;
    std::vector<at::Tensor> ys;
    for (const Linear &lin : L.qkv) ys.push_back(lin(xn));  // fused: (M, N16) holding q | k | v; else three
    const bool fused = ys.size() == 1;
    const bf16 *src[3];
    int64_t stride[3];
    for (int j = 0; j < 3; j++) {
        const at::Tensor &y = ys[fused ? 0 : j];
        src[j] = y.const_data_ptr<bf16>() + (fused ? (j == 0 ? 0 : j == 1 ? nq : nq + nk) : 0);
        stride[j] = y.size(1);
    }
    at::Tensor q = at::empty({B, T, H, hd}, xn.options());  // (B, T, H, hd)
    bf16 *qp = q.data_ptr<bf16>();
    const int64_t S = cache.S;
    TORCH_CHECK(hd <= 512, "Decoder: head dim above 512");
    const float *qn = qk_norm ? L.q_norm.const_data_ptr<float>() : nullptr;
    const float *kn = qk_norm ? L.k_norm.const_data_ptr<float>() : nullptr;
    // one unit per (row, head): the H query heads, then the KV key/value heads; a batch's units share the pool
    const int64_t units = H + KV;
    at::parallel_for(0, M * units, 16, [&](int64_t u0, int64_t u1) {
        for (int64_t u = u0; u < u1; u++) {
            const int64_t m = u / units, h = u % units, b = m / T, slot = pos[m] % S;
            const float *c = cs.first.data() + m * h2, *s = cs.second.data() + m * h2;
            const auto head = [&](const bf16 *x, bf16 *y, const float *w) {  // (hd): copy, norm, rotate
                std::memcpy(y, x, hd * sizeof(bf16));
                if (w != nullptr) rms_norm(y, w, (float)eps, hd, y);
                rope(y, c, s, rd, interleaved);
            };
            if (h < H) {
                head(src[0] + m * stride[0] + h * hd, qp + (m * H + h) * hd, qn);
                continue;
            }
            const int64_t g = h - H;
            bf16 row[512];
            head(src[1] + m * stride[1] + g * hd, row, kn);
            cache.key(b, g, slot, row);  // in the cache's layout (cache.h)
            cache.value(b, g, slot, src[2] + m * stride[2] + g * hd);
        }
    });
    at::Tensor o = cache.attend(q.permute({0, 2, 1, 3}), mask, std::min(kv_len, S), attn_scale);
    if (T > 1) o = o.permute({0, 2, 1, 3}).contiguous();  // (B, H, T, hd) -> (B, T, H, hd)
    return L.o(o.view({M, nq}));
}

// gate and up projections, act(gate) * up rounded as bf16 ops, the down projection -> (M, D16) bf16
at::Tensor Decoder::mlp(const Layer &L, const at::Tensor &xn) const {
    const int64_t M = xn.size(0);
    std::vector<at::Tensor> ys;
    for (const Linear &lin : L.gate_up) ys.push_back(lin(xn));  // fused: (M, N16) holding gate | up
    const bf16 *g = ys[0].const_data_ptr<bf16>(), *u = ys.size() == 1 ? g + F : ys[1].const_data_ptr<bf16>();
    const int64_t gs = ys[0].size(1), us = ys.back().size(1);
    at::Tensor h = at::empty({M, F}, xn.options());
    bf16 *hp = h.data_ptr<bf16>();
    for_rows(M, [&](int64_t m) { gated(g + m * gs, u + m * us, hp + m * F, F, act_kind); });
    return L.down(h);
}

// tokens, positions (B, T) -> logits (B, T, V) fp32 ((B, 1, V) if last_only): model.py's forward with a cache.
// kv: each layer's cache tensors (2 or 4 a layer: cache.h); tables: the cache's slot tables (B, S) in
// ModelCache.slot_pos order, where this step records the new positions (as ModelCache.prepare does).
at::Tensor Decoder::step(at::Tensor tokens, at::Tensor positions, int64_t kv_len, std::vector<at::Tensor> kv,
                         std::vector<at::Tensor> tables, bool last_only) const {
    const size_t per = layers.empty() ? 2 : kv.size() / layers.size();  // tensors a layer
    TORCH_CHECK((per == 2 || per == 4) && kv.size() == per * layers.size() && tokens.sizes() == positions.sizes() &&
                tokens.dim() == 2, "Decoder.step: bad arguments");
    const int64_t B = positions.size(0), T = positions.size(1), M = B * T;
    const at::Tensor tok = tokens.contiguous(), pos_t = positions.contiguous();
    const int64_t *pos = pos_t.const_data_ptr<int64_t>();
    at::Tensor x = at::empty({M, D}, at::TensorOptions().dtype(at::kBFloat16));  // the residual stream
    embed(tok.const_data_ptr<int64_t>(), M, x.data_ptr<bf16>());
    for (const at::Tensor &tab : tables) {  // slot = position % size
        const int64_t S = tab.size(1), st = tab.stride(0);
        for (int64_t m = 0; m < M; m++) tab.data_ptr<int64_t>()[m / T * st + pos[m] % S] = pos[m];
    }
    std::map<std::pair<int64_t, int64_t>, at::Tensor> masks;  // per (table, window)
    std::map<bool, std::pair<std::vector<float>, std::vector<float>>> ropes;  // per base (local or global)
    at::Tensor xn = at::empty({M, D}, x.options());
    const float e = (float)eps;
    for (size_t l = 0; l < layers.size(); l++) {
        const Layer &L = layers[l];
        const at::Tensor &tab = tables.at(L.table);
        const auto key = std::make_pair(L.table, L.window);
        if (!masks.count(key)) masks[key] = make_mask(tab, pos, B, T, std::min(kv_len, tab.size(1)), L.window);
        if (!ropes.count(L.local)) ropes.emplace(L.local, rope_tables(pos, M, L.local));
        norm_rows(x, L.attn_norm, e, xn);
        const kvcache::Layer cache({kv.begin() + per * l, kv.begin() + per * (l + 1)}, hd);
        add_rows(x, attention(L, xn, pos, B, T, kv_len, cache, masks[key], ropes[L.local]), L.post_attn_norm, e);
        norm_rows(x, L.ffn_norm, e, xn);
        add_rows(x, mlp(L, xn), L.post_ffn_norm, e);
    }
    const int64_t Tl = last_only ? 1 : T;
    at::Tensor last = at::empty({B * Tl, D}, x.options());
    for (int64_t r = 0; r < B * Tl; r++) {  // rows of the positions wanted, normalised
        const int64_t m = last_only ? r * T + T - 1 : r;
        rms_norm(x.const_data_ptr<bf16>() + m * D, norm.const_data_ptr<float>(), e, D, last.data_ptr<bf16>() + r * D);
    }
    at::Tensor logits = int8_mm(last, head_codes, head_scales);  // (B Tl, V) fp32
    if (softcap != 0) {
        float *lp = logits.data_ptr<float>();
        const float cap = (float)softcap;
        for (int64_t i = 0; i < logits.numel(); i++) lp[i] = std::tanh(lp[i] / cap) * cap;
    }
    return logits.view({B, Tl, -1});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanlm_native, m) {
    m.class_<Decoder>("Decoder")
        .def(torch::init<std::vector<at::Tensor>, std::vector<std::string>, std::vector<int64_t>,
                         std::vector<std::string>, std::vector<double>>())
        .def("step", &Decoder::step);
}
#endif
