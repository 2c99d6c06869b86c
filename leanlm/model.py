"""The one transformer family. Llama, Gemma 3 and their relatives differ only by ModelConfig fields.

Shapes: B batch, T new tokens, S cached slots, H query heads, KV key/value heads, hd head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .cache import KVBuffer, ModelCache, attention_mask, key_rows
from .config import ModelConfig, YarnConfig
from .moe import MoE

FEW_QUERIES = 16  # up to this many query tokens per sequence, attention runs as fp32 reductions (see below)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, add_one: bool = False) -> None:
        super().__init__()
        self.eps, self.add_one = eps, add_one
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() + 1.0 if self.add_one else self.weight.float()
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and _native_rows():  # the same math, one pass
            return torch.ops.leanlm_native.rms_norm(x, w, self.eps)  # (kernels/rowops.cpp)
        return F.rms_norm(x.float(), w.shape, w, self.eps).to(x.dtype)  # normalise in fp32


def rope_frequencies(rot_dim: int, base: float, yarn: YarnConfig | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies (rot_dim // 2,) fp32: base^(-2i / rot_dim), or YaRN's blend of them.

    YaRN: pair i turns L / wavelength_i times over the original context L. Pairs turning more than beta_fast
    times keep their frequency, pairs turning fewer than beta_slow times are divided by `factor`, and a linear
    ramp over the dims in between blends the two. The dim of a given turn count r is
    rot_dim * log(L / (2 pi r)) / (2 log base); e.g. rot_dim 64, base 10000, L 4096, beta 32 and 1: dims 10.5
    and 22.5, rounded out to 10 and 23.
    """
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, device=device).float() / rot_dim)
    if yarn is None:
        return inv_freq

    def dim_of(turns: float) -> float:
        return rot_dim * math.log(yarn.original_context / (turns * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = dim_of(yarn.beta_fast), dim_of(yarn.beta_slow)
    if yarn.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, rot_dim - 1)
    i = torch.arange(rot_dim // 2, device=device).float()
    ramp = ((i - lo) / (hi - lo if hi != lo else 0.001)).clamp(0, 1)  # 0: frequency kept, 1: divided by factor
    return inv_freq / yarn.factor * ramp + inv_freq * (1 - ramp)


def rope_tables(positions: torch.Tensor, rot_dim: int, base: float, scale: float = 1.0,
                dtype: torch.dtype = torch.float32,
                yarn: YarnConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, 1, rot_dim // 2) for positions (B, T)."""
    inv_freq = rope_frequencies(rot_dim, base, yarn, positions.device)
    angles = (positions.float() / scale)[..., None] * inv_freq  # (B, T, rot_dim/2)
    cos, sin = angles.cos(), angles.sin()
    if yarn is not None:
        cos, sin = cos * yarn.attention_factor, sin * yarn.attention_factor
    return cos.to(dtype)[:, :, None], sin.to(dtype)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first 2*cos.shape[-1] dims of x (B, T, heads, hd).

    interleaved: pairs are (x0, x1), (x2, x3), ... (GGUF llama order);
    otherwise pairs are (x_i, x_{i+d/2}) over the rotary dims (NeoX / Hugging Face order).
    """
    rd = 2 * cos.shape[-1]
    xr, xpass = x[..., :rd], x[..., rd:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out, xpass), dim=-1) if xpass.numel() else out


class Attention(nn.Module):
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
        elif cfg.attn_softcap is None and q.dtype == torch.bfloat16 and q.device.type == "cpu" and \
                hd in (64, 96, 128, 256) and _native_flash():  # blocks the mask rules out are skipped
            o = torch.ops.leanlm_native.flash_attend(q, k, v, mask, self.scale)  # (kernels/flash.cpp)
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
        if q.device.type == "cpu" and hd % 16 == 0 and _native_attention():  # the same math, vectorised
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


def _native_attention() -> bool:
    """compiled.py marks this with `torch.compiler.assume_constant_result` before tracing, so a compiled graph
    asks once (the call may build the library); marking it here would import dynamo into every process (1 s)."""
    return native.attention()


def _native_flash() -> bool:
    """Do prompts' bf16 attention run on our operator (kernels/flash.cpp)? (marked by compiled.py as above)"""
    return native.flash_attention()


def _native_rows() -> bool:
    """Norms and gated activations of bf16 rows on our operators? (marked by compiled.py as above)"""
    return native.row_ops()


class FeedForward(nn.Module):
    """Gated MLP: w2(act(w1 x) * w3 x)  (w1 = gate, w3 = up, w2 = down)."""

    def __init__(self, cfg: ModelConfig, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden = hidden_dim or cfg.hidden_dim
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.act = cfg.act
        self.w13: nn.Module | None = None  # gate and up fused into one matmul (quant/fuse.py), else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            g, u = self.w13(x).chunk(2, dim=-1)
        else:
            g, u = self.w1(x), self.w3(x)
        if g.dtype == torch.bfloat16 and g.device.type == "cpu" and _native_rows():  # the same math, one pass
            return self.w2(torch.ops.leanlm_native.gated(g, u, int(self.act != "silu")))  # (kernels/rowops.cpp)
        g = F.silu(g) if self.act == "silu" else F.gelu(g, approximate="tanh")
        return self.w2(g * u)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.window = cfg.layer_windows[layer]
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_add_one)
        if cfg.mla is not None:
            from .mla import MLAttention  # (mla.py builds on this file's norms and rotary embedding)

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
