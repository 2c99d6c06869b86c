"""Token generation on the calling thread, batch 1: chunked prefill of the prompt, then one token per step.

`generate_ids` is the loop, with the sampler passed in (a function of logits (B, V) and history (B, N) ->
tokens (B,)); `generate_text` runs it for one `SeqState` (sequence.py), whose chain samples and whose
`commit` turns tokens into text and decides where the sequence ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from leanlm.model.cache import ModelCache
from leanlm.model.transformer import Transformer
from leanlm.runtime.sequence import SeqState, token_budget
from leanlm.runtime.steps.eager import DecodeStep, decode_step

Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GenStats:
    prompt_tokens: int = 0
    gen_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = ""

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        # the first generated token comes from the prefill's logits
        return max(self.gen_tokens - 1, 0) / self.decode_s if self.decode_s else 0.0


def prefill(model: Transformer, cache: ModelCache, ids: torch.Tensor, start: int, chunk: int) -> torch.Tensor:
    """Run ids (1, T) at positions start.. through the model in chunks; return last logits (1, V)."""
    T = ids.shape[1]
    logits = None
    for s in range(0, T, chunk):
        piece = ids[:, s:s + chunk]
        pos = torch.arange(start + s, start + s + piece.shape[1], device=ids.device)[None]
        cache.kv_len = max(cache.kv_len, start + s + piece.shape[1])
        logits = model(piece, pos, cache, last_only=True)
    assert logits is not None
    return logits[:, -1]


@torch.inference_mode()
def generate_ids(model: Transformer, prompt: Sequence[int], sampler: Sampler, max_tokens: int, *,  # noqa: PLR0913
                 stop_ids: frozenset[int] = frozenset(), context: int | None = None, chunk: int = 512,
                 stats: GenStats | None = None, step: DecodeStep = decode_step) -> Iterator[int]:
    """Yield generated token ids; stops at a stop id (which is yielded), max_tokens or the context end.

    step runs one decode step (compiled.py: the eager one by default, or a compiled one).
    """
    cfg = model.cfg
    n = len(prompt)
    max_tokens = token_budget(n, max_tokens, context or cfg.context_length)
    stats = stats if stats is not None else GenStats()
    stats.prompt_tokens = n
    if max_tokens <= 0:
        stats.finish_reason = "length"
        return
    device = model.device
    cache = ModelCache.for_model(model, 1, n + max_tokens, chunk)
    history = torch.empty(1, n + max_tokens, dtype=torch.long, device=device)  # prompt, then generated tokens
    history[0, :n] = torch.tensor(list(prompt), device=device)
    t0 = time.perf_counter()
    logits = prefill(model, cache, history[:, :n], 0, chunk)
    tok = sampler(logits, history[:, :n])
    stats.prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(max_tokens):
        tid = int(tok.item())
        stats.gen_tokens += 1
        stats.decode_s = time.perf_counter() - t1
        yield tid
        if tid in stop_ids:
            stats.finish_reason = "stop"
            return
        if i == max_tokens - 1:
            break
        pos = n + i
        history[0, pos] = tok[0]
        cache.kv_len = pos + 1
        logits = step(model, cache, tok.view(1, 1), torch.tensor([[pos]], device=device), pos + 1)
        tok = sampler(logits, history[:, :pos + 1])
    stats.finish_reason = "length"


def generate_text(model: Transformer, seq: SeqState, *, chunk: int = 512, stats: GenStats | None = None,
                  step: DecodeStep = decode_step) -> Iterator[str]:
    """Generate for seq, committing each token into it; yield the text pieces (seq.generated: the tokens)."""
    stats = stats if stats is not None else GenStats()
    for tid in generate_ids(model, seq.prompt, seq.pick, seq.max_tokens, stop_ids=seq.stop_ids, chunk=chunk,
                            stats=stats, step=step):
        piece = seq.commit(tid)
        if piece:
            yield piece
        if seq.finish_reason is not None:
            break
    if seq.finish_reason is None:  # nothing to generate (max_tokens 0)
        piece = seq.finish("length")
        if piece:
            yield piece
    stats.finish_reason = seq.finish_reason or "length"
