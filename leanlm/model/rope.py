"""Rotary position embeddings: frequencies (with YaRN), the cos/sin tables of positions, and the rotation.

Shapes: B batch, T tokens, heads, hd head dim; the first rot_dim dims of each head rotate.
"""

from __future__ import annotations

import math

import torch

from leanlm.model.config import YarnConfig


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
