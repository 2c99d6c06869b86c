"""Checkpoint loaders: config from the checkpoint's own metadata, weights through name maps.

`load_model` and `load_tokenizer` accept a GGUF file or a Hugging Face checkpoint folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from leanlm.model.transformer import Transformer


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of a .gguf file (from its metadata) or of a checkpoint folder (tokenizer.json)."""
    if path.is_dir():
        from leanlm.formats.tokenizer_hf import HFTokenizer

        return HFTokenizer.from_folder(path)
    from leanlm.formats.gguf_file import GGUFFile
    from leanlm.formats.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(GGUFFile(path).metadata)


def load_model(path: Path, dtype: torch.dtype, device: str | torch.device = "cpu",
               quantized: bool = False) -> tuple[Transformer, Any]:
    """(model, tokenizer) from a .gguf file or a checkpoint folder (quantized: keep GGUF 4-bit weights)."""
    if path.is_dir():
        from leanlm.formats.hf_loader import load_hf_model
        from leanlm.formats.tokenizer_hf import HFTokenizer

        return load_hf_model(path, dtype, device), HFTokenizer.from_folder(path)
    from leanlm.formats.gguf_file import GGUFFile
    from leanlm.formats.gguf_loader import load_gguf_model
    from leanlm.formats.tokenizer import Tokenizer

    f = GGUFFile(path)
    return load_gguf_model(f, dtype, device, quantized), Tokenizer.from_gguf_metadata(f.metadata)
