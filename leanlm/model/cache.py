"""KV caches as modules: full-attention buffers and rolling buffers for sliding windows.

Every buffer stores, next to K and V, the absolute position held in each slot (-1 = empty).
The attention mask is built from those positions, so one rule serves full layers, rolling
sliding-window layers, sequences of different lengths in one batch and (later) rollback:

    a query at position q may see the key in slot s  iff  0 <= pos[s] <= q  and  q - pos[s] < W

Rolling buffer index math (slot = position mod S, S = W + slack):
    A sliding layer with window W = 4 only ever needs the last 4 keys, but a chunk of up to C
    new tokens is written *before* attention reads the buffer, so the buffer holds S = W + C
    slots. With W = 4, C = 2 (S = 6), after 9 tokens (positions 0..8) the slots hold

        slot:      0  1  2  3  4  5
        position:  6  7  8  3  4  5        (position p lives in slot p % 6)

    Writing a chunk of positions 9, 10 overwrites slots 3 and 4 (positions 3 and 4). Query 9
    needs keys 6..9 and query 10 needs 7..10: all still present (slots 0, 1, 2, 3, 4), while
    position 5 is masked out by the window. A chunk longer than C would overwrite keys its own
    first queries need, so prefill is chunked to at most C tokens (see generate.py).
"""

from __future__ import annotations

from typing import Protocol

import torch

from leanlm.errors import LeanLMError
from leanlm.kernels.plan import KernelPlan
from leanlm.model.config import ModelConfig
from leanlm.model.kv_int8 import Int8KVBuffer, native_writes


class CacheOwner(Protocol):
    """What a cache needs to know of its model (transformer.Transformer has it): kept as a protocol so the cache
    does not depend on the model that uses it."""

    cfg: ModelConfig
    kv_cache: str
    plan: KernelPlan

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

BLOCK = 16  # slots per block of the blocked key layout
INT8_KV_NEEDS = ("an int8 K/V cache needs a CPU with AVX-512 VNNI and BF16, bfloat16 compute, head dim 64, 128 or "
                 "256 and no attention softcap")


