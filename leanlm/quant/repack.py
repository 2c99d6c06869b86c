"""GGUF tensors of every supported block type repacked, exactly, for the int4 CPU kernel.

The kernel computes, per group of 32 inputs, ((q - 8) * scale + zero) * x with 4-bit q and bf16
scale/zero (int4.py). Formats with more bits are split into two planes of 4 bits, code = lo + 16 hi,
over an input expanded plane by plane (`Int4Parts`): the hi plane's group gets scale 16 s (a power-
of-two multiple, so exact in bf16). Sixteen-weight sub-blocks (Q2_K, Q3_K, Q6_K) pair each
sub-block with a second plane in one kernel group of 32. Zeros are kept to 0, a power-of-two
multiple of the scale, or the format's own minimum, so bf16 rounds nothing a decoder would not.

    type   stored bits  kernel bits  planes (g x P, mults)   per group
    Q4_0   4.5          4 + 1        32 x 1                   q = c,      zero 0
    Q4_1   5            4 + 1        32 x 1                   q = c,      zero m + 8 d
    Q4_K   4.5          4 + 1        32 x 1                   q = c,      zero 8 s - dm
    Q5_0   5.5          8 + 2        32 x 2 (1, 1)            lo: zero 8 d;  hi: q = h + 7, scale 16 d
    Q5_1   6            8 + 2        32 x 2 (1, 1)            lo: zero 8 d;  hi: q = h + 8, scale 16 d, zero m
    Q5_K   5.5          8 + 2        32 x 2 (1, 1)            as Q5_1 with s = d sc_j, m = -dmin m_j
    Q8_0   8.5          8 + 2        32 x 2 (1, 1)            qs = 16 h + l (h = qs >> 4 in -8..7): q_hi = h + 8
    Q6_K   6.6          8 + 1        16 x 2 (1, 8)            [lo | 2 h + 5], zero 0: lo - 8 + 8 (2h - 3) = c - 32
    Q3_K   3.4          8 + 1        16 x 2 (1, 0)            [c | padding], zero 4 s
    Q2_K   2.6          8 + 1        16 x 2 (1, 0)            [c | padding], zero 8 s - dm

"kernel bits" = code bits + bf16 scale/zero per 32 weights of the expanded input.
Q5_0, Q5_1, Q5_K, Q6_K and Q8_0 also give their codes whole (`Int4Parts.wide`: 5, 6 or 8 bits, w = c s + b):
our VNNI kernel reads those at about their own size instead of the two planes.
"""

from __future__ import annotations

import warnings

import torch
from gguf import GGMLQuantizationType

from leanlm.formats.gguf_file import GGUFFile
from leanlm.quant.dequant import _f16, _high_bits, _k4_scales, _nibbles
from leanlm.quant.int4 import GROUP, Int4Linear, Int4Parts

Q = GGMLQuantizationType
REPACKED = (Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q8_0, Q.Q6_K, Q.Q3_K, Q.Q2_K)
_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q5_0: 22, Q.Q5_1: 24, Q.Q8_0: 34,
          Q.Q2_K: 84, Q.Q3_K: 110, Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}


def _planes(N: int, lo: torch.Tensor, hi: torch.Tensor, g: int) -> torch.Tensor:
    """Interleave two (N, K) code planes per group of g -> (N, 2K): [lo_0..g-1, hi_0..g-1, lo_g.., ...]."""
    return torch.stack([lo.view(N, -1, g), hi.view(N, -1, g)], dim=2).view(N, -1)


def _sz(N: int, *cols: torch.Tensor) -> torch.Tensor:
    """Per-group values of consecutive kernel groups: (N, G) each -> (N, G * len(cols)) interleaved."""
    return torch.stack([c.reshape(N, -1) for c in cols], dim=2).view(N, -1)


def _k_bits(b: torch.Tensor, shifts: int) -> torch.Tensor:
    """Q2_K/Q3_K low bits: 64 bytes -> (B, 256) 2-bit fields; element 128 n + 32 j + l is bits 2j of byte 32 n + l."""
    q = b.reshape(-1, 2, 1, 32) >> (2 * torch.arange(shifts, dtype=torch.uint8)).view(1, 1, -1, 1)
    return (q & 3).reshape(-1, 256)


