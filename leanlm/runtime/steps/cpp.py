"""The decode step as one C++ call (kernels/decode.cpp), for models whose every layer runs on our kernels.

A compiled decode step (compiled.py) still spends about 1.5 ms per token outside the weight kernels on this
CPU (inductor's wrapper and ~200 small fused loops, the graph's Python entry), and importing dynamo plus
loading a step costs ~140 MiB. `leanlm_native::Decoder` holds the model's tensors (no copies: the same
storage as the modules') and runs model.py's forward for a few tokens per sequence in C++, rounding to bf16
exactly where the eager model does (its logits equal the eager step's on the models tested). It serves the
same four kinds as compiled steps (one sequence or a batch, one token or a speculative block) with the same
signature, so callers do not know which they got.

It applies when the model is in bf16 on the CPU with our operators built, every projection is an
Int4Linear in the VNNI layout (one plane, no bias), the head is the tiled int8 operator, and the
architecture has no mixture of experts and no attention softcap; otherwise `native_step` returns None and
the compiled (or eager) step is used. `LEANLM_NATIVE_STEP=0` switches it off.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from leanlm.kernels import build as native
from leanlm.model.cache import ModelCache
from leanlm.model.layers import FeedForward, RMSNorm
from leanlm.model.rope import rope_frequencies
from leanlm.model.transformer import Transformer
from leanlm.quant.int4 import Int4Linear
from leanlm.quant.int8 import Int8Embedding, Int8Linear
from leanlm.runtime.steps.compiled import DecodeStep

MAX_TOKENS = 16  # query tokens per sequence the step takes (model.FEW_QUERIES: attention on few queries)


def _norm(n: RMSNorm) -> torch.Tensor:
    w = n.weight.detach().float()
    return (w + 1.0 if n.add_one else w).contiguous()


def _linears(mods: list[Any]) -> list[Int4Linear] | None:
    ok = all(isinstance(m, Int4Linear) and m.planes == 1 and m.bias is None for m in mods)
    return mods if ok else None


def decoder_args(model: Transformer) -> tuple[list[torch.Tensor], list[int], list[float]] | None:
    """The Decoder's constructor arguments, or None where the model does not fit it (module docstring).

    ints: dim, heads, kv heads, head dim, rotary dims, MLP width, activation (0 silu, 1 gelu), interleaved
    rope, qk norm, post norms, layers; then per layer: window (-1 none), slot table, local rope, number of
    q/k/v modules (1 fused or 3), of gate/up modules (1 or 2).
    floats: norm eps, attention scale, embedding scale (0 none), final softcap (0 none), rope scale.
    tensors: inverse rope frequencies (global, local), embedding codes and scales, final norm, head codes and
    scales; per layer: attention and MLP norms, post norms (if any), q/k norms (if any), then each projection
    as (codes, scales, minimums) in the order q/k/v, output, gate/up, down.
    """
    cfg = model.cfg
    emb, head = model.tok_embeddings, model.output
    if (model.dtype != torch.bfloat16 or model.device.type != "cpu" or cfg.moe is not None or cfg.mla is not None
            or cfg.yarn is not None or cfg.attn_softcap
            or cfg.attn_bias or cfg.head_dim % 16 or not isinstance(head, Int8Linear) or not head.tiled):
        return None
    if isinstance(emb, Int8Embedding):
        emb_codes, emb_scales = emb.codes, emb.scales
    elif isinstance(emb, torch.nn.Embedding) and emb.weight.dtype == torch.bfloat16:
        emb_codes, emb_scales = emb.weight.detach(), torch.empty(0)
    else:
        return None
    rd = cfg.rope_dim or cfg.head_dim
    freqs = [rope_frequencies(rd, base) for base in (cfg.rope_base, cfg.rope_local_base or cfg.rope_base)]
    tables = list(dict.fromkeys(cfg.layer_windows))  # ModelCache.slot_pos's order: windows as first met
    ints = [cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, rd, cfg.hidden_dim, int(cfg.act != "silu"),
            int(cfg.rope_interleaved), int(cfg.qk_norm), int(cfg.post_norms), cfg.n_layers]
    floats = [cfg.norm_eps, model.layers[0].attn.scale, cfg.embed_scale or 0.0, cfg.final_softcap or 0.0,
              cfg.rope_scale]
    tensors = [*freqs, emb_codes, emb_scales, _norm(model.norm), head.codes, head.scales]
    for layer in model.layers:
        a, f = layer.attn, layer.ffn
        qkv = _linears([a.wqkv] if a.wqkv is not None else [a.wq, a.wk, a.wv])
        if not isinstance(f, FeedForward):
            return None
        gate_up = _linears([f.w13] if f.w13 is not None else [f.w1, f.w3])
        o, down = _linears([a.wo]), _linears([f.w2])
        if qkv is None or gate_up is None or o is None or down is None:
            return None
        local = layer.window is not None and cfg.rope_local_base is not None
        ints += [-1 if layer.window is None else layer.window, tables.index(layer.window), int(local),
                 len(qkv), len(gate_up)]
        tensors += [_norm(layer.attn_norm), _norm(layer.ffn_norm)]
        if cfg.post_norms:
            tensors += [_norm(layer.post_attn_norm), _norm(layer.post_ffn_norm)]
        if cfg.qk_norm:
            tensors += [_norm(a.q_norm), _norm(a.k_norm)]
        for lin in qkv + o + gate_up + down:
            tensors += [lin.w4, lin.scales, lin.mins]
    return tensors, ints, floats


def available() -> bool:
    if os.environ.get("LEANLM_NATIVE_STEP", "1") == "0" or not native.ops_library():
        return False
    try:  # decode.cpp registers the class only where the CPU has AVX-512 VNNI and BF16; asking for a missing
        torch.classes.leanlm_native.Decoder  # torch class raises RuntimeError, not AttributeError
    except (RuntimeError, AttributeError):
        return False
    return True


def native_step(model: Transformer, tokens: int = 1) -> DecodeStep | None:
    """The C++ decode step for this model (tokens > 1: the verify step, logits for every token), or None."""
    if not available() or (args := decoder_args(model)) is None:
        return None
    decoder = torch.classes.leanlm_native.Decoder(*args)

    def run(model: Transformer, cache: ModelCache, toks: torch.Tensor, positions: torch.Tensor,
            kv_len: int) -> torch.Tensor:
        if toks.shape[1] > MAX_TOKENS:  # a long block: the model's own path (SDPA)
            logits = model(toks, positions, cache, kv_len=kv_len)
            return logits if tokens > 1 else logits[:, -1]
        kv = [t for b in cache.layers for t in b.tensors()]
        logits = decoder.step(toks, positions, kv_len, kv, list(cache.slot_pos.values()), tokens == 1)
        return logits if tokens > 1 else logits[:, -1]

    run.native = True  # type: ignore[attr-defined]  (LLM.decode_kind)
    return run
