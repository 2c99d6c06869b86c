"""Load a Hugging Face checkpoint folder: config.json -> ModelConfig, safetensors -> weights.

Weights are memory-mapped with safetensors and assigned one tensor at a time into a model built
on the meta device, so the checkpoint is never held twice. Fused tensors (Phi-3's qkv_proj and
gate_up_proj) are split by rows; per-expert Mixtral tensors are copied into stacked expert tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..config import ModelConfig, MoeConfig
from ..errors import LeanLMError, UnsupportedError
from ..model import Transformer
from .common import compile_names, finish, place

# HF architecture name -> our arch name (the transformer family handles the differences)
HF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral",
            "Qwen2ForCausalLM": "qwen2", "Phi3ForCausalLM": "phi3"}

# HF tensor name -> ours ({i} layer, {e} expert). Data, not code.
HF_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attn.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attn.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attn.wv.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attn.wq.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attn.wk.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attn.wv.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn.wo.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.ffn.w1.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.ffn.w3.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.ffn.w2.weight",
    "model.layers.{i}.block_sparse_moe.gate.weight": "layers.{i}.ffn.gate.weight",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight": "layers.{i}.ffn.w1[{e}]",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight": "layers.{i}.ffn.w2[{e}]",
    "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight": "layers.{i}.ffn.w3[{e}]",
    # fused tensors: split by rows into the listed targets
    "model.layers.{i}.self_attn.qkv_proj.weight": "layers.{i}.attn.wq.weight+layers.{i}.attn.wk.weight"
                                                  "+layers.{i}.attn.wv.weight",
    "model.layers.{i}.mlp.gate_up_proj.weight": "layers.{i}.ffn.w1.weight+layers.{i}.ffn.w3.weight",
}
map_name = compile_names(HF_NAMES)


def _rope(c: dict[str, Any]) -> tuple[float, float, float]:
    """(theta, partial rotary factor, linear scale) from old-style or rope_parameters configs."""
    rp = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type")) or rp.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise UnsupportedError(f"rope scaling '{kind}' is not supported yet")
    theta = float(c.get("rope_theta", rp.get("rope_theta", 10000.0)))
    partial = float(c.get("partial_rotary_factor", rp.get("partial_rotary_factor", 1.0)))
    factor = float(scaling.get("factor", rp.get("factor", 1.0))) if kind == "linear" else 1.0
    return theta, partial, factor


def config_from_hf(c: dict[str, Any]) -> ModelConfig:
    archs = c.get("architectures") or [c.get("model_type", "?")]
    if archs[0] not in HF_ARCHS:
        raise UnsupportedError(f"architecture '{archs[0]}' is not supported (supported: {', '.join(HF_ARCHS)})")
    arch = HF_ARCHS[archs[0]]
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "gelu_pytorch_tanh"):
        raise UnsupportedError(f"activation '{act}' is not supported")
    dim, n_heads, n_layers = int(c["hidden_size"]), int(c["num_attention_heads"]), int(c["num_hidden_layers"])
    head_dim = int(c.get("head_dim") or dim // n_heads)
    theta, partial, factor = _rope(c)
    window = c.get("sliding_window")
    if arch == "qwen2":
        if not c.get("use_sliding_window", False):
            window = None
        first = int(c.get("max_window_layers", n_layers))
        windows = tuple(window if window is not None and i >= first else None for i in range(n_layers))
    elif arch in ("mistral", "mixtral", "phi3"):
        windows = (window,) * n_layers
    else:
        windows = (None,) * n_layers
    moe = MoeConfig(int(c["num_local_experts"]), int(c["num_experts_per_tok"])) if arch == "mixtral" else None
    return ModelConfig(
        arch=arch, vocab_size=int(c["vocab_size"]), dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(c.get("num_key_value_heads") or n_heads), head_dim=head_dim,
        hidden_dim=int(c["intermediate_size"]), norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        context_length=int(c.get("max_position_embeddings", 4096)), rope_base=theta,
        rope_dim=int(head_dim * partial), rope_scale=factor, layer_windows=windows,
        attn_bias=bool(c.get("attention_bias", arch == "qwen2")), act="silu" if act == "silu" else "gelu_tanh",
        moe=moe, tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    )


def read_config(folder: Path) -> dict[str, Any]:
    p = folder / "config.json"
    if not p.is_file():
        raise LeanLMError(f"{folder} is not a checkpoint folder: no config.json")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LeanLMError(f"{p} is not valid JSON: {e}") from None


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LeanLMError(f"no *.safetensors weights in {folder}")
    for f in files:
        if not f.is_file():
            raise LeanLMError(f"missing weight shard {f}")
    return files


def load_hf_model(folder: Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> Transformer:
    cfg = config_from_hf(read_config(folder))
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = dict(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for shard in safetensors_files(folder):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                targets = map_name(name)
                if targets is None:
                    raise UnsupportedError(f"unexpected tensor '{name}' for architecture {cfg.arch}")
                place(f.get_tensor(name), targets, expected, state, dtype, device)
    finish(model, state, cfg.tie_embeddings)
    return model.eval()
