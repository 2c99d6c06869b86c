"""Per-row int8 weights on PyTorch's CPU int8 kernel: used for the output head and its tied embedding.

The head is the largest matrix read per decoded token (Gemma 3: 262144 x 640). Each row is requantized
symmetrically to int8 with a bf16 scale (codes computed against the rounded scale, so the kernel's
dequantization q * scale is exactly what was intended); the error is at most half a step per weight.
On CPUs with AVX-512 VNNI the codes are kept in the tiled layout of kernels/int8_head.cpp (`head_pack`;
activations quantised to int8 per group of 32, as llama.cpp's Q8_0 head does), and the tied embedding
reads its rows from that layout. Elsewhere few rows (decode) run on native.py's C kernels and many on
`aten._weight_int8pack_mm`, which wants bf16 activations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from leanlm.kernels.build import int8_matmul
from leanlm.kernels.plan import KernelPlan

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


def tiled_fits(codes: torch.Tensor, plan: KernelPlan) -> bool:
    """Can these (N, K) codes use kernels/int8_head.cpp (its tiles pair 32 outputs, its groups are 32 wide)?"""
    return codes.device.type == "cpu" and codes.shape[0] % 32 == 0 and codes.shape[1] % 32 == 0 and plan.int8_head


def head_pack(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, K) -> the same memory as uint8 codes + 128 in kernels/int8_head.cpp's layout: per tile
    of 16 outputs and group of 32 inputs, 8 vectors whose lane l holds 4 consecutive codes of output l.
    Packed ROWS_PER_STEP rows at a time, in place (tiles never cross a block): no second copy of the head."""
    N, K = codes.shape
    out = codes.view(torch.uint8)
    for s in range(0, N, ROWS_PER_STEP):
        e = min(s + ROWS_PER_STEP, N)
        u = (codes[s:e].to(torch.int16) + 128).to(torch.uint8)  # (n, K)
        out[s:e] = u.view(-1, 16, K // 32, 8, 4).permute(0, 2, 3, 1, 4).reshape(e - s, K)
    return out


def tiled_rows(codes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ids (...) of tiled codes (N, K) as int16 weights (..., K): the inverse of `head_pack` per row."""
    N, K = codes.shape
    u = codes.view(N // 16, K // 32, 8, 16, 4)[ids // 16, :, :, ids % 16]  # (..., K/32, 8, 4)
    return u.reshape(*ids.shape, K).to(torch.int16) - 128


class Int8Linear(nn.Module):
    """The output head: int8 codes with a bf16 scale per row, tiled for our VNNI kernel where it fits."""

    kernel = 0  # untiled: build.int8_matmul's kernel (0 PyTorch's, 1 C, 2 C VNNI), set by `use_plan`

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, plan: KernelPlan | None = None) -> None:
        """Takes codes (N, K) int8 over: where tiled, they are packed in place. plan: the kernels to lay the
        codes out for (default: this process's, kernels/plan.py)."""
        super().__init__()
        plan = plan or KernelPlan.resolve(codes.device)
        self.out_features, self.in_features = codes.shape
        self.tiled = tiled_fits(codes, plan)
        self.use_plan(plan)
        self.register_buffer("codes", head_pack(codes) if self.tiled else codes)  # (N, K) uint8 tiled / int8
        self.register_buffer("scales", scales)  # (N,) bf16

    def use_plan(self, plan: KernelPlan) -> None:
        """The untiled head's kernel under `plan` (Transformer.apply_plan); the layout stays as built."""
        self.kernel = 0 if not plan.c_kernels else 2 if plan.vnni_head else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., N) in fp32 (these are logits: no rounding to bf16)."""
        x2 = x.reshape(-1, self.in_features)
        if self.tiled:
            y = torch.ops.leanlm_native.int8_mm(x2, self.codes, self.scales)  # (M, N)
        else:
            y = int8_matmul(x2, self.codes, self.scales, self.kernel)  # (M, N)
        return y.view(*x.shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """Embedding lookup from int8 rows; `tied` shares a head's codes and scales (in whichever layout)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, tiled: bool = False) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.dtype, self.tiled = dtype, tiled

    @classmethod
    def tied(cls, head: Int8Linear, dtype: torch.dtype) -> Int8Embedding:
        return cls(head.codes, head.scales, dtype, head.tiled)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = tiled_rows(self.codes, ids) if self.tiled else self.codes[ids]
        return rows.to(self.dtype) * self.scales[ids, None].to(self.dtype)  # (B, T, D)
