"""The Python API: `llm = leanlm.load(...)`, `llm.generate(prompt)`, `llm.chat(messages)`."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from leanlm.errors import LeanLMError
from leanlm.formats import load_model, weight_cache
from leanlm.formats.catalog import DEFAULT_MODEL
from leanlm.formats.hub import resolve_model
from leanlm.formats.placing import release_memory
from leanlm.kernels.plan import KernelPlan
from leanlm.model.cache import ModelCache
from leanlm.model.transformer import Transformer
from leanlm.runtime.generate import GenStats, generate_text
from leanlm.runtime.proposers import DraftModel, PromptLookup, check_vocab
from leanlm.runtime.proposers import early_exit as make_early_exit
from leanlm.runtime.sampling import SamplingParams
from leanlm.runtime.sequence import SeqState
from leanlm.runtime.speculative import Proposer, SpecStats, speculative_text
from leanlm.runtime.steps import MODES, select
from leanlm.runtime.steps.eager import Step, StepKind
from leanlm.runtime.structured import Constraint, Grammars

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
        self._steps: dict[StepKind, Step] = {}
        self._grammars: Grammars | None = None
        self.speculation: Speculation | None = None  # set by `speculate`
        self.last_spec: SpecStats | None = None

    def decode_step(self, batch: int = 1, mode: str | None = None, tokens: int = 1) -> Step:
        """The decode step for this batch size (or with tokens > 1, speculative decoding's verify step) from the
        first backend that serves the model (runtime/steps: the C++ decoder, compiled per `mode`, default
        self.compile, then eager); mode "off" keeps the eager step."""
        kind = StepKind.of(batch, tokens)
        if kind not in self._steps or mode is not None:
            log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
            self._steps[kind] = select(self.model, kind, mode or self.compile, log)
        return self._steps[kind]

    def decode_kind(self) -> str:
        """'native' or 'compiled' if such a decode step has been used, else 'eager'."""
        used = {st.backend for st in self._steps.values()}
        return next((b for b in ("native", "compiled") if b in used), "eager")

    def _lazy_step(self, model: Transformer, cache: ModelCache, tokens: torch.Tensor, positions: torch.Tensor,
                   kv_len: int) -> torch.Tensor:
        """Loads the compiled step at the first decode step, after the first token is out."""
        return self.decode_step(tokens.shape[0])(model, cache, tokens, positions, kv_len)

    def _lazy_verify(self, model: Transformer, cache: ModelCache, tokens: torch.Tensor, positions: torch.Tensor,
                     kv_len: int) -> torch.Tensor:
        """Speculative decoding's check of a block of tokens (1, T): logits (1, T, V), compiled when available."""
        if tokens.shape[1] == 1:  # nothing drafted: the plain decode step
            return self._lazy_step(model, cache, tokens, positions, kv_len)[:, None]
        return self.decode_step(1, tokens=2)(model, cache, tokens, positions, kv_len)

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
    @property
    def grammars(self) -> Grammars:
        """Structured-output grammars over this model's vocabulary (built on first use)."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.config.vocab_size)
        return self._grammars

    def constraint(self, json_schema: dict[str, Any] | bool | None) -> Constraint | None:
        """None for free text; True: any JSON object; a dict: a JSON Schema (SchemaError if unenforceable)."""
        if json_schema is None or json_schema is False:
            return None
        return self.grammars.constraint(None if json_schema is True else json_schema)

    def generate_from_ids(self, ids: Sequence[int], params: SamplingParams,
                          json_schema: dict[str, Any] | bool | None = None) -> Iterator[str]:
        """Stream the text generated after ids; json_schema constrains it to JSON (see `constraint`)."""
        if self.speculation is not None and json_schema not in (None, False):
            raise LeanLMError("structured output with speculative decoding is not supported yet")
        seq = SeqState(ids, params, self.config.context_length, tokenizer=self.tokenizer,
                       constraint=self.constraint(json_schema), device=self.model.device)
        self.last_stats = stats = GenStats()
        if self.speculation is None:
            yield from generate_text(self.model, seq, chunk=self.prefill_chunk, stats=stats, step=self._lazy_step)
            return
        self.last_spec = SpecStats()
        proposer = self.speculation.proposer(self, len(ids), params)
        yield from speculative_text(self.model, seq, proposer, self.speculation.k, chunk=self.prefill_chunk,
                                    stats=stats, spec=self.last_spec, verify=self._lazy_verify)

    def speculate(self, k: int = 4, *, draft: LLM | None = None, lookup: bool = False,
                  early_exit: int | None = None) -> None:
        """Generate with speculative decoding from now on (k drafts per target forward), proposed by a draft
        model sharing this one's vocabulary, by prompt lookup, or by this model's own first `early_exit`
        layers; with none of them, switch it off. Greedy output is unchanged; sampled output keeps its
        distribution."""
        chosen = [x for x in (draft is not None, lookup, early_exit is not None) if x]
        if len(chosen) > 1:
            raise LeanLMError("choose one proposer: a draft model, prompt lookup or early exit")
        if not chosen:
            self.speculation = None
            return
        if draft is not None:
            check_vocab(self.tokenizer, draft.tokenizer, self.config.vocab_size, draft.config.vocab_size)
        if early_exit is not None:
            early = LLM(make_early_exit(self.model, early_exit), self.tokenizer, None, self.prefill_chunk,
                        self.compile)
            draft = early
        if not 1 <= k < self.prefill_chunk:
            raise LeanLMError(f"speculate must be in [1, {self.prefill_chunk - 1}]")
        kind = "lookup" if lookup else "draft" if early_exit is None else "early-exit"
        self.speculation = Speculation(k, draft, kind)

    def generate(self, prompt: str, params: SamplingParams | None = None, *,
                 json_schema: dict[str, Any] | bool | None = None, **kw: Any) -> Iterator[str]:
        """Complete a raw prompt (no chat template). kw: any SamplingParams field."""
        params = replace(params or SamplingParams(), **kw)
        return self.generate_from_ids(self.encode_prompt(prompt), params, json_schema)

    def chat(self, messages: Sequence[dict[str, Any]], params: SamplingParams | None = None, *,
             json_schema: dict[str, Any] | bool | None = None, **kw: Any) -> Iterator[str]:
        """Answer the last message of a conversation (the chat template is applied)."""
        params = replace(params or SamplingParams(), **kw)
        return self.generate_from_ids(self.chat_prompt(messages), params, json_schema)

    @torch.inference_mode()
    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """fp32 logits (T, V) of one forward pass over ids (no cache)."""
        t = torch.tensor([list(ids)], device=self.model.device)
        return self.model(t, torch.arange(t.shape[1], device=t.device)[None])[0]


class Speculation:
    """How an LLM speculates: k drafts per round, from a draft LLM or (draft None) by prompt lookup."""

    def __init__(self, k: int, draft: LLM | None, kind: str) -> None:
        self.k, self.draft, self.kind = k, draft, kind  # kind: "lookup", "draft" or "early-exit"

    def proposer(self, target: LLM, n_prompt: int, params: SamplingParams) -> Proposer:
        if self.draft is None:
            return PromptLookup()
        d = self.draft
        max_len = min(n_prompt + params.max_tokens + self.k + 1, d.config.context_length)
        return DraftModel(d.model, max_len, d.prefill_chunk, d._lazy_step, target.config.vocab_size)


def load(model: str | Path = DEFAULT_MODEL, *, dtype: str | torch.dtype = "auto", threads: int | None = None,
         device: str = "cpu", progress: bool = True, prefill_chunk: int = 512, compile: str = "auto",
         kv_cache: str = "auto") -> LLM:
    """Load a registry name (pulled on first use), a .gguf file or a checkpoint folder.

    compile: the decode step (compiled.py): "auto" uses a compiled one if it was built before, "on" builds
    it when missing (a minute or two, once per model layout), "off" stays eager.
    kv_cache: "auto" keeps K/V in the compute dtype, "int8" in 8 bits with a scale per row (kv_int8.py: half
    the memory, faster batched decode; its cost in perplexity is in bench/NOTES.md).
    """
    if kv_cache not in ("auto", "int8"):
        raise LeanLMError(f"unknown K/V cache type {kv_cache!r}: auto or int8")
    if threads:
        torch.set_num_threads(threads)
    path = resolve_model(str(model), progress=progress)
    compute, quantized = resolve_dtype(dtype, device)
    plan = KernelPlan.resolve(device)  # the kernels this model runs on, from here on (kernels/plan.py)
    cached = quantized and device == "cpu" and path.suffix.lower() == ".gguf"  # repacked once, mapped after
    saved = weight_cache.load(path, compute, plan) if cached else None
    if saved is not None:
        m, tok = saved
    else:
        m, tok = load_model(path, compute, device, quantized)
        if quantized:
            from leanlm.quant.fuse import fuse_projections

            fuse_projections(m)  # q/k/v and gate/up as one matmul each: fewer kernel calls per token
        if cached and weight_cache.save(m, tok, path, compute, plan) is not None:
            m, tok = weight_cache.load(path, compute, plan) or (m, tok)  # the mapped copy; the heap's is freed below
    release_memory()  # what the file's parsed header and the tokenizer's construction left in the heap
    m.apply_plan(plan)  # modules built by the loader (or saved) take their routes from the plan
    if kv_cache == "int8" and not plan.int8_kv_for(m.cfg, m.dtype, m.device):
        raise LeanLMError("--kv-cache int8 needs a CPU with AVX-512 VNNI and BF16, bfloat16 compute, head dim "
                          "64, 128 or 256 and no attention softcap")
    m.kv_cache = kv_cache
    return LLM(m, tok, path, prefill_chunk, compile)
