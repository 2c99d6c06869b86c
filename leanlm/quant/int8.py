"""Per-row int8 weights on PyTorch's CPU int8 kernel: used for the output head and its tied embedding.

The head is the largest matrix read per decoded token (Gemma 3: 262144 x 640). Each row is requantized
symmetrically to int8 with a bf16 scale (codes computed against the rounded scale, so the kernel's
dequantization q * scale is exactly what was intended); the error is at most half a step per weight.
Few rows (decode) run on our own kernel (native.py, about 2x PyTorch's); many rows on
`aten._weight_int8pack_mm`, which wants bf16 activations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..native import int8_matmul

ROWS_PER_STEP = 512  # rows decoded at a time: bounds load-time memory (640 columns: 1.25 MiB per fp32 temporary)


def quantize_rows(n_rows: int, rows: Callable[[int, int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (N, K) int8, scales (N,) bf16) from fp32 row blocks rows(start, end).

    The outputs are allocated once and filled block by block, so only one block's temporaries are alive.
    """
    codes: torch.Tensor | None = None
    scales = torch.empty(n_rows, dtype=torch.bfloat16)
    for s in range(0, n_rows, ROWS_PER_STEP):
        e = min(s + ROWS_PER_STEP, n_rows)
        w = rows(s, e)  # (n, K) fp32
        if codes is None:
            codes = torch.empty(n_rows, w.shape[1], dtype=torch.int8)
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12).to(torch.bfloat16)
        codes[s:e] = (w / scale.float()[:, None]).round_().clamp_(-127, 127)
        scales[s:e] = scale
    assert codes is not None, "no rows"
    return codes, scales


class Int8Linear(nn.Module):
    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes)  # (N, K) int8
        self.register_buffer("scales", scales)  # (N,) bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., N) in fp32 (these are logits: no rounding to bf16)."""
        y = int8_matmul(x.reshape(-1, self.in_features), self.codes, self.scales)  # (M, N)
        return y.view(*x.shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """Embedding lookup from int8 rows (shares codes and scales with a tied Int8Linear head)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.codes[ids].to(self.dtype) * self.scales[ids, None].to(self.dtype))  # (B, T, D)
