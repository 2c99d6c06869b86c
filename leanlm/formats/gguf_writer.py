"""Write a loaded model as a GGUF file (F32 or F16 tensors) with llama.cpp's names and metadata.

The inverse of `loaders/gguf.py`: our parameter names go back through the same name map. For the
`llama` architecture llama.cpp expects q/k rows permuted so rotary pairs are adjacent, so weights
that use the halves layout (from HF checkpoints) are permuted on the way out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, RopeScalingType

from leanlm.errors import UnsupportedError
from leanlm.formats.gguf_loader import ARCH_NAMES, GGUF_NAMES
from leanlm.model.config import ModelConfig
from leanlm.model.transformer import Transformer

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "phi3": "phi3",
             "gemma3": "gemma3", "deepseek2": "deepseek2"}
TYPES = {"f32": (GGMLQuantizationType.F32, np.float32), "f16": (GGMLQuantizationType.F16, np.float16)}


def interleave_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from halves layout (x_i, x_{i+d/2}) to adjacent pairs (x_2i, x_2i+1).

    Example, head_dim 4: rows [a0, a1, b0, b1] (pairs (a0, b0), (a1, b1)) become [a0, b0, a1, b1].
    """
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_metadata(w: GGUFWriter, cfg: ModelConfig, arch: str) -> None:
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_rope_dimension_count(cfg.rope_dim or cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.mla is not None:
        _mla_metadata(w, cfg)
    elif cfg.head_dim != cfg.dim // cfg.n_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    windows = set(cfg.layer_windows)
    if arch == "gemma3" or (len(windows) == 1 and None not in windows):
        w.add_sliding_window(int(cfg.sliding_window or 0))
    elif windows != {None}:
        raise UnsupportedError(f"per-layer sliding windows of {cfg.arch} cannot be written to GGUF '{arch}'")
    if cfg.moe is not None:
        w.add_expert_count(cfg.moe.n_experts)
        w.add_expert_used_count(cfg.moe.n_used)
    if cfg.yarn is not None and cfg.mla is None:
        raise UnsupportedError("YaRN rope scaling cannot be written to GGUF yet (only DeepSeek-V2's)")
    if cfg.rope_scale != 1.0:
        w.add_string(f"{arch}.rope.scaling.type", "linear")
        w.add_float32(f"{arch}.rope.scaling.factor", cfg.rope_scale)


def _mla_metadata(w: GGUFWriter, cfg: ModelConfig) -> None:
    """DeepSeek-V2's keys as llama.cpp reads them (loaders/gguf.py `_deepseek2_config` is the inverse)."""
    m, moe = cfg.mla, cfg.moe
    assert m is not None
    w.add_kv_lora_rank(m.kv_rank)
    w.add_q_lora_rank(m.q_rank or 0)  # 0: queries straight from x (llama.cpp requires the key)
    w.add_key_length(m.nope_dim + m.rope_dim)
    w.add_value_length(m.v_dim)
    if moe is not None:
        if not moe.score_first:
            raise UnsupportedError("DeepSeek-V2 GGUF files route experts by softmax scores first")
        w.add_expert_feed_forward_length(moe.hidden_dim or cfg.hidden_dim)
        w.add_expert_shared_count(moe.n_shared)
        w.add_leading_dense_block_count(moe.first_dense)
        w.add_expert_weights_scale(moe.routed_scale)
        w.add_expert_group_count(moe.n_group)
        w.add_expert_group_used_count(moe.topk_group)
    if cfg.yarn is not None:  # llama.cpp keeps cos/sin unscaled and puts mscale^2 into the softmax scale
        y, qk = cfg.yarn, m.nope_dim + m.rope_dim
        if abs(y.attention_factor - 1.0) > 1e-6:
            raise UnsupportedError("GGUF's DeepSeek YaRN has no separate cos/sin factor (mscale != mscale_all_dim)")
        mscale = math.sqrt((cfg.attn_scale or qk**-0.5) * math.sqrt(qk))
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(y.factor)
        w.add_rope_scaling_orig_ctx_len(y.original_context)
        w.add_rope_scaling_yarn_log_mul((mscale - 1.0) / math.log(y.factor))
        w.add_rope_scaling_yarn_beta_fast(y.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(y.beta_slow)


def gguf_tensors(model: Transformer, arch: str) -> dict[str, torch.Tensor]:
    """Our state dict renamed to GGUF names (fused tensors concatenated), q/k in llama's layout."""
    cfg = model.cfg
    arch_names = ARCH_NAMES.get(arch, {})
    # the architecture's own names first: where two GGUF names map to one of ours (DeepSeek's attn_q_a_norm and
    # Gemma's attn_q_norm are both `attn.q_norm`), the file gets the one this architecture's readers expect
    names = {**arch_names, **{k: v for k, v in GGUF_NAMES.items() if k not in arch_names}}
    state = model.state_dict()
    if cfg.tie_embeddings:
        state.pop("output.weight", None)
    if arch == "llama" and not cfg.rope_interleaved:
        for key in list(state):
            if key.endswith("attn.wq.weight") or key.endswith("attn.wk.weight"):
                heads = cfg.n_heads if ".wq." in key else cfg.n_kv_heads
                state[key] = interleave_rows(state[key], heads)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    fused_first = sorted(names.items(), key=lambda kv: -kv[1].count("+"))
    for i in range(cfg.n_layers):
        for g, ours in fused_first:
            targets = ours.replace("{i}", str(i)).split("+")
            if all(t in state for t in targets) and not any(t in used for t in targets):
                out[g.replace("{i}", str(i))] = torch.cat([state[t] for t in targets]) if len(targets) > 1 \
                    else state[targets[0]]
                used.update(targets)
    for g, ours in names.items():
        if "{i}" not in g and ours in state:
            out[g] = state[ours]
            used.add(ours)
    left = set(state) - used
    if left:
        raise UnsupportedError(f"no GGUF name for {sorted(left)[:3]}")
    return out


def write_gguf(model: Transformer, path: str | Path, ftype: str = "f32",
               extra_metadata: Callable[[GGUFWriter], Any] | None = None) -> Path:
    """Write `model` to `path` with every matrix as `ftype` (f32 or f16); norms stay F32."""
    cfg = model.cfg
    if cfg.arch not in GGUF_ARCH:
        raise UnsupportedError(f"cannot write architecture {cfg.arch} as GGUF")
    arch = GGUF_ARCH[cfg.arch]
    qtype, np_dtype = TYPES[ftype]
    w = GGUFWriter(str(path), arch)
    write_metadata(w, cfg, arch)
    w.add_file_type(1 if ftype == "f16" else 0)
    if extra_metadata is not None:
        extra_metadata(w)
    for name, t in gguf_tensors(model, arch).items():
        arr = t.detach().float().cpu().numpy()
        if t.dim() >= 2:
            w.add_tensor(name, arr.astype(np_dtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
