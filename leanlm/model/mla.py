"""Multi-head latent attention (DeepSeek-V2): the cache holds one small latent per token, not per-head K/V.

Per token, x (D) -> c = norm(W_dkv x) (kv_rank) and a rotary key k_rope (rope_dim) shared by all heads; the
cache keeps only those two (cache.LatentBuffer). Head h's key and value are expanded from c by the two halves
of `wkv_b` (W_uk[h]: nope_dim x kv_rank, W_uv[h]: v_dim x kv_rank):

    k[h] = (W_uk[h] c, k_rope)        v[h] = W_uv[h] c

so a query q[h] = (q_nope, q_rope) scores a cached token as  q_nope . W_uk[h] c + q_rope . k_rope
= (W_uk[h]^T q_nope) . c + q_rope . k_rope.  Decoding therefore never expands the cache: each query is
moved into latent space once (`q_lat`, kv_rank wide), scored against the latents directly, and the weighted
sum of latents is mapped to the head's output by W_uv[h] afterwards ("absorbed" weights). Prompts, with many
queries per cached token, expand the keys and values and use ordinary attention instead (cheaper there).
Worked sizes, DeepSeek-V2: 128 heads, kv_rank 512, rope_dim 64, nope_dim 128, v_dim 128: 576 cached numbers
a token against 128 * (192 + 128) = 40960 for the expanded keys and values.

Rotary embedding on the rope parts rotates adjacent pairs (transformers' DeepseekV2: complex products).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.model.attention import FEW_QUERIES
from leanlm.model.cache import LatentBuffer
from leanlm.model.config import ModelConfig
from leanlm.model.layers import RMSNorm
from leanlm.model.rope import apply_rope


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.mla is not None
        self.cfg, m, H, D = cfg, cfg.mla, cfg.n_heads, cfg.dim
        qd = m.nope_dim + m.rope_dim
        self.wq: nn.Module | None = None
        if m.q_rank is None:
            self.wq = nn.Linear(D, H * qd, bias=False)
        else:  # queries through their own normalised latent
            self.wq_a = nn.Linear(D, m.q_rank, bias=cfg.attn_bias)
            self.q_norm = RMSNorm(m.q_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(m.q_rank, H * qd, bias=False)
        self.wkv_a = nn.Linear(D, m.kv_rank + m.rope_dim, bias=cfg.attn_bias)  # -> (c before its norm, k_rope)
        self.kv_norm = RMSNorm(m.kv_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(m.kv_rank, H * (m.nope_dim + m.v_dim), bias=False)  # -> per head (k_nope, v)
        self.wo = nn.Linear(H * m.v_dim, D, bias=cfg.attn_bias)
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else qd**-0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                kv: LatentBuffer | None, slots: torch.Tensor | None, kv_len: int) -> torch.Tensor:
        """x (B, T, D), mask (B, 1, T, S) -> (B, T, D); the same signature as model.Attention."""
        B, T, _ = x.shape
        m, H = self.cfg.mla, self.cfg.n_heads
        q = self.wq(x) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, H, m.nope_dim + m.rope_dim)
        q_nope, q_rope = q[..., :m.nope_dim], apply_rope(q[..., m.nope_dim:], *rope, True)  # (B, T, H, *)
        c, k_rope = self.wkv_a(x).split([m.kv_rank, m.rope_dim], dim=-1)
        c = self.kv_norm(c)  # (B, T, kv_rank)
        k_rope = apply_rope(k_rope[:, :, None], *rope, True)[:, :, 0]  # (B, T, rope_dim): one "head"
        if kv is not None:
            assert slots is not None
            kv.write(slots, c, k_rope)
            c, k_rope = kv.view(kv_len)  # (B, S, kv_rank), (B, S, rope_dim)
        if T <= FEW_QUERIES and isinstance(self.wkv_b, nn.Linear):
            o = self._absorbed(q_nope, q_rope, c, k_rope, mask)
        else:
            o = self._expanded(q_nope, q_rope, c, k_rope, mask)
        return self.wo(o.reshape(B, T, H * m.v_dim))

    def _absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        """Attention on the latents themselves (few queries): -> (B, T, H, v_dim). The projections into and
        out of latent space run in the weights' dtype; scores, softmax and the latent sums in fp32."""
        m, H = self.cfg.mla, self.cfg.n_heads
        w = self.wkv_b.weight.view(H, m.nope_dim + m.v_dim, m.kv_rank)
        w_uk, w_uv = w[:, :m.nope_dim], w[:, m.nope_dim:]  # (H, nope, kv_rank), (H, v, kv_rank)
        cf = c.float()[:, None]  # (B, 1, S, kv_rank): shared by every head
        q_lat = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk).float()  # (B, H, T, kv_rank)
        s = q_lat @ cf.transpose(-1, -2) + q_rope.float().transpose(1, 2) @ k_rope.float()[:, None].transpose(-1, -2)
        s = (s * self.scale).masked_fill(~mask, float("-inf"))  # (B, H, T, S); mask (B, 1, T, S)
        o_lat = torch.softmax(s, dim=-1) @ cf  # (B, H, T, kv_rank)
        return torch.einsum("bhtr,hvr->bthv", o_lat.to(w.dtype), w_uv)  # (B, T, H, v)

    def _expanded(self, q_nope: torch.Tensor, q_rope: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        """Ordinary attention over the expanded per-head keys and values (prompts): -> (B, T, H, v_dim)."""
        m, H = self.cfg.mla, self.cfg.n_heads
        B, S = c.shape[:2]
        k_nope, v = self.wkv_b(c).view(B, S, H, m.nope_dim + m.v_dim).split([m.nope_dim, m.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(B, S, H, m.rope_dim)], dim=-1)  # (B, S, H, qd)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, T, H, qd)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           scale=self.scale)  # (B, H, T, v)
        return o.transpose(1, 2)
