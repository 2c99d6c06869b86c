"""The decode step as one C++ call (kernels/decode.cpp), for models whose every layer runs on our kernels.

A compiled decode step (compiled.py) still spends about 1.5 ms per token outside the weight kernels on this
CPU (inductor's wrapper and ~200 small fused loops, the graph's Python entry), and importing dynamo plus
loading a step costs ~140 MiB. `leanlm_native::Decoder` holds the model's tensors (no copies: the same
storage as the modules') and runs model.py's forward for a few tokens per sequence in C++, rounding to bf16
exactly where the eager model does (its logits equal the eager step's on the models tested). It serves the
same four kinds as compiled steps (one sequence or a batch, one token or a speculative block) with the same
signature, so callers do not know which they got.

It applies when the model's plan allows it (kernels/plan.py: the CPU has the class, `LEANLM_NATIVE_STEP` is not
0), the model is in bf16 on the CPU, every projection is an Int4Linear in the VNNI layout (one plane, no bias),
the head is the tiled int8 operator, and the architecture has no mixture of experts and no attention softcap;
otherwise `supports` says no and the compiled (or eager) step is used.

The decoder's integers and floats travel by name (`DecoderSpec`, checked name by name in decode.cpp). It still
writes the slot tables and derives the masks itself (decode.cpp `make_mask`, model/cache.py's rule): taking
`ModelCache.prepare`'s tensors instead would add its PyTorch ops to every native step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

from leanlm.errors import LeanLMError
from leanlm.kernels.plan import KernelPlan, few_query_fits
from leanlm.model.cache import ModelCache
from leanlm.model.layers import FeedForward, RMSNorm
from leanlm.model.rope import rope_frequencies
from leanlm.model.transformer import Transformer
from leanlm.quant.int4 import Int4Linear
from leanlm.quant.int8 import Int8Embedding, Int8Linear
from leanlm.runtime.steps.eager import Step, StepKind

NAME = "native"

MAX_TOKENS = 16  # query tokens per sequence the step takes (model.FEW_QUERIES: attention on few queries)


def _norm(n: RMSNorm) -> torch.Tensor:
    w = n.weight.detach().float()
    return (w + 1.0 if n.add_one else w).contiguous()


def _linears(mods: list[Any]) -> list[Int4Linear] | None:
    ok = all(isinstance(m, Int4Linear) and m.planes == 1 and m.bias is None for m in mods)
    return mods if ok else None


@dataclass(frozen=True)
class DecoderSpec:
    """The Decoder's integers and floats, passed by name (`named`): decode.cpp reads each by its field name,
    per-layer values as "name.layer" (e.g. "windows.3")."""

    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_dims: int
    hidden: int  # the MLP's width
    act: int  # 0 silu, 1 gelu (tanh)
    interleaved: int  # rope on interleaved pairs
    qk_norm: int
    post_norms: int
    layers: int
    windows: tuple[int, ...]  # per layer: the sliding window, -1 none
    tables: tuple[int, ...]  # per layer: which slot table (ModelCache.slot_pos's order)
    local: tuple[int, ...]  # per layer: the local rope base (Gemma 3's sliding layers)
    n_qkv: tuple[int, ...]  # per layer: q/k/v modules, 1 fused or 3
    n_gate_up: tuple[int, ...]  # per layer: gate/up modules, 1 fused or 2
    eps: float  # the norms'
    attn_scale: float
    embed_scale: float  # 0: none
    softcap: float  # the final one; 0: none
    rope_scale: float

    def named(self) -> tuple[list[str], list[int], list[str], list[float]]:
        """(integer names, integers, float names, floats) as the Decoder's constructor takes them."""
        names: dict[type, list[str]] = {int: [], float: []}
        values: dict[type, list[Any]] = {int: [], float: []}
        for f in fields(self):
            v = getattr(self, f.name)
            items = [(f"{f.name}.{i}", x) for i, x in enumerate(v)] if isinstance(v, tuple) else [(f.name, v)]
            kind = float if f.type == "float" else int
            for name, x in items:
                names[kind].append(name)
                values[kind].append(kind(x))
        return names[int], values[int], names[float], values[float]


