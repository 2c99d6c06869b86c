"""Typed model configuration: one transformer family, architectures differ only by these fields.

A config is always built from the checkpoint's own metadata (GGUF key/values or config.json),
never from file names: see `leanlm/loaders/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Activation = Literal["silu", "gelu_tanh"]


@dataclass(frozen=True)
class MoeConfig:
    """Sparse mixture of experts (Mixtral): each token goes to the top `n_used` of `n_experts`."""

    n_experts: int
    n_used: int


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # the checkpoint's own architecture name ("llama", "gemma3", ...)
    vocab_size: int
    dim: int  # hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads: grouped-query attention
    head_dim: int
    hidden_dim: int  # MLP inner size
    norm_eps: float = 1e-5
    context_length: int = 4096
    # RoPE
    rope_base: float = 10000.0
    rope_local_base: float | None = None  # base for sliding-window layers (Gemma 3), None = rope_base
    rope_interleaved: bool = False  # True: rotate adjacent pairs (GGUF llama); False: halves (NeoX / HF)
    rope_dim: int | None = None  # rotary dims per head (partial rotary); None = head_dim
    rope_scale: float = 1.0  # linear position scaling for global layers (positions / rope_scale)
    # attention
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding window W, or None for full attention
    attn_scale: float | None = None  # None = 1/sqrt(head_dim)
    qk_norm: bool = False  # RMSNorm over each head's q and k (Gemma 3)
    attn_bias: bool = False  # biases on q/k/v projections (Qwen2)
    attn_softcap: float | None = None
    # MLP and blocks
    act: Activation = "silu"
    moe: MoeConfig | None = None  # None: dense gated MLP in every layer
    post_norms: bool = False  # Gemma-style extra norms after attention and MLP ("sandwich")
    norm_add_one: bool = False  # RMSNorm multiplies by (1 + w) (HF Gemma); GGUF stores w + 1 already
    # embeddings and head
    tie_embeddings: bool = False
    embed_scale: float | None = None  # multiply embeddings by this (Gemma: sqrt(dim))
    final_softcap: float | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.n_layers)
        if len(self.layer_windows) != self.n_layers:
            raise ValueError("layer_windows must have one entry per layer")

    @property
    def sliding_window(self) -> int | None:
        """The largest window of any sliding layer (None when every layer is full attention)."""
        ws = [w for w in self.layer_windows if w is not None]
        return max(ws) if ws else None
