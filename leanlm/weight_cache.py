"""Quantized models as loaded (with their tokenizers), saved once and memory-mapped afterwards.

Loading a GGUF file for our kernels means repacking every tensor (quant/repack.py, `vnni_pack`, the head's
`head_pack`) and fusing projections: 0.6 s for SmolLM2, 2 s for Gemma 3 on 2 cores, where llama.cpp maps
its file and is done. So the first load saves the finished module (structure and buffers) with `torch.save`,
and later loads `torch.load(..., mmap=True)` it: every buffer is a view of the mapped file, paged in from
the page cache as the decode steps first touch it, as llama.cpp's weights are; nothing is held twice. The
tokenizer, built from the file's metadata (0.35 s for SmolLM2's 49152 tokens), is pickled beside it.

The key covers everything the saved layout depends on: the GGUF file (resolved path, size, modification
time), the compute dtype, torch's version, which of our kernels this CPU runs (they choose the layout), and
the source of the code that builds it. A damaged or unreadable entry is ignored (the file is loaded again);
saving an entry deletes the ones it replaces (same file and dtype, older key), so upgrades do not pile up
copies of the model on disk.
`LEANLM_WEIGHT_CACHE=0` turns the cache off.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from . import native
from .model import Transformer

_SOURCES = ("model.py", "config.py", "native.py", "quant/int4.py", "quant/int8.py", "quant/repack.py",
            "quant/dequant.py", "quant/fuse.py", "loaders/gguf.py", "loaders/common.py", "tokenizer.py",
            "gguf_file.py", "weight_cache.py")


def enabled() -> bool:
    return os.environ.get("LEANLM_WEIGHT_CACHE", "1") != "0"


def entry(path: Path, dtype: torch.dtype) -> Path:
    """Where the loaded form of `path` (a .gguf file) for `dtype` is kept."""
    st = path.resolve().stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype}|{torch.__version__}".encode())
    h.update(f"|int4 {native.int4_vnni()}|head {native.int8_head()}|attention {native.attention()}".encode())
    here = Path(__file__).parent
    for src in _SOURCES:
        h.update((here / src).read_bytes())
    root = Path(os.environ.get("LEANLM_CACHE") or Path.home() / ".cache" / "leanlm")
    owner = hashlib.sha256(f"{path.resolve()}|{dtype}".encode()).hexdigest()[:8]  # which file, which dtype
    return root / "weights" / f"{path.stem}-{owner}-{h.hexdigest()[:16]}.pt"


def _prune(where: Path) -> None:
    """Delete the entries `where` replaces: the same file and dtype (the name up to the key), another key.
    Nothing loads them again (the file, the code, torch or the CPU changed), and each is the model's size.
    A process that still maps one keeps its pages (Linux frees them when the mapping goes)."""
    owner = where.name.rsplit("-", 1)[0]
    for old in where.parent.glob("*.pt"):
        if old != where and old.name.rsplit("-", 1)[0] == owner:
            old.unlink(missing_ok=True)


def load(path: Path, dtype: torch.dtype) -> tuple[Transformer, Any] | None:
    """The saved (model, tokenizer), the model's buffers mapped from the file; None when there is none (or it
    cannot be read)."""
    if not enabled():
        return None
    where = entry(path, dtype)
    if not where.exists():
        return None
    try:
        saved = torch.load(where, mmap=True, weights_only=False)
    except Exception:  # a damaged entry (an interrupted write is never renamed into place): load the file again
        return None
    ok = isinstance(saved, dict) and isinstance(saved.get("model"), Transformer) and "tokenizer" in saved
    return (saved["model"], saved["tokenizer"]) if ok else None


def save(model: Transformer, tokenizer: Any, path: Path, dtype: torch.dtype) -> Path | None:
    """Save the loaded model and tokenizer for later loads; the entry's path, or None where it cannot be
    written."""
    if not enabled():
        return None
    where = entry(path, dtype)
    tmp = where.with_suffix(f".tmp{os.getpid()}")
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model, "tokenizer": tokenizer}, tmp)
        tmp.replace(where)
        _prune(where)
    except Exception:  # a read-only or full disk (or anything unpicklable) costs speed, not the load
        tmp.unlink(missing_ok=True)
        return None
    return where
