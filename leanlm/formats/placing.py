"""What both loaders share: name maps compiled from data, and placing a tensor into a state dict.

A name map is a dict from checkpoint names to ours, with `{i}` for a layer and `{e}` for an expert.
A target may name several tensors joined by `+` (a fused tensor split by rows, e.g. Phi-3's qkv),
or one expert of a stacked tensor as `name[{e}]` (Mixtral's per-expert HF tensors).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import mmap
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from leanlm.errors import LeanLMError

NameMapper = Callable[[str], "list[str] | None"]
_PAGE = mmap.PAGESIZE


def compile_names(names: dict[str, str]) -> NameMapper:
    pats = [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
                        + "$"), v) for k, v in names.items()]

    def mapper(name: str) -> list[str] | None:
        for pat, target in pats:
            m = pat.match(name)
            if m:
                return target.format(**m.groupdict()).split("+")
        return None

    return mapper


class _SkipInit(TorchFunctionMode):
    """Turns `torch.nn.init` calls into no-ops (the weights are assigned afterwards anyway)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Build modules on the meta device without running their initialisers.

    On meta tensors `normal_` (nn.Embedding's init) goes through torch._refs, which imports torch._dynamo and
    sympy: ~70 MiB of resident memory for weights that are replaced right away.
    """
    with torch.device("meta"), _SkipInit():
        yield


def release_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc only; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class HeapTrimmer:
    """Call after each converted tensor with the bytes it keeps: trims the heap when anonymous RSS grew more than
    those bytes plus `slack` since the last check that followed a trim.

    Conversions free large temporaries between the buffers they keep. In some runs glibc does not reuse the freed
    holes (where it placed things decides it) and the heap grows by 3-5x the kept bytes, all of it resident; in
    others it stays flat. Trimming after every tensor would re-fault every temporary's pages (load twice as slow).
    After a trim the next call only takes a new baseline, which includes the temporaries' pages faulted back in.
    """

    def __init__(self, slack: int = 16 << 20) -> None:
        self.slack = slack
        self.limit: int | None = None

    def __call__(self, kept: int = 0) -> None:
        now = _anon_rss()
        if self.limit is None:
            self.limit = now + self.slack
        elif now > self.limit + kept:
            release_memory()
            self.limit = None
        else:
            self.limit += kept


def _anon_rss() -> int:
    """Resident bytes not backed by a file (0 where /proc is missing, which disables HeapTrimmer)."""
    try:
        with open("/proc/self/statm") as f:
            resident, shared = f.read().split()[1:3]
    except OSError:
        return 0
    return (int(resident) - int(shared)) * _PAGE


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def place(t: torch.Tensor, targets: list[str], expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
          dtype: torch.dtype, device: str | torch.device) -> None:
    """Convert one checkpoint tensor and put it (or its row-split parts, or one expert) in `state`."""
    if len(targets) == 1 and targets[0].endswith("]"):  # one expert of a stacked tensor
        name, e = targets[0][:-1].split("[")
        if name not in state:
            state[name] = torch.empty(expected[name].shape, dtype=dtype, device=device)
        state[name][int(e)].copy_(t)
        return
    for n in targets:
        if n not in expected:
            raise LeanLMError(f"checkpoint tensor maps to '{n}', which this model does not have")
    sizes = [expected[n].shape[0] for n in targets]
    if sum(sizes) != t.shape[0]:
        raise LeanLMError(f"tensor for {targets[0]} has {t.shape[0]} rows, expected {sum(sizes)}")
    for n, part in zip(targets, torch.split(t, sizes, dim=0)):
        if tuple(part.shape) != tuple(expected[n].shape):
            raise LeanLMError(f"tensor {n} has shape {tuple(part.shape)}, expected {tuple(expected[n].shape)}")
        state[n] = part.to(device=device, dtype=dtype)  # no copy when dtype and device already match


def finish(model: torch.nn.Module, state: dict[str, torch.Tensor], tie: bool) -> None:
    """Check completeness, tie the head to the embeddings if asked, and assign the weights."""
    if tie and "output.weight" not in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise LeanLMError(f"checkpoint lacks tensors: {', '.join(sorted(missing)[:5])}")
    model.load_state_dict(state, assign=True, strict=True)
    if tie:
        model.output.weight = model.tok_embeddings.weight
