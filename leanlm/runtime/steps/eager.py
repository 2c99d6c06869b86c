"""The step interface: what a step computes (`StepKind`), the `Step` every backend builds, and the eager backend.

A step is (model, cache, tokens (B, T), positions (B, T), kv_len) -> logits: (B, V) of the next token for a
decode step, (B, T, V) for a block (speculative decoding's check of T >= 2 tokens per row). Backends (the C++
decoder, cpp.py; the compiled graph, compiled.py; eager PyTorch, here) each say whether they serve a model and
kind (`supports`) and build a `Step` (`build`); `steps.select` tries them in that order. Generation imports
only this module: the torch.compile backend is loaded when a step is selected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from leanlm.kernels.plan import KernelPlan
from leanlm.model.cache import ModelCache
from leanlm.model.transformer import Transformer

# one step: (model, cache, tokens (B, T), positions (B, T), kv_len) -> logits, (B, V) or (B, T, V) for blocks
DecodeStep = Callable[[Transformer, ModelCache, torch.Tensor, torch.Tensor, int], torch.Tensor]
NAME = "eager"


@dataclass(frozen=True)
class StepKind:
    """batched: serves batches of >= 2 sequences (one graph for every batch size >= 2); block: T >= 2 tokens per
    sequence with logits for each (speculative decoding's verify step), else one token and its next logits."""

    batched: bool = False
    block: bool = False

    @classmethod
    def of(cls, batch: int, tokens: int = 1) -> StepKind:
        return cls(batch > 1, tokens > 1)

    @property
    def name(self) -> str:
        """The kind in file names and keys: "1", "n" (batched), "verify", "nverify"."""
        if self.block:
            return "nverify" if self.batched else "verify"
        return "n" if self.batched else "1"


@dataclass(frozen=True)
class Step:
    """A built step: call it as a DecodeStep. backend: "native" (cpp.py), "compiled" or "eager"."""

    backend: str
    kind: StepKind
    run: DecodeStep

    def __call__(self, model: Transformer, cache: ModelCache, tokens: torch.Tensor, positions: torch.Tensor,
                 kv_len: int) -> torch.Tensor:
        return self.run(model, cache, tokens, positions, kv_len)


def decode_step(model: Transformer, cache: ModelCache, tokens: torch.Tensor, positions: torch.Tensor,
                kv_len: int) -> torch.Tensor:
    """tokens, positions (B, 1) -> logits (B, V) of the next token (what every decode step computes)."""
    return model(tokens, positions, cache, kv_len=kv_len)[:, -1]


def verify_step(model: Transformer, cache: ModelCache, tokens: torch.Tensor, positions: torch.Tensor,
                kv_len: int) -> torch.Tensor:
    """tokens, positions (B, T >= 2) -> logits (B, T, V): a speculative round's check of T tokens per row."""
    return model(tokens, positions, cache, kv_len=kv_len)


def supports(model: Transformer, kind: StepKind, plan: KernelPlan) -> bool:
    return True  # the model's own forward serves every model and kind


def build(model: Transformer, kind: StepKind, mode: str = "auto",
          log: Callable[[str], None] | None = None) -> Step:
    return Step(NAME, kind, verify_step if kind.block else decode_step)
