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
    """Sparse mixture of experts. Mixtral: each token goes to the top `n_used` of `n_experts` by router logit,
    weighted by a softmax over those logits. DeepSeek-V2 (`score_first`): a softmax over all experts first, then
    the top `n_used` scores (within the best `topk_group` of `n_group` expert groups) times `routed_scale`,
    plus `n_shared` experts that every token goes through."""

    n_experts: int
    n_used: int
    hidden_dim: int | None = None  # each expert's MLP width (None: the model's hidden_dim)
    score_first: bool = False
    routed_scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    n_shared: int = 0  # shared experts, run as one gated MLP n_shared * hidden_dim wide
    first_dense: int = 0  # the first layers keep a dense MLP (DeepSeek's first_k_dense_replace)


@dataclass(frozen=True)
class MlaConfig:
    """Multi-head latent attention (DeepSeek-V2): the cache keeps, per token, a `kv_rank`-wide latent c and one
    `rope_dim`-wide rotary key shared by all heads. Head h's key is (W_uk[h] c, k_rope), its value W_uv[h] c."""

    kv_rank: int
    q_rank: int | None  # None: queries straight from x; else through a normalised q_rank-wide latent
    nope_dim: int  # per-head query/key dims without the rotary embedding
    rope_dim: int
    v_dim: int


@dataclass(frozen=True)
class YarnConfig:
    """YaRN rotary scaling (context extension, model.rope_frequencies): each rotary frequency is divided by
    `factor`, kept, or blended between the two by how often it turns within the original context; cos and sin
    are multiplied by `attention_factor`."""

    factor: float
    original_context: int
    beta_fast: float = 32.0  # frequencies turning more often than this over the original context: kept
    beta_slow: float = 1.0  # less often than this: divided by factor
    attention_factor: float = 1.0
    truncate: bool = True  # round the blend's bounds outwards to whole dims


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
    yarn: YarnConfig | None = None  # YaRN scaling of the global layers' rotary embedding
    # attention
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding window W, or None for full attention
    attn_scale: float | None = None  # None = 1/sqrt(head_dim)
    qk_norm: bool = False  # RMSNorm over each head's q and k (Gemma 3)
    attn_bias: bool = False  # biases on q/k/v projections (Qwen2)
    attn_softcap: float | None = None
    # MLP and blocks
    act: Activation = "silu"
    moe: MoeConfig | None = None  # None: dense gated MLP in every layer
    mla: MlaConfig | None = None  # multi-head latent attention (mla.py) instead of per-head K/V
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