def _q3_scales(s: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 bytes -> 16 six-bit scales (B, 16): low 4 bits from bytes 0..7 (two nibbles each),
    high 2 bits of scale j from byte 8 + j % 4 at bit 2 (j // 4)."""
    s = s.int()
    low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], 1)  # j < 8: byte j low nibble; j >= 8: byte j - 8 high
    j = torch.arange(16)
    high = (s[:, 8 + j % 4] >> (2 * (j // 4))) & 3
    return low | (high << 4)


def _q6_codes(b: torch.Tensor) -> torch.Tensor:
    """Q6_K ql (128 bytes) and qh (64 bytes) -> (B, 256) codes 0..63.

    Half n (128 weights) uses ql[64 n : 64 n + 64] and qh[32 n : 32 n + 32]; within it position
    32 k + l (k = 0..3) takes the low (k < 2) or high nibble of ql[l + 32 (k % 2)] and bits 2k, 2k+1 of qh[l].
    """
    ql = b[:, :128].reshape(-1, 2, 2, 32)  # (B, half, k % 2, l)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    low = torch.stack([ql & 0xF, ql >> 4], dim=2).reshape(-1, 2, 4, 32)  # k = 0, 1 low nibbles, k = 2, 3 high
    high = (qh >> (2 * torch.arange(4, dtype=torch.uint8)).view(1, 1, 4, 1)) & 3
    return (low | (high << 4)).reshape(-1, 256)


def int4_parts(f: GGUFFile, name: str) -> Int4Parts:
    """Repack GGUF tensor `name` (one of REPACKED) for Int4Linear."""
    info = f.tensors[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(f.raw(name), dtype=torch.uint8)
    return repack(raw, info.qtype, *info.shape)


def repack(raw: torch.Tensor, t: GGMLQuantizationType, N: int, K: int) -> Int4Parts:
    """GGUF bytes (uint8) of an (N, K) tensor of type t -> the kernel's parts (q, scale, zero, planes)."""
    b = raw.view(-1, _BYTES[t])
    if t in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):
        d = _f16(b[:, :2]).view(N, -1)  # (N, K/32)
    if t == Q.Q4_0:
        return Int4Parts(_nibbles(b[:, 2:]).view(N, K), d, torch.zeros_like(d))
    if t == Q.Q4_1:
        return Int4Parts(_nibbles(b[:, 4:]).view(N, K), d, _f16(b[:, 2:4]).view(N, -1) + 8 * d)
    if t == Q.Q5_0:
        lo, hi = _nibbles(b[:, 6:]), _high_bits(b[:, 2:6]) >> 4
        return Int4Parts(_planes(N, lo, hi + 7, 32), _sz(N, d, 16 * d), _sz(N, 8 * d, 0 * d), 32, (1.0, 1.0),
                         ((lo + 16 * hi).view(N, K), d, -16 * d))
    if t == Q.Q5_1:
        lo, hi = _nibbles(b[:, 8:]), _high_bits(b[:, 4:8]) >> 4
        m = _f16(b[:, 2:4]).view(N, -1)
        return Int4Parts(_planes(N, lo, hi + 8, 32), _sz(N, d, 16 * d), _sz(N, 8 * d, m), 32, (1.0, 1.0),
                         ((lo + 16 * hi).view(N, K), d, m))
    if t == Q.Q8_0:
        qs = b[:, 2:].view(torch.int8).int()
        return Int4Parts(_planes(N, qs & 15, (qs >> 4) + 8, 32), _sz(N, d, 16 * d), _sz(N, 8 * d, 0 * d), 32,
                         (1.0, 1.0), ((qs + 128).view(N, K), d, -128 * d))
    return _repack_kquant(b, t, N, K)


def _repack_kquant(b: torch.Tensor, t: GGMLQuantizationType, N: int, K: int) -> Int4Parts:
    """`repack` for the K-quants: super-blocks of 256 weights in 16- or 32-weight sub-blocks."""
    if t in (Q.Q4_K, Q.Q5_K):  # super-blocks of 256: d, dmin, 12 bytes of 6-bit scales and mins, codes
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])  # (B, 1)
        sc, mn = _k4_scales(b[:, 4:16])  # (B, 8)
        s, m = (d * sc).view(N, -1), (-dmin * mn).view(N, -1)  # (N, K/32)
        qs = b[:, -128:].reshape(-1, 4, 32)  # chunk c of 32 bytes: sub-block 2c in low nibbles, 2c + 1 in high
        lo = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(N, K)
        if t == Q.Q4_K:
            return Int4Parts(lo, s, 8 * s + m)
        qh = b[:, 16:48].reshape(-1, 1, 32)  # bit j of qh[l] is the 5th bit of element 32 j + l
        hi = ((qh >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)) & 1).reshape(N, K)
        return Int4Parts(_planes(N, lo, hi + 8, 32), _sz(N, s, 16 * s), _sz(N, 8 * s, m), 32, (1.0, 1.0),
                         (lo + 16 * hi, s, m))
    if t == Q.Q6_K:
        c = _q6_codes(b).int()
        s = (_f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8).float()).view(N, -1)  # (N, K/16)
        return Int4Parts(_planes(N, c & 15, 2 * (c >> 4) + 5, 16), s, torch.zeros_like(s), 16, (1.0, 8.0),
                         (c.view(N, K), s, -32 * s))
    if t == Q.Q3_K:  # hmask[32], qs[64], scales[12], d; code = low 2 bits + 4 * hmask bit, w = d (sc - 32)(c - 4)
        hbit = (b[:, :32].reshape(-1, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 2, 4, 1)) & 1
        c = _k_bits(b[:, 32:96], 4) | (hbit.reshape(-1, 256) << 2)
        s = (_f16(b[:, 108:110]) * (_q3_scales(b[:, 96:108]) - 32).float()).view(N, -1)  # (N, K/16)
        return Int4Parts(_planes(N, c.view(N, K), torch.full((N, K), 8), 16), s, 4 * s, 16, (1.0, 0.0))
    assert t == Q.Q2_K, t  # scales[16] (low nibble scale, high nibble min), qs[64], d, dmin
    sc = b[:, :16].int()
    s = (_f16(b[:, 80:82]) * (sc & 0xF).float()).view(N, -1)
    m = (_f16(b[:, 82:84]) * (sc >> 4).float()).view(N, -1)
    c = _k_bits(b[:, 16:80], 4).view(N, K)
    return Int4Parts(_planes(N, c, torch.full((N, K), 8), 16), s, 8 * s - m, 16, (1.0, 0.0))


def int4_linear(f: GGUFFile, name: str, bias: torch.Tensor | None = None) -> Int4Linear:
    return Int4Linear(int4_parts(f, name), bias=bias)


__all__ = ["GROUP", "REPACKED", "int4_parts", "int4_linear", "repack"]
