"""An 8-bit K/V cache: each key and value row (one token, one head) as int8 codes and one fp32 scale.

    code = round(x / s), s = max |x| / 127   (a row of zeros: s = 0, codes 0)

Half the bytes of a bf16 cache, and batched decode attention is bound by reading every sequence's K and V
each step: SmolLM2 at batch 32 and ~320 positions reads 236 MB of bf16 K/V a step, 125 MB here. The quality it
costs is measured (bench/NOTES.md): perplexity and greedy tokens against the bf16 cache. `ModelCache(...,
kv="int8")` or `leanlm.load(..., kv_cache="int8")` ask for it; it needs our CPU kernels (AVX-512 VNNI).

Keys sit offset by 128 as uint8 in blocks of 16 slots, (B, n_kv, S / 16, hd / 4, 16, 4): byte [s // 16, d // 4,
s % 16, d % 4] is dim d of slot s, so one 64-byte load holds 4 dims of 16 keys for `vpdpbusd`
(kernels/attend_int8.cpp). E.g. slot 37, dim 10: k[b, h, 2, 2, 5, 2]. Values are rows (B, n_kv, S, hd) int8.
Decode steps attend on the codes; prompts and other paths read dequantized bf16 rows (`view`).
"""

from __future__ import annotations

import torch

BLOCK = 16


def native_writes(x: torch.Tensor, native: bool) -> bool:
    """Do cache writes and reads of `x` go through our operators (kernels/cache_ops.cpp: the same bits as the
    PyTorch code beside each, in one pass)? Where the buffer's plan has them (`native`, the plan's int8_kv), on
    the CPU, and not inside a graph being compiled."""
    return native and x.device.type == "cpu" and not torch.compiler.is_compiling()


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., hd) -> int8 codes (..., hd) and fp32 scales (...), as kernels/decode.cpp computes them."""
    xf = x.float()
    s = xf.abs().amax(-1) / 127
    codes = torch.where(s[..., None] > 0, torch.round(xf / s[..., None]), 0.0)
    return codes.to(torch.int8), s


class Int8KVBuffer:
    """K/V storage for one layer in 8 bits (see the module docstring); the interface of cache.KVBuffer."""

    quantized = True
    blocked = True

    def __init__(self, batch: int, n_kv: int, size: int, head_dim: int, window: int | None,  # noqa: PLR0913, PLR0917 (a buffer's shape, dtype and home)
                 dtype: torch.dtype, pos: torch.Tensor, device: torch.device | str | None = None,
                 native: bool = False) -> None:
        """native: writes and reads on kernels/cache_ops.cpp (the plan's int8_kv, kernels/plan.py)."""
        assert size % BLOCK == 0 and head_dim % 4 == 0
        self.window, self.pos, self.dtype, self.native = window, pos, dtype, native
        self.k = torch.zeros(batch, n_kv, size // BLOCK, head_dim // 4, BLOCK, 4, dtype=torch.uint8, device=device)
        self.v = torch.zeros(batch, n_kv, size, head_dim, dtype=torch.int8, device=device)
        self.k_scale = torch.zeros(batch, n_kv, size, device=device)
        self.v_scale = torch.zeros(batch, n_kv, size, device=device)

    @property
    def size(self) -> int:
        return self.v.shape[2]

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values (B, n_kv, T, hd) at slots (B, T), quantized."""
        if native_writes(k, self.native):
            torch.ops.leanlm_native.cache_write(self.tensors(), slots, k, v)
            return
        B, n_kv, T, hd = k.shape
        b = torch.arange(B, device=k.device).view(B, 1)
        kc, ks = quantize_rows(k.transpose(1, 2))  # (B, T, n_kv, hd), (B, T, n_kv)
        vc, vs = quantize_rows(v.transpose(1, 2))
        kb = self.k.permute(0, 2, 4, 1, 3, 5)  # (B, S / 16, 16, n_kv, hd / 4, 4): slot s at [s // 16, s % 16]
        kb[b, slots // BLOCK, slots % BLOCK] = (kc.to(torch.int16) + 128).to(torch.uint8).view(B, T, n_kv, hd // 4, 4)
        self.v.transpose(1, 2)[b, slots] = vc  # (B, S, n_kv, hd) view
        self.k_scale.transpose(1, 2)[b, slots] = ks
        self.v_scale.transpose(1, 2)[b, slots] = vs

    def codes(self, kv_len: int) -> tuple[torch.Tensor, ...]:
        """(k, k_scale, v, v_scale) for attend_int8: keys cut to the blocks worth reading (positions < kv_len)."""
        n = min(kv_len, self.size)
        return self.k[:, :, :-(-n // BLOCK)], self.k_scale, self.v, self.v_scale

    def view(self, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized k, v (B, n_kv, n, hd) in the compute dtype (a copy) for prompts and other paths."""
        n = min(kv_len, self.size)
        if native_writes(self.v, self.native):
            return torch.ops.leanlm_native.cache_rows(self.tensors(), n)
        B, n_kv, nb, quarter = self.k.shape[:4]
        k = self.k.permute(0, 1, 2, 4, 3, 5).reshape(B, n_kv, nb * BLOCK, quarter * 4)[:, :, :n]
        k = (k.float() - 128) * self.k_scale[:, :, :n, None]
        v = self.v[:, :, :n].float() * self.v_scale[:, :, :n, None]
        return k.to(self.dtype), v.to(self.dtype)

    def rows(self, lo: int, hi: int, pos: torch.Tensor) -> Int8KVBuffer:
        """This buffer's batch rows lo..hi-1 (views sharing memory), with the slot table `pos` for them."""
        view = Int8KVBuffer.__new__(Int8KVBuffer)
        view.window, view.pos, view.dtype, view.native = self.window, pos, self.dtype, self.native
        view.k, view.k_scale, view.v, view.v_scale = (t[lo:hi] for t in self.tensors())
        return view

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.k_scale, self.v, self.v_scale]
