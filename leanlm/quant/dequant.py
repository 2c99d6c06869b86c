"""Dequantization of GGUF tensors: the one place quantized bytes become float weights.

All supported block formats are decoded with vectorised torch ops (the `gguf` package's numpy
reference takes seconds on a 262k-row embedding): the legacy formats (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, blocks of 32) and the k-quants (Q2_K..Q6_K, super-blocks of 256). Every decoder does the
same float32 operations in the same order as `gguf.quants`, so tests check bit-exact equality.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGMLQuantizationType

from leanlm.errors import UnsupportedError
from leanlm.formats.gguf_file import GGUFFile

Q = GGMLQuantizationType
_FLOAT = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
_BLOCK_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q5_0: 22, Q.Q5_1: 24, Q.Q8_0: 34,
                Q.Q2_K: 84, Q.Q3_K: 110, Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}
_K_TYPES = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}  # super-blocks of 256 weights; the others have 32
SUPPORTED = set(_FLOAT) | set(_BLOCK_BYTES)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(N, 2) uint8 little-endian halves -> (N, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(N, 16) packed bytes -> (N, 32): low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """(N, 4) bytes of a little-endian uint32 -> (N, 32) bit j = 5th bit of element j (0 or 16)."""
    bits = (qh[:, :, None] >> torch.arange(8, dtype=torch.uint8)) & 1  # (N, 4, 8): byte i bit b = bit 8i+b
    return bits.reshape(-1, 32) << 4


def _shifts(*s: int) -> torch.Tensor:
    """Shift amounts as a (1, 1, len(s), 1) uint8 tensor, to split bytes into bit fields."""
    return torch.tensor(s, dtype=torch.uint8).view(1, 1, -1, 1)


def _k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 packed bytes per super-block -> 8 six-bit scales and 8 six-bit mins, (B, 8) each."""
    s = s.int()
    lo_sc, lo_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    hi_sc = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    hi_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], 1), torch.cat([lo_m, hi_m], 1)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    """(B, 84): 16 scale bytes (low nibble scale, high nibble min), 64 code bytes, d, dmin."""
    sc, d, dmin = b[:, :16], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (sc & 0xF).float())[:, :, None]  # (B, 16, 1): one scale per 16 weights
    ml = (dmin * (sc >> 4).float())[:, :, None]
    q = (b[:, 16:80].reshape(-1, 2, 1, 32) >> _shifts(0, 2, 4, 6)) & 3  # (B, 2, 4, 32): half, shift, byte
    return (dl * q.reshape(-1, 16, 16) - ml).reshape(-1, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    """(B, 110): 32 high-bit mask bytes, 64 bytes of 2-bit codes, 12 bytes of 6-bit scales, d."""
    s, d = b[:, 96:108], _f16(b[:, 108:110])
    lo = (s[:, None, :8] >> _shifts(0, 4)[0]) & 0xF  # (B, 2, 8): scale j's low 4 bits, j = 8 * k + byte
    hi = (s[:, None, 8:] >> _shifts(0, 2, 4, 6)[0]) & 3  # (B, 4, 4): scale j's top 2 bits, j = 4 * k + byte
    sc = (lo.reshape(-1, 16) | (hi.reshape(-1, 16) << 4)).float() - 32  # (B, 16)
    ql = (b[:, 32:96].reshape(-1, 2, 1, 32) >> _shifts(0, 2, 4, 6)) & 3  # (B, 2, 4, 32)
    qh = (b[:, None, :32] >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1  # (B, 8, 32): bit k of mask byte
    q = ((ql.reshape(-1, 16, 16) | (qh.reshape(-1, 16, 16) << 2)) - 4).view(torch.int8)  # high bit clear: -4
    return ((d * sc)[:, :, None] * q).reshape(-1, 256)


def _q45_k(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Shared Q4_K/Q5_K tail: uint8 codes q (B, 8, 32) with d, dmin and the 6-bit scales of header b."""
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k4_scales(b[:, 4:16])  # (B, 8)
    dl, ml = (d * sc.float())[:, :, None], (dmin * mn.float())[:, :, None]  # (B, 8, 1)
    return (dl * q.reshape(-1, 8, 32) - ml).reshape(-1, 256)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    """(B, 144): d, dmin, 12 scale bytes, 4 chunks of 32 bytes = 64 codes (low nibbles first)."""
    return _q45_k(b, (b[:, 16:].reshape(-1, 4, 1, 32) >> _shifts(0, 4)) & 0xF)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    """(B, 176): Q4_K's header, 32 bytes of fifth bits (bit j for sub-block j), 128 bytes of nibbles."""
    ql = (b[:, 48:].reshape(-1, 4, 1, 32) >> _shifts(0, 4)) & 0xF  # (B, 4, 2, 32)
    qh = (b[:, None, 16:48] >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1  # (B, 8, 32)
    return _q45_k(b, ql.reshape(-1, 8, 32) | (qh << 4))


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    """(B, 210): 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, d."""
    ql = (b[:, :128].reshape(-1, 2, 1, 64) >> _shifts(0, 4)) & 0xF  # (B, 2, 2, 64): half, nibble, byte
    qh = (b[:, 128:192].reshape(-1, 2, 1, 32) >> _shifts(0, 2, 4, 6)) & 3  # (B, 2, 4, 32)
    q = ((ql.reshape(-1, 16, 16) | (qh.reshape(-1, 16, 16) << 4)) - 32).view(torch.int8)  # (B, 16, 16)
    sc = b[:, 192:208].contiguous().view(torch.int8).float()  # (B, 16)
    return ((_f16(b[:, 208:210]) * sc)[:, :, None] * q).reshape(-1, 256)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * b[:, 2:].view(torch.int8)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]) + _f16(b[:, 2:4])


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * ((_nibbles(b[:, 6:]) | _high_bits(b[:, 2:6])).float() - 16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * (_nibbles(b[:, 8:]) | _high_bits(b[:, 4:8])) + _f16(b[:, 2:4])


_DECODERS = {Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q8_0: _q8_0,
             Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
_CHUNK = 1 << 20  # weights decoded per step: the temporaries stay in cache (several times faster)


def dequantize_blocks(raw: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Decode quantized blocks: raw uint8 (N * block_bytes,) -> float32 (N * block_weights,)."""
    if qtype not in _BLOCK_BYTES:
        raise UnsupportedError(f"GGML type {qtype.name} is not a block format leanlm can decode")
    b, decode = raw.view(-1, _BLOCK_BYTES[qtype]), _DECODERS[qtype]
    per_block = 256 if qtype in _K_TYPES else 32
    out = torch.empty(b.shape[0], per_block)  # (N, weights per block)
    step = _CHUNK // per_block
    for i in range(0, b.shape[0], step):
        out[i:i + step] = decode(b[i:i + step])
    return out.view(-1)


def _check(f: GGUFFile, name: str) -> None:
    qtype = f.tensors[name].qtype
    if qtype not in SUPPORTED:
        raise UnsupportedError(f"tensor {name} has GGML type {qtype.name}, which leanlm does not support yet")


def _bytes(raw: np.ndarray | memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A read-only buffer as a flat tensor (no copy; the memory map is never written through)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(raw, dtype=dtype)


def dequantize(f: GGUFFile, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Tensor `name` of `f` as a dense `dtype` tensor in PyTorch shape order."""
    _check(f, name)
    info = f.tensors[name]
    if info.qtype in _FLOAT:
        return _bytes(f.raw(name), _FLOAT[info.qtype]).reshape(info.shape).to(dtype, copy=True)
    return dequantize_blocks(_bytes(f.raw(name), torch.uint8), info.qtype).reshape(info.shape).to(dtype)


def dequantize_rows(f: GGUFFile, name: str, start: int, end: int) -> torch.Tensor:
    """Rows start..end-1 of a 2-D tensor as fp32, decoding only those rows' bytes."""
    _check(f, name)
    info = f.tensors[name]
    row_bytes = info.nbytes // info.shape[0]
    raw = f.raw(name)[start * row_bytes:end * row_bytes]
    if info.qtype in _FLOAT:
        return _bytes(raw, _FLOAT[info.qtype]).to(torch.float32, copy=True).view(end - start, -1)
    return dequantize_blocks(_bytes(raw, torch.uint8), info.qtype).view(end - start, -1)
