"""4-bit weights kept quantized in memory, multiplied by our VNNI kernel or PyTorch's CPU int4 kernel.

GGUF's 4-bit formats are all "q * scale + offset per group of 32" once decoded, which is what
`aten._weight_int4pack_mm_for_cpu` computes: y = x @ ((q - 8) * scale + zero)^T, scale and zero in
bf16 per group of 32 along K. So:

    Q4_0  w = d * (q - 8)              -> scale = d,       zero = 0
    Q4_1  w = d * q + m                -> scale = d,       zero = m + 8 d
    Q4_K  w = d*sc_j * q - dmin*m_j    -> scale = d*sc_j,  zero = 8 d*sc_j - dmin*m_j   (sub-block j of 32)

The kernel wants bf16 activations (with fp32 it is 14-70x slower), so inputs are cast to bf16.
Only scale/zero rounding to bf16 differs from exact dequantization. Formats of more than 4 bits,
and those with 16-weight sub-blocks, become two 4-bit planes over an expanded input (`Int4Parts`,
repack.py does every GGUF type).

On CPUs with AVX-512 VNNI the weights are kept in our own layout instead (`vnni_pack`) and multiplied by
kernels/int4_vnni.cpp: w = q * s + b with fp16 s and b, activations quantised to int8 per group of 32 as
llama.cpp does; 2-2.5x PyTorch's kernel for 1-8 rows (bench/NOTES.md). Layouts with 16-input planes
stay on PyTorch's kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from leanlm.kernels.build import int4_dense
from leanlm.kernels.plan import KernelPlan

Q = GGMLQuantizationType
INT4_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K)
GROUP = 32
# From this many input rows on (prefill), a weight in PyTorch's int4 layout is unpacked to a temporary dense
# bf16 matrix and multiplied by PyTorch's bf16 matmul: 2-4x its int4 kernel's speed at 512 rows, even at 64.
DENSE_ROWS = 64
# The same for our VNNI layout; None: never. Our kernel runs near the CPU's int8 peak from a few rows on and
# needs no unpacking: prompts of 256 / 2048 tokens 1.18x / 1.04x faster on Gemma 3 and 1.38x / 1.05x on
# SmolLM2 than through the dense path, which also held a temporary bf16 copy of each weight (bench/NOTES.md).
VNNI_DENSE_ROWS: int | None = None


@dataclass
class Int4Parts:
    """A weight in the int4 kernel's form, possibly over an expanded input.

    q: (N, K * P) codes 0..15; scale, zero: (N, K * P / 32). The kernel's input is x expanded per
    group of `g` inputs into P planes, plane p multiplied by mults[p]; codes are laid out the same way.
    Formats of more than 4 bits are split into planes, w = lo + 16 hi (see repack.py), e.g. g=32, P=2:

        x  = [x0 .. x31 | x32 .. x63]                       K = 64
        x' = [x0 .. x31, x0 .. x31 | x32 .. x63, x32 .. x63]  K' = 128: (lo codes, hi codes) per group
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g: int = GROUP
    mults: tuple[float, ...] = (1.0,)
    # the same weight as one plane of wider codes, w = c * s + b per group of 32 (c (N, K) in 0..255, s and b
    # (N, K / 32)) or of 16 (Q6_K, c < 64), for our kernel: 5-8 bit formats then keep their size instead of
    # two 4-bit planes
    wide: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def dense(self) -> torch.Tensor:
        """fp32 (N, K) weight: the kernel's (q - 8) * scale + zero per group, planes folded back."""
        N, K2 = self.q.shape
        w = (self.q.float().view(N, K2 // GROUP, GROUP) - 8) * self.scale[..., None] + self.zero[..., None]
        w = w.view(N, -1, len(self.mults), self.g) * torch.tensor(self.mults).view(1, 1, -1, 1)  # (N, K/g, P, g)
        return w.sum(2).view(N, -1)


def vnni_pack(q: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Codes (N, K) in 0..2^bits - 1, N % 16 == 0, K % 32 == 0 -> (N, K / 2 + (bits - 4) K / 8) uint8 in
    kernels/int4_vnni.cpp's layout: tiles of 16 outputs, contiguous; per group of 32 inputs, 8 vectors whose
    lane l holds 4 consecutive codes of output l (vector i: inputs 4i..4i+3), vectors 2h and 2h + 1 in the low
    and high nibbles of 64 bytes; then, per bit above the fourth, 8 masks of 64 bits (bit j: byte j)."""
    N, K = q.shape
    T, G = N // 16, K // 32
    v = q.to(torch.uint8).view(T, 16, G, 8, 4).permute(0, 2, 3, 1, 4)  # (tile, g, i, lane, 4)
    lo = (v & 15).reshape(T, G, 4, 2, 64)  # (tile, g, h, low/high, 64 bytes)
    out = [(lo[:, :, :, 0] | lo[:, :, :, 1] << 4).reshape(T, G, 256)]
    weights = 1 << torch.arange(8, dtype=torch.uint8)
    for p in range(bits - 4):  # (tile, g, i, mask byte, bit)
        bit = ((v >> (4 + p)) & 1).reshape(T, G, 8, 8, 8)
        out.append((bit * weights).sum(-1, dtype=torch.uint8).reshape(T, G, 64))
    return torch.cat(out, -1).reshape(N, -1).contiguous()


def vnni_unpack(w: torch.Tensor, K: int) -> torch.Tensor:
    """The inverse of `vnni_pack`: (N, K) codes."""
    N = w.shape[0]
    T, G = N // 16, K // 32
    H = (w.shape[1] - K // 2) * 8 // K
    g = w.view(T, G, 256 + 64 * H)
    nib = g[..., :256].reshape(T, G, 4, 1, 64)
    c = torch.cat([nib & 15, nib >> 4], 3).reshape(T, G, 8, 64)  # (tile, g, i, 64 bytes)
    for p in range(H):
        masks = g[..., 256 + 64 * p:256 + 64 * (p + 1)].reshape(T, G, 8, 8, 1)
        c = c | (((masks >> torch.arange(8, dtype=torch.uint8)) & 1) << (4 + p)).reshape(T, G, 8, 64)
    return c.view(T, G, 8, 16, 4).permute(0, 3, 1, 2, 4).reshape(N, K)


def vnni_scales(s: torch.Tensor) -> torch.Tensor:
    """Per-group values (N, G) -> fp16 (N, G) laid out per tile of 16 outputs as (G, 16), as the kernel reads them."""
    N, G = s.shape
    return s.to(torch.float16).view(N // 16, 16, G).transpose(1, 2).reshape(N, G).contiguous()


def _pad16(t: torch.Tensor) -> torch.Tensor:
    """Zero rows up to a multiple of 16 (the kernel's tile); their outputs are dropped."""
    return F.pad(t, (0, 0, 0, -t.shape[0] % 16))


_WIDTHS = {4: 4, 5: 5, 6: 6, 7: 8, 8: 8}  # code bits -> the kernel's widths (4 + extra bit planes)


def _vnni_fits(parts: Int4Parts, plan: KernelPlan) -> bool:
    wide = parts.wide is not None and (parts.wide[1].shape[1] * GROUP == parts.wide[0].shape[1]
                                       or int(parts.wide[0].max()) < 64)  # 16-wide scales: 6 bits at most
    one_plane = wide or (parts.g == GROUP and all(m == 1.0 for m in parts.mults))
    return parts.q.device.type == "cpu" and parts.q.shape[1] % GROUP == 0 and one_plane and plan.int4_vnni


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W stored as int4 codes, scales per group of 32: in our VNNI layout (buffers w4,
    scales, mins) where the CPU has it, else packed for PyTorch's kernel (packed, scales_zeros)."""

    c_dense = False  # PyTorch's layout unpacked to dense bf16 by our C kernel for prefill (`use_plan`)

    def __init__(self, parts: Int4Parts, bias: torch.Tensor | None = None, plan: KernelPlan | None = None):
        """plan: the kernels to lay the weight out for (default: this process's, kernels/plan.py)."""
        super().__init__()
        plan = plan or KernelPlan.resolve(parts.q.device)
        self.use_plan(plan)
        self.out_features, k_expanded = parts.q.shape
        self.in_features = k_expanded // len(parts.mults)
        self.g = parts.g
        self.register_buffer("bias", bias.to(torch.bfloat16) if bias is not None else None)
        self.bits = 4
        if _vnni_fits(parts, plan):
            if parts.wide is not None:  # one plane of wider codes: 5, 6 (Q6_K: 16-wide scales) or 8 bits
                c, s, b = parts.wide
                self.planes, self.bits = 1, _WIDTHS[max(4, int(c.max()).bit_length())]
                if s.shape[1] * 16 == self.in_features:
                    self.bits = 6
            else:  # the input is repeated per group, once per plane
                c, s, b = parts.q, parts.scale.float(), parts.zero.float() - 8 * parts.scale.float()
                self.planes = len(parts.mults)
            self.register_buffer("w4", vnni_pack(_pad16(c), self.bits))
            self.register_buffer("scales", vnni_scales(_pad16(s.float())))
            self.register_buffer("mins", vnni_scales(_pad16(b.float())))
            return
        self.planes = 0  # PyTorch's layout: rows padded to its multiple of 16 (experts can be narrower)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(_pad16(parts.q.int()).contiguous(), 1)
        self.register_buffer("packed", packed)
        sz = torch.stack([_pad16(parts.scale.float()), _pad16(parts.zero.float())], dim=-1).transpose(0, 1)
        self.register_buffer("scales_zeros", sz.contiguous().to(torch.bfloat16))
        mults = None if parts.mults == (1.0,) else torch.tensor(parts.mults, dtype=torch.bfloat16).view(1, 1, -1, 1)
        self.register_buffer("mults", mults, persistent=False)

    def use_plan(self, plan: KernelPlan) -> None:
        """Routes of this module under `plan` (Transformer.apply_plan); the layout stays as built."""
        self.c_dense = plan.c_dense

    @staticmethod
    def cat(mods: list[Int4Linear]) -> Int4Linear | None:
        """One Int4Linear computing the outputs of `mods` (same input) side by side, or None when their
        layouts differ. The kernel packs rows in tiles of 64, so packed rows concatenate when each
        module's rows are a multiple of 64."""
        first = mods[0]
        if first.planes:  # our layout: rows are independent
            if any(m.planes != first.planes or m.in_features != first.in_features or m.out_features % 16
                   or (m.bias is None) != (first.bias is None) for m in mods):
                return None
            new = Int4Linear.__new__(Int4Linear)
            nn.Module.__init__(new)
            new.in_features, new.g, new.planes, new.c_dense = first.in_features, first.g, first.planes, first.c_dense
            new.out_features, new.bits = sum(m.out_features for m in mods), max(m.bits for m in mods)
            k = first.scales.shape[1] * GROUP  # codes per row (the expanded input)
            new.register_buffer("w4", torch.cat([m.w4 if m.bits == new.bits else  # narrower codes widened
                                                 vnni_pack(vnni_unpack(m.w4, k), new.bits) for m in mods]))
            for name in ("scales", "mins", "bias"):
                parts = [getattr(m, name) for m in mods]
                new.register_buffer(name, None if parts[0] is None else torch.cat(parts))
            return new
        same = all(m.in_features == first.in_features and m.g == first.g and m.out_features % 64 == 0
                   and not m.planes and (m.bias is None) == (first.bias is None)
                   and (m.mults is None if first.mults is None else m.mults is not None and
                        torch.equal(m.mults, first.mults)) for m in mods)
        if not same:
            return None
        new = Int4Linear.__new__(Int4Linear)
        nn.Module.__init__(new)
        new.in_features, new.g, new.planes, new.bits, new.c_dense = first.in_features, first.g, 0, 4, first.c_dense
        new.out_features = sum(m.out_features for m in mods)
        new.register_buffer("packed", torch.cat([m.packed for m in mods]))
        new.register_buffer("scales_zeros", torch.cat([m.scales_zeros for m in mods], dim=1))
        new.register_buffer("bias", None if first.bias is None else torch.cat([m.bias for m in mods]))
        new.register_buffer("mults", first.mults, persistent=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.planes:
            return self._forward_vnni(x)
        xb = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        if xb.shape[0] >= DENSE_ROWS and (w := self.dense_bf16()) is not None:  # prefill: bf16 matmul
            y = F.linear(xb, w, self.bias)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        if self.mults is not None:  # (M, K/g, 1, g) * (P,) -> (M, K * P); the multipliers are powers of 2 or 0
            xb = (xb.view(xb.shape[0], -1, 1, self.g) * self.mults).view(xb.shape[0], -1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, GROUP, self.scales_zeros)  # (M, N16)
        if y.shape[1] != self.out_features:
            y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _forward_vnni(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.reshape(-1, self.in_features)  # (M, K)
        M = xf.shape[0]
        if VNNI_DENSE_ROWS is not None and M >= VNNI_DENSE_ROWS:  # bf16 matmul on a temporary dense weight
            y = F.linear(xf.to(torch.bfloat16), self.dense_bf16(), self.bias)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        if self.planes > 1:  # (M, K/32, P, 32): each group of inputs once per plane
            xf = xf.view(M, -1, 1, GROUP).expand(M, -1, self.planes, GROUP).reshape(M, -1)
        y = torch.ops.leanlm_native.int4_mm(xf, self.w4, self.scales, self.mins)  # (M, N16) in x's dtype
        if y.shape[1] != self.out_features:  # rows padded to the kernel's tile of 16
            y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dense_bf16(self) -> torch.Tensor | None:
        """A temporary dense bf16 copy of the weight (N, K), from our C kernels (None without them)."""
        if self.planes:
            return torch.ops.leanlm_native.int4_dense(self.w4, self.scales, self.mins, self.planes,
                                                      self.in_features * self.planes)[:self.out_features]
        if not self.c_dense:
            return None
        w = int4_dense(self.packed, self.scales_zeros, self.mults, self.g, self.scales_zeros.shape[1], self.packed_k)
        return None if w is None else w[:self.out_features]

    @property
    def packed_k(self) -> int:
        return self.scales_zeros.shape[0] * GROUP

    def extra_repr(self) -> str:
        if self.planes:
            return (f"in_features={self.in_features}, out_features={self.out_features}, group={GROUP}, "
                    f"layout=vnni, planes={self.planes}, bits={self.bits}")
        planes = "" if self.mults is None else f", planes={self.mults.numel()}x{self.g}"
        return f"in_features={self.in_features}, out_features={self.out_features}, group={GROUP}{planes}"
