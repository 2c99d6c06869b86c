"""Memory planner: what a loaded model needs for B sequences of up to C positions, and what fits a budget.

Three parts, each from the objects that will hold it:
- **weights:** every tensor the model holds, each storage once (a tied head is not counted twice; memory-
  mapped weights count too, since they become resident as they are read);
- **K/V cache:** exactly what `ModelCache` allocates for (B, C), sliding windows' rolling buffers, an int8 or
  latent (MLA) cache included: the cache is built on the meta device, which allocates nothing;
- **activations:** an upper bound on one forward's transient tensors: the residual stream, its normalised
  copy, q/k/v, the attention output, gate, up and their product for each row of a prefill chunk (or of a
  decode step's B rows), attention scores for those rows over the whole context in fp32 (the SDPA fallback
  materialises them, twice: products and softmax; our own kernels do not), and the fp32 logits of the rows
  that need them.
The Python interpreter and torch itself come on top (`leanlm bench` reports them as the RSS after imports,
about 230 MiB on Linux).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leanlm.errors import LeanLMError
from leanlm.model.cache import ModelCache
from leanlm.model.transformer import Transformer

MIB = 2**20


@dataclass(frozen=True)
class MemoryPlan:
    batch: int
    ctx: int
    weights: int  # bytes
    kv_per_seq: int  # bytes of K/V cache per sequence of `ctx` positions
    activations: int  # bytes, upper bound for the larger of a prefill chunk and a decode step
    budget: int | None = None

    @property
    def kv(self) -> int:
        return self.batch * self.kv_per_seq

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations

    def summary(self) -> str:
        fit = "" if self.budget is None else f" of a {self.budget / MIB:.0f} MiB budget"
        return (f"batch {self.batch} x context {self.ctx}: weights {self.weights / MIB:.1f} MiB + K/V cache "
                f"{self.kv / MIB:.1f} MiB ({self.kv_per_seq / MIB:.2f} per sequence) + activations <= "
                f"{self.activations / MIB:.1f} MiB = {self.total / MIB:.1f} MiB{fit}")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, each underlying storage once."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def kv_bytes(model: Transformer, batch: int, ctx: int, chunk: int) -> int:
    """Bytes `ModelCache.for_model(model, batch, ctx, chunk)` allocates (built on the meta device)."""
    cache = ModelCache(model.cfg, batch, ctx, chunk, model.dtype, "meta", model.kv_cache, layout_device=model.device,
                       plan=model.plan)
    return cache.nbytes()


def activation_bytes(model: Transformer, rows: int, ctx: int, logit_rows: int) -> int:
    """Upper bound on one forward's transient bytes for `rows` token rows over `ctx` positions (module doc)."""
    cfg = model.cfg
    item = torch.finfo(model.dtype).bits // 8
    q_dims = cfg.n_heads * (cfg.mla.nope_dim + cfg.mla.rope_dim if cfg.mla else cfg.head_dim)
    kv_dims = 2 * cfg.n_kv_heads * cfg.head_dim if cfg.mla is None else cfg.mla.kv_rank + cfg.mla.rope_dim
    per_row = 2 * cfg.dim + q_dims + kv_dims + cfg.n_heads * cfg.head_dim + 3 * cfg.hidden_dim
    # SDPA's math path (where our prompt kernel does not run) keeps the products and their softmax at once
    scores = rows * cfg.n_heads * ctx * 4 * (1 if model.plan.flash else 2)
    return rows * per_row * item + scores + logit_rows * cfg.vocab_size * 4


def plan(model: Transformer, ctx: int, batch: int | None = None, memory: int | None = None,
         chunk: int = 512) -> MemoryPlan:
    """The plan for `batch` sequences of `ctx` positions, or (batch None) for the most sequences that fit
    `memory` bytes. Prefill chunks of `chunk` rows are shared by the batch, as the engine runs them."""
    if ctx < 1 or ctx > model.cfg.context_length:
        raise LeanLMError(f"context must be between 1 and the model's {model.cfg.context_length}")
    weights, per_seq = weight_bytes(model), kv_bytes(model, 1, ctx, chunk)

    def make(b: int) -> MemoryPlan:
        prefill = activation_bytes(model, min(chunk, b * ctx), ctx, b)  # chunk rows shared by the batch's prompts
        act = max(prefill, activation_bytes(model, b, ctx, b))
        return MemoryPlan(b, ctx, weights, kv_bytes(model, b, ctx, chunk) // b, act, memory)

    if batch is not None:
        if batch < 1:
            raise LeanLMError("batch must be at least 1")
        return make(batch)
    if memory is None:
        raise LeanLMError("give a batch size or a memory budget")
    if make(1).total > memory:
        raise LeanLMError(f"one sequence of {ctx} positions needs {make(1).total / MIB:.0f} MiB, more than the "
                          f"{memory / MIB:.0f} MiB budget")
    lo, hi = 1, max(1, (memory - weights) // max(per_seq, 1)) + 1  # make(lo) fits; make(hi) may not
    while make(hi).total <= memory:  # (the per-sequence estimate can only overshoot: blocks round up)
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if make(mid).total <= memory else (lo, mid)
    return make(lo)


def parse_size(text: str) -> int:
    """'4GiB', '512M', '2g', '1000000' -> bytes (K, M, G, T as powers of 1024, with or without 'iB'/'B')."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        raise LeanLMError(f"cannot read the size '{text}' (e.g. 4GiB, 512M)") from None
    if value <= 0:
        raise LeanLMError(f"the size must be positive (got '{text}')")
    return int(value * scale)
