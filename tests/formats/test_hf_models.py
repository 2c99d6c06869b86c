"""Parity with transformers on tiny random-initialised checkpoints of every supported HF architecture.

Each model is saved with save_pretrained (safetensors + config.json) and loaded by leanlm from the
folder. In fp32: logits of one full pass and of token-by-token decoding through the (rolling)
cache within 1e-4; greedy continuations identical for 120 tokens; chunked prefill equal to one pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leanlm.formats.hf_loader import load_hf_model
from leanlm.model.cache import ModelCache
from leanlm.runtime.generate import generate_ids
from leanlm.runtime.sampling import SamplingParams, sample

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
DEEPSEEK = dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, moe_intermediate_size=32)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral_swa16": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=16)),
    "mixtral_8x2": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2,
                                                                sliding_window=16)),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2_mixed_swa": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=16,
                                                                max_window_layers=1)),
    "phi3_fused_partial_rope": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=16,
                                                                      partial_rotary_factor=0.5)),
    # YaRN: an original context of 128 stretched 4x (the long wavelengths interpolated, the short ones kept)
    "llama_yarn": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128))),
    # latent attention (a 32 + 8 wide cache instead of 4 heads x (24 + 16)), a dense first layer, then 8
    # routed experts (top 2 of the softmax scores) plus a shared one
    "deepseek2_mla_moe": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        DEEPSEEK, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1)),
    # queries through their own latent; experts chosen within the best 2 of 4 groups, scaled, 2 shared
    "deepseek2_q_latent_groups": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        DEEPSEEK, q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
        first_k_dense_replace=0, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=2.0)),
    # and with YaRN as DeepSeek-V2 ships it (mscale = mscale_all_dim: the softmax scale x mscale^2)
    "deepseek2_yarn": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        DEEPSEEK, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128, mscale=0.707,
            mscale_all_dim=0.707))),
}
NO_GGUF = {"qwen2_mixed_swa": "GGUF has no per-layer window key for qwen2",
           "llama_yarn": "GGUF export of YaRN scaling is only written for DeepSeek-V2"}


def make_checkpoint(case: str, folder: Path, dtype: torch.dtype = torch.float32):  # noqa: ANN201
    cfg_cls, model_cls, extra = CASES[case]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra})
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(cfg).eval()
    hf.to(dtype).save_pretrained(folder)
    if dtype == torch.float32:
        return hf
    # reload rather than upcast in place: the rotary tables must not pass through half precision
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=list(CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_checkpoint(request.param, folder)
    return request.param, hf, load_hf_model(folder, torch.float32)


def ids_for(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_full_forward_logits(pair) -> None:  # noqa: ANN001
    _, hf, ours = pair
    ids = ids_for(90)
    ref = hf(ids).logits
    got = ours(ids, torch.arange(90)[None])
    assert (got - ref).abs().max().item() < 1e-4


@torch.inference_mode()
def test_token_by_token_decoding_through_the_cache(pair) -> None:  # noqa: ANN001
    """Prefill 10 tokens, then 80 single steps: the rolling buffer (16 + 8 slots) wraps several times."""
    _, hf, ours = pair
    ids = ids_for(90, seed=1)
    ref = hf(ids).logits
    cache = ModelCache(ours.cfg, 1, 90, 8, torch.float32)
    out = []
    for s, e in [(0, 8), (8, 10)] + [(i, i + 1) for i in range(10, 90)]:
        cache.kv_len = e
        out.append(ours(ids[:, s:e], torch.arange(s, e)[None], cache))
    assert (torch.cat(out, 1) - ref).abs().max().item() < 1e-4


@torch.inference_mode()
def test_greedy_120_tokens_identical(pair) -> None:  # noqa: ANN001
    _, hf, ours = pair
    prompt = ids_for(20, seed=2)
    ref = hf.generate(prompt, max_new_tokens=120, do_sample=False, eos_token_id=None, pad_token_id=0)
    greedy = SamplingParams(temperature=0)
    got = list(generate_ids(ours, prompt[0].tolist(), lambda lg, h: sample(lg, greedy, h), 120, chunk=8))
    assert got == ref[0, 20:].tolist()
    assert len(set(got)) > 10  # a degenerate repetition would make this test weak


@pytest.mark.parametrize("chunk", [5, 16])
@torch.inference_mode()
def test_chunked_prefill_equals_one_pass(pair, chunk: int) -> None:  # noqa: ANN001
    _, _, ours = pair
    ids = ids_for(70, seed=3)
    one = ours(ids, torch.arange(70)[None])
    cache = ModelCache(ours.cfg, 1, 70, chunk, torch.float32)
    parts = []
    for s in range(0, 70, chunk):
        e = min(s + chunk, 70)
        cache.kv_len = e
        parts.append(ours(ids[:, s:e], torch.arange(s, e)[None], cache))
    assert (torch.cat(parts, 1) - one).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.inference_mode()
def test_half_precision_checkpoints_load_into_fp32(dtype: torch.dtype, tmp_path: Path) -> None:
    hf = make_checkpoint("mistral_swa16", tmp_path, dtype)  # saved in half precision, upcast here
    ours = load_hf_model(tmp_path, torch.float32)
    ids = ids_for(40)
    assert ours.tok_embeddings.weight.dtype == torch.float32
    assert (ours(ids, torch.arange(40)[None]) - hf(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("ftype", ["f32", "f16"])
@pytest.mark.parametrize("case", [c for c in CASES if c not in NO_GGUF])
@torch.inference_mode()
def test_gguf_twin_matches_safetensors(case: str, ftype: str, tmp_path: Path) -> None:
    """The same tiny model written as GGUF (F32 and F16) with the gguf writer loads to the same logits."""
    from leanlm.formats.gguf_file import GGUFFile
    from leanlm.formats.gguf_loader import load_gguf_model
    from leanlm.formats.gguf_writer import write_gguf

    dtype = torch.float16 if ftype == "f16" else torch.float32
    make_checkpoint(case, tmp_path / "hf", dtype)
    st = load_hf_model(tmp_path / "hf", torch.float32)
    path = write_gguf(st, tmp_path / "m.gguf", ftype)
    gg = load_gguf_model(GGUFFile(path), torch.float32)
    assert gg.cfg.layer_windows == st.cfg.layer_windows and gg.cfg.moe == st.cfg.moe
    ids = ids_for(60)
    pos = torch.arange(60)[None]
    assert (gg(ids, pos) - st(ids, pos)).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", ["deepseek2_mla_moe", "deepseek2_q_latent_groups"])
@torch.inference_mode()
def test_gguf_with_split_kv_b_matches_safetensors(case: str, tmp_path: Path) -> None:
    """llama.cpp's current converter writes each DeepSeek layer's kv_b as attn_k_b (H, rank, nope: per head,
    transposed) and attn_v_b (H, v, rank) instead of attn_kv_b; such a file loads to the same logits."""
    from gguf import GGUFWriter

    from leanlm.formats.gguf_file import GGUFFile
    from leanlm.formats.gguf_loader import load_gguf_model
    from leanlm.formats.gguf_writer import gguf_tensors, write_metadata

    make_checkpoint(case, tmp_path / "hf")
    st = load_hf_model(tmp_path / "hf", torch.float32)
    m = st.cfg.mla
    w = GGUFWriter(str(tmp_path / "m.gguf"), "deepseek2")
    write_metadata(w, st.cfg, "deepseek2")
    for name, t in gguf_tensors(st, "deepseek2").items():
        if name.endswith("attn_kv_b.weight"):  # as convert_hf_to_gguf.py splits it
            kv_b = t.view(st.cfg.n_heads, m.nope_dim + m.v_dim, m.kv_rank)
            k_b, v_b = kv_b.split([m.nope_dim, m.v_dim], dim=1)
            w.add_tensor(name.replace("kv_b", "k_b"), k_b.transpose(1, 2).contiguous().numpy())
            w.add_tensor(name.replace("kv_b", "v_b"), v_b.contiguous().numpy())
        else:
            w.add_tensor(name, t.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    gg = load_gguf_model(GGUFFile(tmp_path / "m.gguf"), torch.float32)
    ids = ids_for(50)
    pos = torch.arange(50)[None]
    assert (gg(ids, pos) - st(ids, pos)).abs().max().item() < 1e-4


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    import json

    from leanlm.errors import UnsupportedError

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedError, match="GPT2LMHeadModel"):
        load_hf_model(tmp_path, torch.float32)


@torch.inference_mode()
def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    cfg_cls, model_cls, extra = CASES["mixtral_8x2"]
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**COMMON, **extra)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = load_hf_model(tmp_path, torch.float32)
    ids = ids_for(30)
    assert (ours(ids, torch.arange(30)[None]) - hf(ids).logits).abs().max().item() < 1e-4
