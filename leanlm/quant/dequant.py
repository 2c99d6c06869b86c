"""Dequantization of GGUF tensors: the one place quantized bytes become float weights.

The legacy block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are decoded here with vectorised torch
ops (the `gguf` package's numpy reference takes seconds on a 262k-row embedding); the k-quants
use the `gguf` package's reference implementation. Tests check both against `gguf.quants`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from ..errors import UnsupportedError
from ..gguf_file import GGUFFile

Q = GGMLQuantizationType
SUPPORTED = {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
_BLOCK_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q5_0: 22, Q.Q5_1: 24, Q.Q8_0: 34}


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


def dequantize_blocks(raw: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Decode legacy-format blocks: raw uint8 (N * block_bytes,) -> float32 (N * 32,)."""
    b = raw.view(-1, _BLOCK_BYTES[qtype])
    if qtype == Q.Q8_0:
        return (_f16(b[:, :2]) * b[:, 2:].view(torch.int8).float()).flatten()
    if qtype == Q.Q4_0:
        return (_f16(b[:, :2]) * (_nibbles(b[:, 2:]).float() - 8)).flatten()
    if qtype == Q.Q4_1:
        return (_f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])).flatten()
    if qtype == Q.Q5_0:
        q = _nibbles(b[:, 6:]) | _high_bits(b[:, 2:6])
        return (_f16(b[:, :2]) * (q.float() - 16)).flatten()
    q = _nibbles(b[:, 8:]) | _high_bits(b[:, 4:8])  # Q5_1
    return (_f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])).flatten()


def dequantize(f: GGUFFile, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Tensor `name` of `f` as a dense `dtype` tensor in PyTorch shape order."""
    info = f.tensors[name]
    if info.qtype not in SUPPORTED:
        raise UnsupportedError(f"tensor {name} has GGML type {info.qtype.name}, which leanlm does not support yet")
    raw = f.raw(name)
    if info.qtype in (Q.F32, Q.F16, Q.BF16):
        with warnings.catch_warnings():  # the memory map is read-only; we never write through it
            warnings.simplefilter("ignore", UserWarning)
            src = torch.frombuffer(raw, dtype={Q.F32: torch.float32, Q.F16: torch.float16,
                                               Q.BF16: torch.bfloat16}[info.qtype])
        return src.reshape(info.shape).to(dtype, copy=True)
    if info.qtype in _BLOCK_BYTES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            src = torch.frombuffer(raw, dtype=torch.uint8)
        return dequantize_blocks(src, info.qtype).reshape(info.shape).to(dtype)
    arr = quants.dequantize(raw, info.qtype)
    return torch.from_numpy(np.ascontiguousarray(arr).reshape(info.shape)).to(dtype)


def dequantize_rows(f: GGUFFile, name: str, start: int, end: int) -> torch.Tensor:
    """Rows start..end-1 of a 2-D tensor as fp32, decoding only those rows' bytes."""
    info = f.tensors[name]
    row_bytes = info.nbytes // info.shape[0]
    raw = f.raw(name)[start * row_bytes:end * row_bytes]
    if info.qtype in _BLOCK_BYTES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            src = torch.frombuffer(raw, dtype=torch.uint8)
        return dequantize_blocks(src, info.qtype).view(end - start, -1)
    if info.qtype in (Q.F32, Q.F16, Q.BF16) or info.qtype in SUPPORTED:
        np_dtype = {Q.F32: np.float32, Q.F16: np.float16}.get(info.qtype)
        arr = raw.view(np_dtype) if np_dtype is not None else quants.dequantize(raw, info.qtype)
        return torch.from_numpy(np.array(arr, np.float32)).view(end - start, -1)
    raise UnsupportedError(f"tensor {name} has GGML type {info.qtype.name}, which leanlm does not support yet")
