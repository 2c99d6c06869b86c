"""The Python API: `llm = leanlm.load(...)`, `llm.generate(prompt)`, `llm.chat(messages)`."""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .cache import ModelCache
from .compiled import MODES, DecodeStep, decode_step, get_step
from .errors import LeanLMError
from .generate import GenStats, generate_ids
from .hub import DEFAULT_MODEL, resolve_model
from .loaders import load_model
from .loaders.common import release_memory
from .model import Transformer
from .sampling import SamplingParams, sample
from .stops import StopStrings
from .tokenizer import StreamDecoder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: str = "cpu") -> tuple[torch.dtype, bool]:
    """(compute dtype, keep quantized weights). "auto" on CPU: bf16 activations with 4-bit GGUF weights kept
    quantized (PyTorch's int4 CPU kernel); float32 is the exact reference path (everything dequantized)."""
    if isinstance(dtype, torch.dtype):
        return dtype, False
    if dtype == "auto":
        return torch.bfloat16, str(device).startswith("cpu")
    if dtype not in DTYPES:
        raise LeanLMError(f"unknown dtype '{dtype}' (choose auto, {', '.join(DTYPES)})")
    return DTYPES[dtype], False


class LLM:
    """A loaded model with its tokenizer; generation methods stream text pieces."""

    def __init__(self, model: Transformer, tokenizer: Any, path: Path | None = None, prefill_chunk: int = 512,
                 compile: str = "auto") -> None:
        if prefill_chunk < 1:
            raise LeanLMError("prefill_chunk must be >= 1")
        if compile not in MODES:
            raise LeanLMError(f"unknown compile mode '{compile}' (choose {', '.join(MODES)})")
        self.compile = compile  # decode step: auto = compiled if already built, on = build if missing, off
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.prefill_chunk = prefill_chunk  # prompt tokens per forward; sliding layers keep W + this many slots
        self.config = model.cfg
        self.last_stats = GenStats()
        self._steps: dict[bool, DecodeStep] = {}

    def decode_step(self, batch: int = 1, mode: str | None = None) -> DecodeStep:
        """The decode step for this batch size: compiled (compiled.py) per `mode` (default self.compile)."""
        key = batch > 1
        if key not in self._steps or mode is not None:
            log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
            self._steps[key] = get_step(self.model, batch, mode or self.compile, log)
        return self._steps[key]

    def decode_kind(self) -> str:
        """'compiled' if a compiled decode step has been used, else 'eager'."""
        return "compiled" if any(st is not decode_step for st in self._steps.values()) else "eager"

    def _lazy_step(self, model: Transformer, cache: ModelCache, tokens: torch.Tensor, positions: torch.Tensor,
                   kv_len: int) -> torch.Tensor:
        """Loads the compiled step at the first decode step, after the first token is out."""
        return self.decode_step(tokens.shape[0])(model, cache, tokens, positions, kv_len)

    # --- prompts -------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids for a raw prompt: BOS as the file's metadata says, special tokens parsed."""
        tok = self.tokenizer
        ids = tok.encode(prompt, special=True)
        if tok.add_bos and tok.bos_id is not None and len(ids) > 1 and ids[0] == ids[1] == tok.bos_id:
            ids = ids[1:]  # the text already began with BOS: don't double it
        return ids

    def chat_prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        return self.encode_prompt(self.tokenizer.apply_chat_template(list(messages)))

    # --- generation ----------------------------------------------------------------------
    def generate_from_ids(self, ids: Sequence[int], params: SamplingParams) -> Iterator[str]:
        tok = self.tokenizer
        gen = torch.Generator(device=self.model.device)
        if params.seed is not None:
            gen.manual_seed(params.seed)
        else:
            gen.seed()
        sampler = functools.partial(_sample, params=params, generator=gen)
        stop_ids = frozenset() if params.ignore_eos else tok.eos_ids
        self.last_stats = stats = GenStats()
        detok, stops = StreamDecoder(tok), StopStrings(params.stop)
        for tid in generate_ids(self.model, ids, sampler, params.max_tokens, stop_ids=stop_ids,
                                chunk=self.prefill_chunk, stats=stats, step=self._lazy_step):
            if tid in stop_ids:
                stats.finish_reason = "stop"
                break
            out = stops.push(detok.push(tid))
            if out:
                yield out
            if stops.stopped:
                stats.finish_reason = "stop"
                return
        tail = stops.push(detok.flush())
        if not stops.stopped:
            tail += stops.flush()
        if tail:
            yield tail

    def generate(self, prompt: str, params: SamplingParams | None = None, **kw: Any) -> Iterator[str]:
        """Complete a raw prompt (no chat template). kw: any SamplingParams field."""
        params = replace(params or SamplingParams(), **kw)
        return self.generate_from_ids(self.encode_prompt(prompt), params)

    def chat(self, messages: Sequence[dict[str, Any]], params: SamplingParams | None = None,
             **kw: Any) -> Iterator[str]:
        """Answer the last message of a conversation (the chat template is applied)."""
        params = replace(params or SamplingParams(), **kw)
        return self.generate_from_ids(self.chat_prompt(messages), params)

    @torch.inference_mode()
    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """fp32 logits (T, V) of one forward pass over ids (no cache)."""
        t = torch.tensor([list(ids)], device=self.model.device)
        return self.model(t, torch.arange(t.shape[1], device=t.device)[None])[0]


def _sample(logits: torch.Tensor, history: torch.Tensor, *, params: SamplingParams,
            generator: torch.Generator) -> torch.Tensor:
    return sample(logits, params, history, generator)


def load(model: str | Path = DEFAULT_MODEL, *, dtype: str | torch.dtype = "auto", threads: int | None = None,
         device: str = "cpu", progress: bool = True, prefill_chunk: int = 512, compile: str = "auto") -> LLM:
    """Load a registry name (pulled on first use), a .gguf file or a checkpoint folder.

    compile: the decode step (compiled.py): "auto" uses a compiled one if it was built before, "on" builds
    it when missing (a minute or two, once per model layout), "off" stays eager.
    """
    if threads:
        torch.set_num_threads(threads)
    path = resolve_model(str(model), progress=progress)
    compute, quantized = resolve_dtype(dtype, device)
    m, tok = load_model(path, compute, device, quantized)
    if quantized:
        from .quant.fuse import fuse_projections

        fuse_projections(m)  # q/k/v and gate/up as one matmul each: fewer kernel calls per token
    release_memory()  # what the file's parsed header and the tokenizer's construction left in the heap
    return LLM(m, tok, path, prefill_chunk, compile)
