"""Grouped-query attention over the slot-position cache (model/cache.py), with its routes.

Shapes: B batch, T new tokens, S cached slots, H query heads, KV key/value heads, hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.kernels.plan import KernelPlan, few_query_fits, flash_fits
from leanlm.model.cache import KVBuffer, key_rows
from leanlm.model.config import ModelConfig
from leanlm.model.layers import RMSNorm
from leanlm.model.rope import apply_rope

FEW_QUERIES = 16  # up to this many query tokens per sequence, attention runs as fp32 reductions (see below)


class Attention(nn.Module):
    # routes, fixed by `use_plan` when the model is planned: few-query attention on kernels/attention.cpp (else
    # fp32 reductions), prompts on kernels/flash.cpp (else SDPA)
    few_native = flash_native = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, H * hd, bias=cfg.attn_bias)
        self.wk = nn.Linear(cfg.dim, KV * hd, bias=cfg.attn_bias)
        self.wv = nn.Linear(cfg.dim, KV * hd, bias=cfg.attn_bias)
        self.wo = nn.Linear(H * hd, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps, cfg.norm_add_one)
            self.k_norm = RMSNorm(hd, cfg.norm_eps, cfg.norm_add_one)
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else hd**-0.5
        self.wqkv: nn.Module | None = None  # q, k, v fused into one matmul (quant/fuse.py), else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                kv: KVBuffer | None, slots: torch.Tensor | None, kv_len: int) -> torch.Tensor:
        """mask (B, 1, T, S) from ModelCache.prepare (or causal over x alone without a cache)."""
        B, T, _ = x.shape
        cfg = self.cfg
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        if self.wqkv is not None and not cfg.qk_norm:  # rotate q and k heads together: (B, T, H + KV, hd)
            qkv = self.wqkv(x).view(B, T, H + 2 * KV, hd)
            qk = apply_rope(qkv[:, :, :H + KV], *rope, cfg.rope_interleaved).transpose(1, 2)  # (B, H+KV, T, hd)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, :, H + KV:].transpose(1, 2)
        else:
            if self.wqkv is not None:
                q, k, v = self.wqkv(x).split([H * hd, KV * hd, KV * hd], dim=-1)
            else:
                q, k, v = self.wq(x), self.wk(x), self.wv(x)
            q, k, v = q.view(B, T, H, hd), k.view(B, T, KV, hd), v.view(B, T, KV, hd)  # (B, T, heads, hd)
            if cfg.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q = apply_rope(q, *rope, cfg.rope_interleaved).transpose(1, 2)  # (B, H, T, hd)
            k = apply_rope(k, *rope, cfg.rope_interleaved).transpose(1, 2)  # (B, KV, T, hd)
            v = v.transpose(1, 2)
        if kv is not None:
            assert slots is not None
            kv.write(slots, k, v)
            if kv.quantized and T <= FEW_QUERIES:  # decode steps attend on the 8-bit codes (kv_int8.py)
                o = torch.ops.leanlm_native.attend_int8(q, *kv.codes(kv_len), mask, self.scale)
                return self.wo(o.transpose(1, 2).reshape(B, T, -1))
            k, v = kv.view(kv_len)  # (B, KV, S, hd); k blocked (B, KV, S / 16, hd / 2, 16, 2) where cache.py says
        if T <= FEW_QUERIES and cfg.attn_softcap is None:
            o = self._few_query_attention(q, k, v, mask)
        elif self.flash_native and q.dtype == torch.bfloat16 and q.device.type == "cpu":
            o = torch.ops.leanlm_native.flash_attend(q, k, v, mask, self.scale)  # (kernels/flash.cpp: blocks
            # the mask rules out are skipped)
        elif cfg.attn_softcap is None:
            k = key_rows(k, v.shape[2])
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                               enable_gqa=cfg.n_kv_heads != cfg.n_heads)
        else:
            o = self._softcapped(q, key_rows(k, v.shape[2]), v, mask)
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))

    def _few_query_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
        """Attention for a few queries per sequence (a decode step, a speculative block) as fp32 reductions:
        CPU SDPA costs more per call than the work itself at this size, and every query row is computed the
        same way whatever T is (a verified block scores like single decode steps)."""
        B, H, T, hd = q.shape
        if self.few_native and q.device.type == "cpu":  # the same math, vectorised
            return torch.ops.leanlm_native.attend(q, k, v, mask, self.scale)  # (kernels/attention.cpp)
        k, KV = key_rows(k, v.shape[2]), k.shape[1]
        qg = q.reshape(B, KV, H // KV, T, hd)  # (B, KV, rep, T, hd): the query heads sharing each KV head
        s = (qg.float()[..., None, :] * k.float()[:, :, None, None]).sum(-1) * self.scale  # (B, KV, rep, T, S)
        s = s.masked_fill(~mask[:, :, None], float("-inf"))  # mask (B, 1, T, S) -> (B, 1, 1, T, S)
        p = torch.softmax(s, -1)
        o = (p[..., None] * v.float()[:, :, None, None]).sum(-2)  # (B, KV, rep, T, hd)
        return o.to(q.dtype).reshape(B, H, T, hd)

    def _softcapped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rep = self.cfg.n_heads // self.cfg.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = (q @ k.transpose(-1, -2)) * self.scale
        cap = self.cfg.attn_softcap
        s = torch.tanh(s / cap) * cap
        s = s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s.float(), -1).to(q.dtype) @ v


    def use_plan(self, plan: KernelPlan) -> None:
        cfg = self.cfg
        self.few_native = plan.attention and few_query_fits(cfg.head_dim)
        self.flash_native = plan.flash and cfg.attn_softcap is None and flash_fits(cfg.head_dim)