class KVBuffer:
    """K/V storage for one layer: (B, n_kv, S, hd). `pos` (B, S), the position held by each slot, is
    shared by all buffers of the same window (they are written identically) and kept by ModelCache.

    Blocked keys (`blocked=True`, S a multiple of 16): k is (B, n_kv, S / 16, hd / 2, 16, 2), so that within a
    block of 16 slots the same pair of dims of all 16 keys is 64 contiguous bytes, one vector load for the
    attention kernels (kernels/attend_blocked.cpp: scores with the keys in the lanes). Key of slot s, dims 2d
    and 2d + 1: k[b, h, s // 16, d, s % 16]. E.g. slot 37, dims 10, 11: k[b, h, 2, 5, 5]. `key_rows` gives
    the usual (B, n_kv, S, hd) view back (a copy) for other attention paths.

    Caches are plain objects holding tensors, not nn.Modules: a compiled decode step (compiled.py) then
    treats their sizes as dynamic, where module buffers would be baked in as constants."""

    quantized = False  # (kv_int8.Int8KVBuffer: True)

    def __init__(self, batch: int, n_kv: int, size: int, head_dim: int, window: int | None,  # noqa: PLR0913, PLR0917 (a buffer's shape, dtype and home)
                 dtype: torch.dtype, pos: torch.Tensor, device: torch.device | str | None = None,
                 blocked: bool = False, native: bool = False) -> None:
        """native: blocked writes on kernels/cache_ops.cpp (the plan's int8_kv, kernels/plan.py)."""
        self.window, self.pos, self.blocked, self.native = window, pos, blocked, native
        if blocked:
            assert size % BLOCK == 0 and head_dim % 2 == 0
            self.k = torch.zeros(batch, n_kv, size // BLOCK, head_dim // 2, BLOCK, 2, dtype=dtype, device=device)
        else:
            self.k = torch.zeros(batch, n_kv, size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, n_kv, size, head_dim, dtype=dtype, device=device)

    @property
    def size(self) -> int:
        """Slots in this buffer: read from the tensor, so a compiled step sees it as a dynamic size."""
        return self.v.shape[2]

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values at slots (B, T); k, v: (B, n_kv, T, hd).

        One indexed copy of rows into the buffer seen as (B * n_kv * S, hd): row (b, h, s) is
        (b * n_kv + h) * S + s. E.g. B = 2, n_kv = 3, S = 8, slots [[5], [2]]: rows 5, 13, 21 and
        26, 34, 42. (A `scatter_` along the slot axis made inductor copy the whole buffer every step:
        5 ms per token at batch 8 on SmolLM2.)
        """
        if self.blocked and native_writes(k, self.native):  # (kernels/cache_ops.cpp: the same bits in one pass)
            torch.ops.leanlm_native.cache_write(self.tensors(), slots, k, v)
            return
        B, n_kv, T, hd = k.shape
        rows = (torch.arange(B * n_kv, device=k.device).view(B, n_kv, 1) * self.size + slots[:, None, :]).flatten()
        self.v.view(-1, hd).index_copy_(0, rows, v.reshape(-1, hd))  # (B * n_kv * T, hd) rows
        if not self.blocked:
            self.k.view(-1, hd).index_copy_(0, rows, k.reshape(-1, hd))
            return
        kb = self.k.permute(0, 2, 4, 1, 3, 5)  # (B, S / 16, 16, n_kv, hd / 2, 2): slot s at [s // 16, s % 16]
        b = torch.arange(B, device=k.device).view(B, 1)
        kb[b, slots // BLOCK, slots % BLOCK] = k.transpose(1, 2).reshape(B, T, n_kv, hd // 2, 2)

    def view(self, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots worth reading when positions < kv_len: k, v (B, n_kv, S', hd)."""
        n = min(kv_len, self.size)
        return self.k[:, :, :-(-n // BLOCK) if self.blocked else n], self.v[:, :, :n]

    def rows(self, lo: int, hi: int, pos: torch.Tensor) -> KVBuffer:
        """This buffer's batch rows lo..hi-1 (views sharing memory), with the slot table `pos` for them."""
        view = KVBuffer.__new__(KVBuffer)
        view.window, view.pos, view.blocked, view.native = self.window, pos, self.blocked, self.native
        view.k, view.v = self.k[lo:hi], self.v[lo:hi]
        return view

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]


class LatentBuffer:
    """One multi-head latent attention layer's cache (mla.py): per slot the normalised latent c (B, S, kv_rank)
    and the rotated key part shared by all heads (B, S, rope_dim). DeepSeek-V2 keeps 512 + 64 numbers a token
    here, where 128 heads of keys and values would take 128 * (192 + 128) = 40960."""

    quantized = blocked = False

    def __init__(self, batch: int, size: int, kv_rank: int, rope_dim: int, window: int | None,  # noqa: PLR0917
                 dtype: torch.dtype, pos: torch.Tensor, device: torch.device | str | None = None) -> None:
        self.window, self.pos = window, pos
        self.c = torch.zeros(batch, size, kv_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(batch, size, rope_dim, dtype=dtype, device=device)

    @property
    def size(self) -> int:
        return self.c.shape[1]

    def write(self, slots: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Store c (B, T, kv_rank) and k_rope (B, T, rope_dim) at slots (B, T): row b * S + slot of each."""
        B = c.shape[0]
        rows = (torch.arange(B, device=c.device).view(B, 1) * self.size + slots).flatten()
        self.c.view(-1, c.shape[-1]).index_copy_(0, rows, c.reshape(-1, c.shape[-1]))
        self.k_rope.view(-1, k_rope.shape[-1]).index_copy_(0, rows, k_rope.reshape(-1, k_rope.shape[-1]))

    def view(self, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = min(kv_len, self.size)
        return self.c[:, :n], self.k_rope[:, :n]

    def rows(self, lo: int, hi: int, pos: torch.Tensor) -> LatentBuffer:
        view = LatentBuffer.__new__(LatentBuffer)
        view.window, view.pos, view.c, view.k_rope = self.window, pos, self.c[lo:hi], self.k_rope[lo:hi]
        return view

    def tensors(self) -> list[torch.Tensor]:
        return [self.c, self.k_rope]


def key_rows(k: torch.Tensor, n: int) -> torch.Tensor:
    """Keys as (B, n_kv, n, hd) rows: `k` itself, or a copy of blocked keys (B, n_kv, S / 16, hd / 2, 16, 2)."""
    if k.dim() == 4:
        return k
    B, n_kv, nb, half = k.shape[:4]
    return k.permute(0, 1, 2, 4, 3, 5).reshape(B, n_kv, nb * BLOCK, half * 2)[:, :, :n]


def layout_of(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str | None, kv: str,
              plan: KernelPlan) -> str:
    """How a cache for this model keeps its K/V (what a compiled step's graph depends on): "latent" (mla.py),
    "int8" (kv_int8.py), "blocked" keys or "rows", and the dtype; e.g. "blocked/bfloat16"."""
    if cfg.mla is not None:
        kind = "latent"
    elif kv == "int8":
        kind = "int8"
    else:
        kind = "blocked" if plan.blocked_keys_for(cfg, dtype, device) else "rows"
    return f"{kind}/{str(dtype).removeprefix('torch.')}"


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean mask (B, 1, T, S), True where query may attend. q_pos: (B, T); k_pos: (B, S)."""
    q = q_pos[:, :, None]  # (B, T, 1)
    k = k_pos[:, None, :]  # (B, 1, S)
    ok = (k >= 0) & (k <= q)
    if window is not None:
        ok &= (q - k) < window  # a token sees itself and the W-1 before it
    return ok[:, None]


class ModelCache:
    """All layers' KV buffers for a batch of `batch` sequences of up to `max_len` positions.

    Sliding-window layers get rolling buffers of W + `chunk` slots (never more than max_len);
    full-attention layers get max_len slots. `kv_len` (one past the largest position written so
    far, a Python int kept by the caller) bounds how much of each buffer attention reads.
    kv: "auto" (K/V in the compute dtype) or "int8" (kv_int8.py: half the bytes; needs our CPU kernels).
    `layout` names how K/V are kept (`layout_of`).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, chunk: int,  # noqa: PLR0913, PLR0917
                 dtype: torch.dtype, device: torch.device | str | None = None, kv: str = "auto",
                 layout_device: torch.device | str | None = None, plan: KernelPlan | None = None) -> None:
        """layout_device: lay the buffers out as on this device while allocating on `device` (the memory
        planner builds a CPU or CUDA model's cache on the meta device, which allocates nothing).
        plan: the model's kernels (kernels/plan.py; default: this process's for the layout device)."""
        self.max_len, self.chunk = max_len, chunk
        layout = layout_device if layout_device is not None else device
        plan = plan or KernelPlan.resolve(layout or "cpu")
        self.layers: list[KVBuffer | Int8KVBuffer | LatentBuffer] = []
        # one slot table per window kind (None = full attention), each (B, size): position in each slot, -1 empty
        self.slot_pos: dict[int | None, torch.Tensor] = {}
        if kv not in ("auto", "int8"):
            raise LeanLMError(f"unknown K/V cache type {kv!r}: auto or int8")
        if kv == "int8" and not plan.int8_kv_for(cfg, dtype, layout):
            raise LeanLMError(INT8_KV_NEEDS)
        self.layout = layout_of(cfg, dtype, layout, kv, plan)
        blocked = self.layout.startswith(("int8/", "blocked/"))
        native = plan.int8_kv and torch.device(layout or "cpu").type == "cpu"
        for w in cfg.layer_windows:
            if w not in self.slot_pos:
                size = max_len if w is None else min(max_len, w + chunk)
                if blocked:  # whole blocks (a rolling buffer only gains slack)
                    size = -(-size // BLOCK) * BLOCK
                self.slot_pos[w] = torch.full((batch, size), -1, dtype=torch.long, device=device)
            pos = self.slot_pos[w]
            if cfg.mla is not None:
                m = cfg.mla
                self.layers.append(LatentBuffer(batch, pos.shape[1], m.kv_rank, m.rope_dim, w, dtype, pos, device))
                continue
            args = (batch, cfg.n_kv_heads, pos.shape[1], cfg.head_dim, w, dtype, pos, device)
            self.layers.append(Int8KVBuffer(*args, native=native) if kv == "int8" else
                               KVBuffer(*args, blocked=blocked, native=native))
        self.kv_len = 0

    @classmethod
    def for_model(cls, model: CacheOwner, batch: int, max_len: int, chunk: int) -> ModelCache:
        """A cache for `model`: its config, compute dtype, device, K/V cache type (`model.kv_cache`) and plan."""
        return cls(model.cfg, batch, max_len, chunk, model.dtype, model.device, model.kv_cache, plan=model.plan)

    @staticmethod
    def layout_for(model: CacheOwner) -> str:
        """The `layout` of the caches `for_model` builds."""
        return layout_of(model.cfg, model.dtype, model.device, model.kv_cache, model.plan)

    def prepare(self, positions: torch.Tensor, kv_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Record the new positions (B, T) in the slot tables; per layer, (slots (B, T), mask (B, 1, T, S')).

        Done once per forward: layers with the same window share the same tensors. Sizes are read from the
        tensors (not Python ints), so a compiled decode step serves caches of any size.
        """
        shared: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}
        for w, pos in self.slot_pos.items():
            size = pos.shape[1]
            slots = positions % size  # identity for full buffers (positions < size)
            pos.scatter_(1, slots, positions)
            shared[w] = (slots, attention_mask(positions, pos[:, :min(kv_len, size)], w))
        return [shared[b.window] for b in self.layers]

    def rows(self, lo: int, hi: int) -> ModelCache:
        """A cache over batch rows lo..hi-1 that shares this one's memory (views along the batch axis).

        The serving engine prefills one sequence into its own row and decodes rows 0..hi-1 together, every
        step: views are kept per (lo, hi), since the tensors they look into never change.
        """
        views = self.__dict__.setdefault("_views", {})
        if (lo, hi) in views:
            return views[lo, hi]
        view = ModelCache.__new__(ModelCache)
        view.max_len, view.chunk, view.kv_len, view.layout = self.max_len, self.chunk, self.kv_len, self.layout
        view.slot_pos = {w: t[lo:hi] for w, t in self.slot_pos.items()}
        view.layers = [b.rows(lo, hi, view.slot_pos[b.window]) for b in self.layers]
        views[lo, hi] = view
        return view

    def clear_row(self, row: int) -> None:
        """Forget everything row `row` held (its keys stay in memory but are masked out)."""
        for t in self.slot_pos.values():
            t[row] = -1

    def tensors(self) -> list[torch.Tensor]:
        return list(self.slot_pos.values()) + [t for b in self.layers for t in b.tensors()]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
