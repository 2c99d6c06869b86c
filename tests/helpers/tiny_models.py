"""Tiny random models: a leanlm Transformer from a config, and a Mistral checkpoint folder with a tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers.tiny_tokenizer import write_tiny_tokenizer


def write_tiny_mistral(folder: Path, tokenizer_kind: str = "sentencepiece") -> Path:
    """Save a 2-layer random MistralForCausalLM (GQA 4/2, window 16) and a 512-token tokenizer into `folder`."""
    import transformers

    cfg = transformers.MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                                     initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.MistralForCausalLM(cfg).save_pretrained(folder)
    write_tiny_tokenizer(folder, kind=tokenizer_kind, vocab_size=512)
    return folder


def random_transformer(windows: tuple[int | None, ...], *, std: float = 0.3, **cfg: object):  # noqa: ANN201
    """A leanlm Transformer (eval mode) with every parameter drawn from N(0, std), seed 0. Defaults: vocab 64,
    dim 32, 4 query / 2 KV heads of 8, MLP 48, one layer per entry of `windows`; `cfg` overrides any field."""
    from leanlm.model.config import ModelConfig
    from leanlm.model.transformer import Transformer

    fields = dict(arch="test", vocab_size=64, dim=32, n_layers=len(windows), n_heads=4, n_kv_heads=2, head_dim=8,
                  hidden_dim=48, layer_windows=windows) | cfg
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**fields)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, std)
    return m
