"""The one transformer family. Llama, Gemma 3 and their relatives differ only by ModelConfig fields.

Shapes: B batch, T new tokens, S cached slots, H query heads, KV key/value heads, hd head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlm.kernels.plan import KernelPlan
from leanlm.model.attention import Attention
from leanlm.model.cache import KVBuffer, ModelCache, attention_mask
from leanlm.model.config import ModelConfig
from leanlm.model.layers import FeedForward, RMSNorm
from leanlm.model.mla import MLAttention
from leanlm.model.moe import MoE
from leanlm.model.rope import rope_tables


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.window = cfg.layer_windows[layer]
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_add_one)
        if cfg.mla is not None:
            self.attn: nn.Module = MLAttention(cfg)
        else:
            self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_add_one)
        moe = cfg.moe
        if moe is not None and layer >= moe.first_dense:
            shared = FeedForward(cfg, moe.n_shared * (moe.hidden_dim or cfg.hidden_dim)) if moe.n_shared else None
            self.ffn: nn.Module = MoE(cfg, shared)
        else:
            self.ffn = FeedForward(cfg)
        self.post_norms = cfg.post_norms
        if cfg.post_norms:
            self.post_attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_add_one)
            self.post_ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_add_one)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                kv: KVBuffer | None, slots: torch.Tensor | None, kv_len: int) -> torch.Tensor:
        a = self.attn(self.attn_norm(x), rope, mask, kv, slots, kv_len)
        x = x + (self.post_attn_norm(a) if self.post_norms else a)
        f = self.ffn(self.ffn_norm(x))
        return x + (self.post_ffn_norm(f) if self.post_norms else f)


class Transformer(nn.Module):
    kv_cache = "auto"  # the K/V cache type its caches get (ModelCache.for_model): "auto" or "int8"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_add_one)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply_plan(KernelPlan.resolve())

    def apply_plan(self, plan: KernelPlan) -> None:
        """Run on the kernels of `plan` (kernels/plan.py): kept as `self.plan` (caches take it from here) and
        handed to every module that has routes, which fixes them now rather than at each call. Modules swapped
        in later (quantized, fused) are planned again by the loader (llm.load)."""
        self.plan = plan
        plan.use_process_wide()
        for mod in self.modules():
            if mod is not self and hasattr(mod, "use_plan"):
                mod.use_plan(plan)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (quantized modules keep their own storage types)."""
        return self.norm.weight.dtype

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: ModelCache | None = None,
                last_only: bool = False, kv_len: int | None = None) -> torch.Tensor:
        """tokens, positions: (B, T) -> logits (B, T, vocab) in fp32 ((B, 1, vocab) if last_only).

        With a cache, `cache.kv_len` must already cover these positions (see `ModelCache`).
        """
        cfg = self.cfg
        x = self.tok_embeddings(tokens)  # (B, T, D)
        if cfg.embed_scale is not None:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        rd = cfg.rope_dim or cfg.head_dim
        ropes: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        if kv_len is None:
            kv_len = cache.kv_len if cache is not None else 0
        if cache is not None:
            prepared = cache.prepare(positions, kv_len)  # per layer (slots, mask), shared where buffers agree
        else:
            causal = {w: attention_mask(positions, positions, w) for w in set(cfg.layer_windows)}
        for i, layer in enumerate(self.layers):
            local = layer.window is not None and cfg.rope_local_base is not None
            if local not in ropes:
                base = cfg.rope_local_base if local else cfg.rope_base
                scale = 1.0 if local else cfg.rope_scale
                ropes[local] = rope_tables(positions, rd, base, scale, x.dtype, None if local else cfg.yarn)
            if cache is not None:
                slots, mask = prepared[i]
                x = layer(x, ropes[local], mask, cache.layers[i], slots, kv_len)
            else:
                x = layer(x, ropes[local], causal[layer.window], None, None, 0)
        if last_only:
            x = x[:, -1:]
        logits = self.output(self.norm(x)).float()
        if cfg.final_softcap is not None:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits
