"""Fuse projections that read the same input into one matmul: q/k/v, and the MLP's gate/up.

Decode runs one token at a time, where each kernel call costs a fixed overhead on top of reading the
weights; fusing saves 3 of the 7 quantized matmul calls per layer. Only Int4Linear modules with the
same layout are fused (their packed rows concatenate, see Int4Linear.cat); the separate modules are
removed, so the weights are held once.
"""

from __future__ import annotations

from leanlm.model.attention import Attention
from leanlm.model.layers import FeedForward
from leanlm.model.transformer import Transformer
from leanlm.quant.int4 import Int4Linear


def fuse_projections(model: Transformer) -> int:
    """Fuse in place where possible; returns the number of fused groups."""
    n = 0
    for layer in model.layers:
        a = layer.attn
        mods = [a.wq, a.wk, a.wv] if isinstance(a, Attention) else []  # (latent attention has no k, v)
        if mods and all(isinstance(m, Int4Linear) for m in mods) and (fused := Int4Linear.cat(mods)) is not None:
            a.wqkv = fused
            del a.wq, a.wk, a.wv
            n += 1
        f = layer.ffn
        if isinstance(f, FeedForward) and isinstance(f.w1, Int4Linear) and isinstance(f.w3, Int4Linear):
            fused = Int4Linear.cat([f.w1, f.w3])
            if fused is not None:
                f.w13 = fused
                del f.w1, f.w3
                n += 1
    return n
