"""Checkpoint loaders: config from the checkpoint's own metadata, weights through name maps.

`load_model` and `load_tokenizer` accept a GGUF file or a Hugging Face checkpoint folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..model import Transformer


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of a .gguf file (from its metadata) or of a checkpoint folder (tokenizer.json)."""
    if path.is_dir():
        from ..tokenizer_hf import HFTokenizer

        return HFTokenizer.from_folder(path)
    from ..gguf_file import GGUFFile
    from ..tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(GGUFFile(path).metadata)


def load_model(path: Path, dtype: torch.dtype, device: str | torch.device = "cpu",
               quantized: bool = False) -> tuple[Transformer, Any]:
    """(model, tokenizer) from a .gguf file or a checkpoint folder (quantized: keep GGUF 4-bit weights)."""
    if path.is_dir():
        from ..tokenizer_hf import HFTokenizer
        from .hf import load_hf_model

        return load_hf_model(path, dtype, device), HFTokenizer.from_folder(path)
    from ..gguf_file import GGUFFile
    from ..tokenizer import Tokenizer
    from .gguf import load_gguf_model

    f = GGUFFile(path)
    return load_gguf_model(f, dtype, device, quantized), Tokenizer.from_gguf_metadata(f.metadata)
