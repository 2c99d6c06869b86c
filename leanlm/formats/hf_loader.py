"""Load a Hugging Face checkpoint folder: config.json -> ModelConfig, safetensors -> weights.

Weights are memory-mapped with safetensors and assigned one tensor at a time into a model built
on the meta device, so the checkpoint is never held twice. Fused tensors (Phi-3's qkv_proj and
gate_up_proj) are split by rows; per-expert Mixtral and DeepSeek-V2 tensors are copied into stacked expert
tensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from leanlm.errors import LeanLMError, UnsupportedError
from leanlm.formats.placing import compile_names, finish, place
from leanlm.model.config import MlaConfig, ModelConfig, MoeConfig, YarnConfig
from leanlm.model.transformer import Transformer

# HF architecture name -> our arch name (the transformer family handles the differences)
HF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral",
            "Qwen2ForCausalLM": "qwen2", "Phi3ForCausalLM": "phi3", "DeepseekV2ForCausalLM": "deepseek2"}

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
    # DeepSeek-V2: latent attention (mla.py), routed and shared experts
    "model.layers.{i}.self_attn.q_a_proj.weight": "layers.{i}.attn.wq_a.weight",
    "model.layers.{i}.self_attn.q_a_proj.bias": "layers.{i}.attn.wq_a.bias",
    "model.layers.{i}.self_attn.q_a_layernorm.weight": "layers.{i}.attn.q_norm.weight",
    "model.layers.{i}.self_attn.q_b_proj.weight": "layers.{i}.attn.wq_b.weight",
    "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight": "layers.{i}.attn.wkv_a.weight",
    "model.layers.{i}.self_attn.kv_a_proj_with_mqa.bias": "layers.{i}.attn.wkv_a.bias",
    "model.layers.{i}.self_attn.kv_a_layernorm.weight": "layers.{i}.attn.kv_norm.weight",
    "model.layers.{i}.self_attn.kv_b_proj.weight": "layers.{i}.attn.wkv_b.weight",
    "model.layers.{i}.self_attn.o_proj.bias": "layers.{i}.attn.wo.bias",
    "model.layers.{i}.mlp.gate.weight": "layers.{i}.ffn.gate.weight",
    "model.layers.{i}.mlp.experts.{e}.gate_proj.weight": "layers.{i}.ffn.w1[{e}]",
    "model.layers.{i}.mlp.experts.{e}.up_proj.weight": "layers.{i}.ffn.w3[{e}]",
    "model.layers.{i}.mlp.experts.{e}.down_proj.weight": "layers.{i}.ffn.w2[{e}]",
    "model.layers.{i}.mlp.shared_experts.gate_proj.weight": "layers.{i}.ffn.shared.w1.weight",
    "model.layers.{i}.mlp.shared_experts.up_proj.weight": "layers.{i}.ffn.shared.w3.weight",
    "model.layers.{i}.mlp.shared_experts.down_proj.weight": "layers.{i}.ffn.shared.w2.weight",
    # fused tensors: split by rows into the listed targets
    "model.layers.{i}.self_attn.qkv_proj.weight": "layers.{i}.attn.wq.weight+layers.{i}.attn.wk.weight"
                                                  "+layers.{i}.attn.wv.weight",
    "model.layers.{i}.mlp.gate_up_proj.weight": "layers.{i}.ffn.w1.weight+layers.{i}.ffn.w3.weight",
}
map_name = compile_names(HF_NAMES)


def _mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's attention temperature for a context `factor` times longer (1 when not longer)."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def _rope(c: dict[str, Any]) -> tuple[float, float, float, YarnConfig | None]:
    """(theta, partial rotary factor, linear scale, YaRN) from old-style or rope_parameters configs."""
    rp = {**(c.get("rope_parameters") or {}), **(c.get("rope_scaling") or {})}
    kind = rp.get("rope_type", rp.get("type")) or "default"
    if kind not in ("default", "linear", "yarn"):
        raise UnsupportedError(f"rope scaling '{kind}' is not supported yet")
    theta = float(c.get("rope_theta", rp.get("rope_theta", 10000.0)))
    partial = float(c.get("partial_rotary_factor", rp.get("partial_rotary_factor", 1.0)))
    factor = float(rp.get("factor", 1.0)) if kind == "linear" else 1.0
    yarn = None
    if kind == "yarn":
        f = float(rp["factor"])
        attention = rp.get("attention_factor")
        if attention is None:
            m, m_all = rp.get("mscale"), rp.get("mscale_all_dim")
            attention = _mscale(f, m) / _mscale(f, m_all) if m and m_all else _mscale(f)
        yarn = YarnConfig(f, int(rp.get("original_max_position_embeddings") or c["max_position_embeddings"]),
                          float(rp.get("beta_fast") or 32), float(rp.get("beta_slow") or 1), float(attention),
                          bool(rp.get("truncate", True)))
    return theta, partial, factor, yarn


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
    theta, partial, factor, yarn = _rope(c)
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
    mla, n_kv, rope_dim = None, int(c.get("num_key_value_heads") or n_heads), int(head_dim * partial)
    attn_scale = None
    if arch == "deepseek2":
        mla, moe = _deepseek2(c)
        head_dim, rope_dim, n_kv = mla.nope_dim + mla.rope_dim, mla.rope_dim, n_heads
        rp = {**(c.get("rope_parameters") or {}), **(c.get("rope_scaling") or {})}
        if yarn is not None and rp.get("mscale_all_dim"):  # DeepSeek also sharpens softmax by YaRN's mscale
            attn_scale = head_dim**-0.5 * _mscale(yarn.factor, float(rp["mscale_all_dim"])) ** 2
    return ModelConfig(
        arch=arch, vocab_size=int(c["vocab_size"]), dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim, mla=mla, rope_interleaved=arch == "deepseek2",
        hidden_dim=int(c["intermediate_size"]), norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        context_length=int(c.get("max_position_embeddings", 4096)), rope_base=theta,
        rope_dim=rope_dim, rope_scale=factor, yarn=yarn, attn_scale=attn_scale, layer_windows=windows,
        attn_bias=bool(c.get("attention_bias", arch == "qwen2")), act="silu" if act == "silu" else "gelu_tanh",
        moe=moe, tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    )


def _deepseek2(c: dict[str, Any]) -> tuple[MlaConfig, MoeConfig | None]:
    """DeepSeek-V2's latent attention and experts from its config.json."""
    mla = MlaConfig(kv_rank=int(c["kv_lora_rank"]), q_rank=int(c["q_lora_rank"]) if c.get("q_lora_rank") else None,
                    nope_dim=int(c["qk_nope_head_dim"]), rope_dim=int(c["qk_rope_head_dim"]),
                    v_dim=int(c["v_head_dim"]))
    if not c.get("n_routed_experts"):
        return mla, None
    method = c.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedError(f"expert routing '{method}' is not supported (greedy, group_limited_greedy)")
    grouped = method == "group_limited_greedy"
    moe = MoeConfig(int(c["n_routed_experts"]), int(c["num_experts_per_tok"]),
                    hidden_dim=int(c["moe_intermediate_size"]), score_first=True,
                    routed_scale=float(c.get("routed_scaling_factor", 1.0)),
                    n_group=int(c.get("n_group") or 1) if grouped else 1,
                    topk_group=int(c.get("topk_group") or 1) if grouped else 1,
                    n_shared=int(c.get("n_shared_experts") or 0), first_dense=int(c.get("first_k_dense_replace", 0)))
    return mla, moe


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
