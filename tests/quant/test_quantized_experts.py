"""Mixture-of-experts GGUF files keep their experts quantized in memory (loaders/gguf.py `_swap_experts`):
each expert of a stacked `ffn_*_exps` tensor becomes its own Int4Linear, and the model computes what the
same file dequantized to float32 computes, within bf16 rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import FIXTURES
from helpers.tiny_tokenizer import write_tiny_tokenizer

from leanlm.llm import load
from leanlm.quant.int4 import Int4Linear
from leanlm.tools.quantize import quantize


def tiny_mixtral(folder: Path) -> Path:
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(folder)
    write_tiny_tokenizer(folder, kind="sentencepiece", vocab_size=512)
    return folder


@pytest.mark.parametrize("kind", ["mixtral", "deepseek2"])
@torch.inference_mode()
def test_experts_stay_quantized_and_compute_the_same(kind: str, tmp_path: Path) -> None:
    src = tiny_mixtral(tmp_path / "hf") if kind == "mixtral" else FIXTURES / "tiny_deepseek2.f16.gguf"
    path = tmp_path / "q8.gguf"
    quantize(src, path, "q8_0", progress=False)
    q = load(str(path), progress=False)  # auto: quantized weights, bf16 compute
    ref = load(str(path), dtype="float32", progress=False)  # the same codes, dequantized
    moes = [layer.ffn for layer in q.model.layers if hasattr(layer.ffn, "moe")]
    assert moes
    for moe in moes:
        for which in ("q1", "q2", "q3"):
            experts = getattr(moe, which)
            assert len(experts) == moe.moe.n_experts and all(isinstance(e, Int4Linear) for e in experts)
        assert not any(hasattr(moe, w) for w in ("w1", "w2", "w3"))  # no dense copy kept
    # each quantized expert against the same expert's dequantized rows (only the int8 activations differ)
    dense = next(layer.ffn for layer in ref.model.layers if hasattr(layer.ffn, "moe"))
    x = torch.randn(16, q.model.cfg.dim, generator=torch.Generator().manual_seed(1))
    for which in (1, 2, 3):
        w = getattr(dense, f"w{which}")  # (E, N, K) float32
        xk = x if which != 2 else torch.randn(16, w.shape[2], generator=torch.Generator().manual_seed(2))
        for e in range(w.shape[0]):
            got = getattr(moes[0], f"q{which}")[e](xk.bfloat16()).float()
            want = xk @ w[e].T
            assert (got - want).abs().max().item() < 0.03 * want.abs().max().item()
    # the whole model: bf16 with int8 activations (the path every quantized file takes) against float32
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(40)[None]
    got, want = q.model(ids, pos).float(), ref.model(ids, pos)
    assert (got - want).abs().max().item() < 0.15 * want.abs().max().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.8  # (random weights: many near-ties)
