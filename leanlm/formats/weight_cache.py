"""Quantized models as loaded (with their tokenizers), saved once and memory-mapped afterwards.

Loading a GGUF file for our kernels means repacking every tensor (quant/repack.py, `vnni_pack`, the head's
`head_pack`) and fusing projections: 0.6 s for SmolLM2, 2 s for Gemma 3 on 2 cores, where llama.cpp maps
its file and is done. So the first load saves the finished module and its tokenizer, and later loads map
it: every buffer is a view of the mapped file, paged in from the page cache as the decode steps first touch
it, as llama.cpp's weights are; nothing is held twice.

The entry is one file: a pickle of the model and tokenizer in which each tensor is only a reference (its
storage's place in the file, dtype, shape, strides), then the storages' bytes, each 64-byte aligned. Loading
unpickles the structure and makes each tensor a view of one `mmap` of the file (`torch.frombuffer`): about
10 us a tensor, where `torch.load(mmap=True)` spent ~80 (SmolLM2 has 425 tensors: 35 ms of a 0.09 s load).
Storages shared by several tensors (tied or fused weights, views) are written once and stay shared.

The key covers everything the saved layout depends on: the GGUF file (resolved path, size, modification
time), the compute dtype, torch's version, the kernel plan (kernels/plan.py: which of our kernels run chooses
the layout), and the source of the code that builds it. A damaged or unreadable entry is ignored (the file is
loaded again); saving an entry deletes the ones it replaces (same file and dtype, older key), so upgrades do not pile up
copies of the model on disk.
The plan's `weight_cache` (`LEANLM_WEIGHT_CACHE=0`) turns the cache off.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import torch

from leanlm.home import cache_root
from leanlm.kernels.plan import KernelPlan
from leanlm.model.transformer import Transformer

_SOURCES = ("model/transformer.py", "model/attention.py", "model/layers.py", "model/rope.py", "model/moe.py",
            "model/mla.py", "model/config.py", "kernels/build.py", "kernels/plan.py",
            "quant/int4.py", "quant/int8.py", "quant/repack.py", "quant/dequant.py", "quant/fuse.py",
            "formats/gguf_loader.py", "formats/placing.py", "formats/tokenizer.py", "formats/gguf_file.py",
            "formats/weight_cache.py")


def entry(path: Path, dtype: torch.dtype, plan: KernelPlan) -> Path:
    """Where the loaded form of `path` (a .gguf file) for `dtype` under `plan` is kept."""
    st = path.resolve().stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype}|{torch.__version__}".encode())
    h.update(f"|{plan.key()}".encode())
    here = Path(__file__).parent.parent  # the package root
    for src in _SOURCES:
        h.update((here / src).read_bytes())
    root = cache_root()
    owner = hashlib.sha256(f"{path.resolve()}|{dtype}".encode()).hexdigest()[:8]  # which file, which dtype
    return root / "weights" / f"{path.stem}-{owner}-{h.hexdigest()[:16]}.lwc"


def _prune(where: Path) -> None:
    """Delete the entries `where` replaces: the same file and dtype (the name up to the key), another key.
    Nothing loads them again (the file, the code, torch or the CPU changed), and each is the model's size.
    A process that still maps one keeps its pages (Linux frees them when the mapping goes)."""
    owner = where.name.rsplit("-", 1)[0]
    for old in where.parent.glob("*-*"):  # entries of any format (.pt: torch.save, before session 9)
        if old != where and old.name.rsplit("-", 1)[0] == owner and ".tmp" not in old.suffix:
            old.unlink(missing_ok=True)


_MAGIC, _ALIGN = b"LEANLMW1", 64


class _Saver(pickle.Pickler):
    """Pickles tensors as references to their storages' bytes, which it collects (each storage once)."""

    def __init__(self, f: io.BytesIO) -> None:
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.storages: dict[int, tuple[int, torch.UntypedStorage]] = {}  # data_ptr -> (offset, storage)
        self.size = 0

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is not torch.Tensor:  # Parameters pickle as themselves around their plain .data
            return None
        if obj.device.type != "cpu" or obj.requires_grad:
            raise ValueError("the weight cache holds CPU tensors without gradients")
        st = obj.untyped_storage()
        if st.data_ptr() not in self.storages:
            self.storages[st.data_ptr()] = (self.size, st)
            self.size += -(-st.nbytes() // _ALIGN) * _ALIGN
        off = self.storages[st.data_ptr()][0]
        return ("t", off, st.nbytes(), str(obj.dtype).removeprefix("torch."), tuple(obj.shape), obj.stride(),
                obj.storage_offset())


class _Loader(pickle.Unpickler):
    """Unpickles a saved entry, each tensor a view of `data` (the mapped bytes after the pickle)."""

    def __init__(self, f: io.BytesIO, data: torch.Tensor) -> None:
        super().__init__(f)
        self.data = data

    def persistent_load(self, pid: Any) -> torch.Tensor:
        _, off, nbytes, dtype, shape, stride, start = pid
        dt = getattr(torch, dtype)
        raw = (self.data[off:off + nbytes] if nbytes else torch.empty(0, dtype=torch.uint8)).view(dt)
        return raw.as_strided(shape, stride, raw.storage_offset() + start)  # offsets count from the mapping's start


def load(path: Path, dtype: torch.dtype, plan: KernelPlan) -> tuple[Transformer, Any] | None:
    """The saved (model, tokenizer), the model's buffers mapped from the file; None when there is none (or it
    cannot be read)."""
    if not plan.weight_cache:
        return None
    where = entry(path, dtype, plan)
    if not where.exists():
        return None
    try:
        with open(where, "rb") as f:
            magic, n = struct.unpack("<8sQ", f.read(16))
            if magic != _MAGIC:
                return None
            head = f.read(n)
            # a private (copy-on-write) mapping: writable for torch, shared with the page cache until written
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        start = -(-(16 + n) // _ALIGN) * _ALIGN
        data = torch.frombuffer(mm, dtype=torch.uint8)[start:]  # the tensors keep the mapping alive
        saved = _Loader(io.BytesIO(head), data).load()
    except Exception:  # a damaged entry (an interrupted write is never renamed into place): load the file again
        return None
    ok = isinstance(saved, dict) and isinstance(saved.get("model"), Transformer) and "tokenizer" in saved
    return (saved["model"], saved["tokenizer"]) if ok else None


def save(model: Transformer, tokenizer: Any, path: Path, dtype: torch.dtype, plan: KernelPlan) -> Path | None:
    """Save the loaded model and tokenizer (built under `plan`) for later loads; the entry's path, or None where
    it cannot be written."""
    if not plan.weight_cache:
        return None
    where = entry(path, dtype, plan)
    tmp = where.with_suffix(f".tmp{os.getpid()}")
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        saver = _Saver(buf)
        saver.dump({"model": model, "tokenizer": tokenizer})
        head = buf.getvalue()
        start = -(-(16 + len(head)) // _ALIGN) * _ALIGN
        with open(tmp, "wb") as f:
            f.write(struct.pack("<8sQ", _MAGIC, len(head)) + head + bytes(start - 16 - len(head)))
            for _, st in saver.storages.values():  # in offset order (dicts keep insertion order)
                raw = torch.empty(0, dtype=torch.uint8).set_(st, 0, (st.nbytes(),), (1,))
                f.write(memoryview(raw.numpy()))
                f.write(bytes(-(-st.nbytes() // _ALIGN) * _ALIGN - st.nbytes()))
        tmp.replace(where)
        _prune(where)
    except Exception:  # a read-only or full disk (or anything unpicklable) costs speed, not the load
        tmp.unlink(missing_ok=True)
        return None
    return where
