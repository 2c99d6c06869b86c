"""Load a GGUF file: ModelConfig from its metadata, weights through the GGUF name map."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import torch
from torch import nn

from leanlm.errors import UnsupportedError
from leanlm.formats.gguf_file import GGUFFile
from leanlm.formats.placing import HeapTrimmer, compile_names, finish, meta_device, place, release_memory
from leanlm.model.config import MlaConfig, ModelConfig, MoeConfig, YarnConfig
from leanlm.model.transformer import Transformer
from leanlm.quant.dequant import dequantize, dequantize_rows
from leanlm.quant.int4 import Int4Linear
from leanlm.quant.int8 import Int8Embedding, Int8Linear, quantize_rows
from leanlm.quant.repack import REPACKED, int4_linear, repack

SUPPORTED_ARCHS = ("llama", "gemma3", "qwen2", "phi3", "deepseek2")

# GGUF tensor name -> our parameter name ({i} = layer index). Data, not code.
GGUF_NAMES: dict[str, str] = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attn.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attn.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attn.wv.weight",
    "blk.{i}.attn_q.bias": "layers.{i}.attn.wq.bias",
    "blk.{i}.attn_k.bias": "layers.{i}.attn.wk.bias",
    "blk.{i}.attn_v.bias": "layers.{i}.attn.wv.bias",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.wo.weight",
    "blk.{i}.attn_q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.attn.k_norm.weight",
    "blk.{i}.post_attention_norm.weight": "layers.{i}.post_attn_norm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.post_ffw_norm.weight": "layers.{i}.post_ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.ffn.w1.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.ffn.w3.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.ffn.w2.weight",
    "blk.{i}.ffn_gate_inp.weight": "layers.{i}.ffn.gate.weight",  # MoE router
    "blk.{i}.ffn_gate_exps.weight": "layers.{i}.ffn.w1",  # stacked experts (E, hidden, D)
    "blk.{i}.ffn_up_exps.weight": "layers.{i}.ffn.w3",
    "blk.{i}.ffn_down_exps.weight": "layers.{i}.ffn.w2",
}
# per-architecture differences from the common map
ARCH_NAMES: dict[str, dict[str, str]] = {
    "deepseek2": {  # latent attention (mla.py) and shared experts
        "blk.{i}.attn_q_a.weight": "layers.{i}.attn.wq_a.weight",
        "blk.{i}.attn_q_a_norm.weight": "layers.{i}.attn.q_norm.weight",
        "blk.{i}.attn_q_b.weight": "layers.{i}.attn.wq_b.weight",
        "blk.{i}.attn_kv_a_mqa.weight": "layers.{i}.attn.wkv_a.weight",
        "blk.{i}.attn_kv_a_norm.weight": "layers.{i}.attn.kv_norm.weight",
        "blk.{i}.attn_kv_b.weight": "layers.{i}.attn.wkv_b.weight",
        "blk.{i}.ffn_gate_shexp.weight": "layers.{i}.ffn.shared.w1.weight",
        "blk.{i}.ffn_up_shexp.weight": "layers.{i}.ffn.shared.w3.weight",
        "blk.{i}.ffn_down_shexp.weight": "layers.{i}.ffn.shared.w2.weight",
    },
    "phi3": {  # fused q/k/v and gate/up, split by rows at load
        "blk.{i}.attn_qkv.weight": "layers.{i}.attn.wq.weight+layers.{i}.attn.wk.weight+layers.{i}.attn.wv.weight",
        "blk.{i}.ffn_up.weight": "layers.{i}.ffn.w1.weight+layers.{i}.ffn.w3.weight",
    },
}
IGNORED = ("rope_freqs.weight",)
# llama.cpp's converter (since 2025) writes DeepSeek's kv_b projection as two tensors per layer for its absorbed
# attention: k_b = W_uk transposed per head (H, kv_rank, nope) and v_b = W_uv (H, v, kv_rank); wkv_b is both,
# head by head: rows h (nope + v) .. are k_b[h]^T then v_b[h] (_merge_kv_b).
KV_B = re.compile(r"^blk\.(\d+)\.attn_([kv])_b\.weight$")
_MAPPERS = {arch: compile_names({**GGUF_NAMES, **ARCH_NAMES.get(arch, {})}) for arch in SUPPORTED_ARCHS}


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    md: dict[str, Any] = f.metadata
    arch = f.architecture
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedError(f"architecture '{arch}' is not supported yet (supported: {', '.join(SUPPORTED_ARCHS)})")

    def get(key: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{key}", default)

    dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    n_layers = int(get("block_count"))
    head_dim = int(get("attention.key_length", dim // n_heads))
    vocab = int(get("vocab_size", len(md.get("tokenizer.ggml.tokens", []))))
    if "token_embd.weight" in f.tensors:
        vocab = f.tensors["token_embd.weight"].shape[0]
    n_experts = int(get("expert_count", 0))
    common: dict[str, Any] = dict(
        arch=arch, vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)), head_dim=head_dim,
        hidden_dim=int(get("expert_feed_forward_length", 0) or get("feed_forward_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        context_length=int(get("context_length", 4096)),
        rope_base=float(get("rope.freq_base", 10000.0)),
        rope_dim=int(get("rope.dimension_count", head_dim)),
        tie_embeddings="output.weight" not in f.tensors,
        attn_bias="blk.0.attn_q.bias" in f.tensors,
        moe=MoeConfig(n_experts, int(get("expert_used_count"))) if n_experts else None,
    )
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        common["rope_scale"] = float(get("rope.scaling.factor", 1.0))
    elif scaling != "none" and not (scaling == "yarn" and arch == "deepseek2"):
        raise UnsupportedError(f"rope scaling '{scaling}' in GGUF files is not supported yet")
    if arch == "deepseek2":
        return _deepseek2_config(get, common)
    if arch != "gemma3":
        window = get("attention.sliding_window")
        windows = (int(window) if window else None,) * n_layers
        # llama.cpp's converter permutes llama q/k rows so rotation pairs are adjacent; qwen2/phi3 use NeoX
        return ModelConfig(**common, layer_windows=windows, rope_interleaved=arch == "llama")
    # gemma3: every 6th layer is global, the others slide over `sliding_window` tokens
    window = int(get("attention.sliding_window", 512))
    windows = tuple(None if (i + 1) % 6 == 0 else window for i in range(n_layers))
    return ModelConfig(
        **common, layer_windows=windows, rope_local_base=10000.0, act="gelu_tanh",
        qk_norm=True, post_norms=True, embed_scale=math.sqrt(dim), attn_scale=head_dim**-0.5,
    )


def _deepseek2_config(get: Any, common: dict[str, Any]) -> ModelConfig:
    """DeepSeek-V2 from llama.cpp's keys. Files converted for llama.cpp's absorbed attention give the per-head
    key and value sizes as `key_length_mla` / `value_length_mla` (their `key_length` is then the latent's)."""
    if int(get("expert_gating_func", 1)) != 1 or get("expert_weights_norm", False):
        raise UnsupportedError("DeepSeek-V3-style expert routing (sigmoid gates, normalised weights) is not supported")
    rope = int(get("rope.dimension_count"))
    qk = int(get("attention.key_length_mla", 0) or get("attention.key_length"))
    mla = MlaConfig(kv_rank=int(get("attention.kv_lora_rank")), q_rank=int(get("attention.q_lora_rank", 0)) or None,
                    nope_dim=qk - rope, rope_dim=rope,
                    v_dim=int(get("attention.value_length_mla", 0) or get("attention.value_length")))
    n_experts = int(get("expert_count", 0))
    moe = MoeConfig(n_experts, int(get("expert_used_count")), hidden_dim=int(get("expert_feed_forward_length")),
                    score_first=True, routed_scale=float(get("expert_weights_scale", 1.0)),
                    n_group=int(get("expert_group_count", 1)), topk_group=int(get("expert_group_used_count", 1)),
                    n_shared=int(get("expert_shared_count", 0)),
                    first_dense=int(get("leading_dense_block_count", 0))) if n_experts else None
    yarn, scale = None, qk**-0.5
    if get("rope.scaling.type", "none") == "yarn":  # llama.cpp: kq_scale = mscale^2 / sqrt(qk), cos/sin unscaled
        factor = float(get("rope.scaling.factor"))
        yarn = YarnConfig(factor, int(get("rope.scaling.original_context_length")),
                          float(get("rope.scaling.yarn_beta_fast", 32.0)),
                          float(get("rope.scaling.yarn_beta_slow", 1.0)))
        scale *= (1.0 + float(get("rope.scaling.yarn_log_multiplier", 0.0)) * math.log(factor)) ** 2
    common.update(n_kv_heads=common["n_heads"], head_dim=qk, rope_dim=rope, moe=moe,
                  hidden_dim=int(get("feed_forward_length")))
    return ModelConfig(**common, mla=mla, yarn=yarn, attn_scale=scale, rope_interleaved=True)


def _merge_kv_b(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """wkv_b (H (nope + v), kv_rank) from k_b (H, kv_rank, nope) and v_b (H, v, kv_rank) (see KV_B)."""
    k, v = parts["k"].transpose(1, 2), parts["v"]  # (H, nope, kv_rank), (H, v, kv_rank)
    return torch.cat([k, v], dim=1).reshape(-1, k.shape[-1])


def load_gguf_model(f: GGUFFile, dtype: torch.dtype, device: str | torch.device = "cpu",
                    quantized: bool = False) -> Transformer:
    """Build the model on the meta device, then assign each weight in place.

    quantized: keep block-quantized Linear weights quantized as `Int4Linear` modules (CPU int4 kernel,
    repacked exactly; see quant/repack.py) and the output head as per-row int8; norms, F16/F32 weights
    and anything else are used as `dtype`.
    """
    cfg = config_from_gguf(f)
    f.release(None)  # the header, parsed already
    with meta_device():
        model = Transformer(cfg)
    state: dict[str, torch.Tensor] = {}
    mapper = _MAPPERS[cfg.arch]
    done = _swap_int4_linears(f, model, mapper, state) if quantized else set()
    if quantized:
        done |= _swap_int8_head(f, model, state, dtype)
    expected = dict(model.state_dict())
    kv_b: dict[str, dict[str, torch.Tensor]] = {}  # layer -> {"k": ..., "v": ...} of split kv_b tensors
    for name in f.tensors:
        if name in IGNORED or name in done:
            continue
        if cfg.mla is not None and (m := KV_B.match(name)):
            parts = kv_b.setdefault(m.group(1), {})
            parts[m.group(2)] = dequantize(f, name, dtype)
            if len(parts) == 2:
                place(_merge_kv_b(parts), [f"layers.{m.group(1)}.attn.wkv_b.weight"], expected, state, dtype, device)
            continue
        targets = mapper(name)
        if targets is None:
            raise UnsupportedError(f"unexpected tensor '{name}' for architecture {cfg.arch}")
        place(dequantize(f, name, dtype), targets, expected, state, dtype, device)
        f.release(name)
    finish(model, state, cfg.tie_embeddings and not quantized)
    release_memory()
    return model.eval()


def _swap_int4_linears(f: GGUFFile, model: Transformer, mapper: Any, state: dict[str, torch.Tensor]) -> set[str]:
    """Replace each Linear whose GGUF weight is block-quantized by an Int4Linear; return the GGUF names consumed."""
    done: set[str] = set()
    trim = HeapTrimmer()
    for name, info in f.tensors.items():
        targets = mapper(name) if info.qtype in REPACKED else None
        if targets and len(targets) == 1 and len(info.shape) == 3:  # stacked experts (E, N, K) of an MoE
            done.update(_swap_experts(f, model, name, targets[0], state))
            trim()
            continue
        if not targets or len(targets) != 1 or not targets[0].endswith(".weight"):
            continue
        path = targets[0][: -len(".weight")]
        mod = model.get_submodule(path)
        if not isinstance(mod, nn.Linear):
            continue
        bias_name = name[: -len(".weight")] + ".bias"
        bias = dequantize(f, bias_name, torch.float32) if mod.bias is not None else None
        new = int4_linear(f, name, bias)
        f.release(name)
        trim(sum(b.numel() * b.element_size() for b in new.buffers()))
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        state.update({f"{path}.{k}": v for k, v in new.state_dict().items()})
        done.update({name, bias_name})
    release_memory()
    return done


def _swap_experts(f: GGUFFile, model: Transformer, name: str, target: str, state: dict[str, torch.Tensor]) -> set[str]:
    """Stacked expert weights `name` (E, N, K), e.g. ffn_gate_exps for `layers.3.ffn.w1`, as E Int4Linear
    modules (the MoE's `q1`) in place of the dense stacked parameter; each expert's rows are its own bytes."""
    path, which = target.rsplit(".", 1)  # "layers.3.ffn", "w1"
    moe = model.get_submodule(path)
    E, N, K = f.tensors[name].shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (a read-only buffer: repack copies what it keeps)
        raw = torch.frombuffer(f.raw(name), dtype=torch.uint8).view(E, -1)
    experts = nn.ModuleList(Int4Linear(repack(raw[e], f.tensors[name].qtype, N, K)) for e in range(E))
    f.release(name)
    delattr(moe, which)
    moe.add_module("q" + which[1:], experts)
    state.update({f"{path}.q{which[1:]}.{k}": v for k, v in experts.state_dict().items()})
    return {name}


def _swap_int8_head(f: GGUFFile, model: Transformer, state: dict[str, torch.Tensor], dtype: torch.dtype) -> set[str]:
    """Output head (and the embedding, when tied to it) as per-row int8: the largest matrix read per token."""
    head = "output.weight" if "output.weight" in f.tensors else "token_embd.weight"
    if not isinstance(model.output, nn.Linear):  # already an Int4Linear
        head = "token_embd.weight"
    n_rows = f.tensors[head].shape[0]
    row_bytes, n_cols = f.tensors[head].nbytes // n_rows, f.tensors[head].shape[1]
    trim = HeapTrimmer()

    def rows(s: int, e: int) -> torch.Tensor:
        w = dequantize_rows(f, head, s, e)
        f.release(head, s * row_bytes, e * row_bytes)
        trim((e - s) * (n_cols + 2))  # int8 codes and a bf16 scale per row
        return w

    codes, scales = quantize_rows(n_rows, rows)
    done = {head}
    if head == "token_embd.weight" and "output.weight" in f.tensors:  # untied head that stayed dense
        model.tok_embeddings = Int8Embedding(codes, scales, dtype)
    else:
        model.output = Int8Linear(codes, scales)
        state.update({f"output.{k}": v for k, v in model.output.state_dict().items()})
        if head == "token_embd.weight":
            model.tok_embeddings = Int8Embedding.tied(model.output, dtype)
    if head == "token_embd.weight":
        state.update({f"tok_embeddings.{k}": v for k, v in model.tok_embeddings.state_dict().items()})
    return done