def decoder_args(model: Transformer) -> tuple[list[torch.Tensor], DecoderSpec] | None:
    """The Decoder's tensors and spec, or None where the model does not fit it (module docstring).

    tensors: inverse rope frequencies (global, local), embedding codes and scales, final norm, head codes and
    scales; per layer: attention and MLP norms, post norms (if any), q/k norms (if any), then each projection
    as (codes, scales, minimums) in the order q/k/v, output, gate/up, down.
    """
    cfg = model.cfg
    emb, head = model.tok_embeddings, model.output
    if (model.dtype != torch.bfloat16 or model.device.type != "cpu" or cfg.moe is not None or cfg.mla is not None
            or cfg.yarn is not None or cfg.attn_softcap
            or cfg.attn_bias or not few_query_fits(cfg.head_dim) or not isinstance(head, Int8Linear) or not head.tiled):
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
    per_layer: dict[str, list[int]] = {"windows": [], "tables": [], "local": [], "n_qkv": [], "n_gate_up": []}
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
        for name, v in (("windows", -1 if layer.window is None else layer.window),
                        ("tables", tables.index(layer.window)), ("local", int(local)), ("n_qkv", len(qkv)),
                        ("n_gate_up", len(gate_up))):
            per_layer[name].append(v)
        tensors += [_norm(layer.attn_norm), _norm(layer.ffn_norm)]
        if cfg.post_norms:
            tensors += [_norm(layer.post_attn_norm), _norm(layer.post_ffn_norm)]
        if cfg.qk_norm:
            tensors += [_norm(a.q_norm), _norm(a.k_norm)]
        for lin in qkv + o + gate_up + down:
            tensors += [lin.w4, lin.scales, lin.mins]
    spec = DecoderSpec(dim=cfg.dim, heads=cfg.n_heads, kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rope_dims=rd,
                       hidden=cfg.hidden_dim, act=int(cfg.act != "silu"), interleaved=int(cfg.rope_interleaved),
                       qk_norm=int(cfg.qk_norm), post_norms=int(cfg.post_norms), layers=cfg.n_layers,
                       **{k: tuple(v) for k, v in per_layer.items()}, eps=cfg.norm_eps,
                       attn_scale=model.layers[0].attn.scale, embed_scale=cfg.embed_scale or 0.0,
                       softcap=cfg.final_softcap or 0.0, rope_scale=cfg.rope_scale)
    return tensors, spec


def supports(model: Transformer, kind: StepKind, plan: KernelPlan) -> bool:
    return plan.native_step and decoder_args(model) is not None


def build(model: Transformer, kind: StepKind, mode: str = "auto",
          log: Callable[[str], None] | None = None) -> Step | None:
    """The C++ step for this model and kind (a block: logits for every token), or None where it does not fit."""
    if not model.plan.native_step or (args := decoder_args(model)) is None:
        return None
    tensors, spec = args
    decoder = torch.classes.leanlm_native.Decoder(tensors, *spec.named())
    layout = ModelCache.layout_for(model)

    def run(model: Transformer, cache: ModelCache, toks: torch.Tensor, positions: torch.Tensor,
            kv_len: int) -> torch.Tensor:
        if toks.shape[1] > MAX_TOKENS:  # a long block: the model's own path (SDPA)
            logits = model(toks, positions, cache, kv_len=kv_len)
            return logits if kind.block else logits[:, -1]
        if cache.layout != layout:  # the decoder writes and reads the cache as the model's plan lays it out
            raise LeanLMError(f"the native step serves a {layout} K/V cache, not {cache.layout}")
        kv = [t for b in cache.layers for t in b.tensors()]
        logits = decoder.step(toks, positions, kv_len, kv, list(cache.slot_pos.values()), not kind.block)
        return logits if kind.block else logits[:, -1]

    return Step(NAME, kind, run)
