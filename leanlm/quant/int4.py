"""4-bit weights kept quantized in memory, multiplied by PyTorch's CPU int4 kernel.

GGUF's 4-bit formats are all "q * scale + offset per group of 32" once decoded, which is what
`aten._weight_int4pack_mm_for_cpu` computes: y = x @ ((q - 8) * scale + zero)^T, scale and zero in
bf16 per group of 32 along K. So:

    Q4_0  w = d * (q - 8)              -> scale = d,       zero = 0
    Q4_1  w = d * q + m                -> scale = d,       zero = m + 8 d
    Q4_K  w = d*sc_j * q - dmin*m_j    -> scale = d*sc_j,  zero = 8 d*sc_j - dmin*m_j   (sub-block j of 32)

The kernel wants bf16 activations (with fp32 it is 14-70x slower), so inputs are cast to bf16.
Only scale/zero rounding to bf16 differs from exact dequantization.
"""

from __future__ import annotations

import warnings

import torch
from gguf import GGMLQuantizationType
from torch import nn

from ..gguf_file import GGUFFile
from .dequant import _f16, _nibbles

Q = GGMLQuantizationType
INT4_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K)
GROUP = 32


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W stored as int4 codes packed for the CPU kernel, scales/zeros per 32."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None):
        """q: (N, K) integer codes 0..15; scale, zero: (N, K // 32)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int().contiguous(), 1))
        sz = torch.stack([scale.float(), zero.float()], dim=-1).transpose(0, 1)  # (K/32, N, 2)
        self.register_buffer("scales_zeros", sz.contiguous().to(torch.bfloat16))
        self.register_buffer("bias", bias.to(torch.bfloat16) if bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, GROUP, self.scales_zeros)  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={GROUP}"


def _k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 packed bytes per super-block -> 8 six-bit scales and 8 six-bit mins, (B, 8) each."""
    s = s.int()
    lo_sc, lo_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    hi_sc = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    hi_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], 1), torch.cat([lo_m, hi_m], 1)


def int4_parts(f: GGUFFile, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q (N, K), scale (N, K/32), zero (N, K/32)) of a Q4_0 / Q4_1 / Q4_K tensor, in kernel convention."""
    info = f.tensors[name]
    N, K = info.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(f.raw(name), dtype=torch.uint8)
    if info.qtype == Q.Q4_0:
        b = raw.view(-1, 18)
        d = _f16(b[:, :2]).view(N, K // GROUP)
        return _nibbles(b[:, 2:]).view(N, K), d, torch.zeros_like(d)
    if info.qtype == Q.Q4_1:
        b = raw.view(-1, 20)
        d, m = _f16(b[:, :2]).view(N, K // GROUP), _f16(b[:, 2:4]).view(N, K // GROUP)
        return _nibbles(b[:, 4:]).view(N, K), d, m + 8 * d
    assert info.qtype == Q.Q4_K, info.qtype
    b = raw.view(-1, 144)  # super-blocks of 256: d, dmin, 12 bytes of scales, 128 bytes of codes
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])  # (B, 1)
    sc, mn = _k4_scales(b[:, 4:16])  # (B, 8)
    qs = b[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 32 bytes = 64 codes: low nibbles, then high
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 256)  # (B, 256), sub-block j = codes 32j..32j+31
    scale = d * sc
    zero = 8 * scale - dmin * mn
    return q.view(N, K), scale.view(N, K // GROUP), zero.view(N, K // GROUP)


def int4_linear(f: GGUFFile, name: str, bias: torch.Tensor | None = None) -> Int4Linear:
    return Int4Linear(*int4_parts(f, name), bias=bias)


def dense_reference(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """fp32 weight from the parts: (q - 8) * scale + zero per group (the kernel's formula)."""
    N, K = q.shape
    w = (q.float().view(N, K // GROUP, GROUP) - 8) * scale[..., None] + zero[..., None]
    return w.view(N, K)

