"""GGUF block formats as quantizers: fit per-group parameters, choose codes, pack bytes.

Every format we write decodes, per group of `group` consecutive weights in a row, as

    w = scale * code + offset            code an integer in 0..qmax

(Q4_0: scale d, offset -8 d; Q4_K: scale d*sc_j, offset -dmin*m_j; ...). Quantizing is split in
three steps so that round-to-nearest (RTN), GPTQ and AWQ share them:

    fit   = fmt.fit(w)                    # per-group scale/offset, as llama.cpp's reference quantizer
    codes = fmt.codes(w, fit)             # rounding to the fitted groups
    codes = fmt.codes(w[:, c], fit, c)    # ... of columns c only (GPTQ rounds one column at a time)
    raw   = fmt.pack(codes, fit)          # (N, row_bytes) uint8, the GGUF tensor data
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from gguf import GGMLQuantizationType


@dataclass
class Fit:
    scale: torch.Tensor  # (N, K // group) fp32, the effective scale after any sub-scale quantization
    offset: torch.Tensor  # (N, K // group) fp32
    fields: dict[str, torch.Tensor] = field(default_factory=dict)  # raw block fields the packer writes


class BlockFormat(Protocol):
    qtype: GGMLQuantizationType
    group: int  # weights sharing one (scale, offset)
    block: int  # weights per GGUF block (32, or 256 for k-quants); K must be a multiple
    qmax: int  # codes are 0..qmax

    def fit(self, w: torch.Tensor) -> Fit: ...
    def codes(self, w: torch.Tensor, fit: Fit, cols: torch.Tensor | None = None) -> torch.Tensor: ...
    def pack(self, codes: torch.Tensor, fit: Fit) -> np.ndarray: ...


def expand(per_group: torch.Tensor, group: int) -> torch.Tensor:
    """(N, G) -> (N, G * group): each group's value repeated for its columns."""
    return per_group.repeat_interleave(group, dim=1)


def dequant(codes: torch.Tensor, fit: Fit, group: int) -> torch.Tensor:
    """fp32 weights the packed tensor decodes to."""
    return codes.float() * expand(fit.scale, group) + expand(fit.offset, group)


def quantize_rtn(w: torch.Tensor, fmt: BlockFormat) -> np.ndarray:
    """Round-to-nearest: the GGUF bytes of fp32 `w` (N, K) in format `fmt`."""
    fit = fmt.fit(w)
    return fmt.pack(fmt.codes(w, fit), fit)
