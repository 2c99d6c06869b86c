"""A tiny random Mistral checkpoint folder (sliding window 16) with a tiny tokenizer, for folder tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_tokenizer import write_tiny_tokenizer


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
