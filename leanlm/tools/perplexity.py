"""Perplexity of a text, computed the way llama.cpp's perplexity tool does (tools/perplexity).

The text is tokenized once (BOS first when the tokenizer adds one) and cut into n_tokens // ctx
non-overlapping windows of ctx tokens. When the tokenizer adds BOS, the first token of every window
is replaced by BOS. Each window is run from an empty cache, and only its second half is scored, so
every scored token has at least ctx // 2 tokens of context:

    window:   t_0 (BOS) t_1 ... t_{first} ... t_{ctx-1}          first = ctx // 2
    scored:   logits at positions first .. ctx-2 predict tokens first+1 .. ctx-1

That is ctx - 1 - ctx // 2 tokens per window. nll is the mean negative log-likelihood over all
scored tokens (log-softmax in fp32, sums in fp64) and perplexity = exp(nll). With a `reference`
model, the same windows also give the mean KL(reference || ours) per scored position and how often
both models' argmax agree (llama.cpp's --kl-divergence reports the same two quantities).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from leanlm.errors import LeanLMError
from leanlm.model.cache import ModelCache
from leanlm.model.transformer import Transformer

if TYPE_CHECKING:
    from leanlm.llm import LLM

ROW_BLOCK = 64  # scored rows per log-softmax, so temporaries stay (64, V) however large the vocab


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    n_tokens_scored: int
    n_chunks: int
    ctx: int
    per_chunk: list[float] = field(default_factory=list)  # running perplexity after each chunk
    kl_mean: float | None = None  # mean KL(reference || ours) per scored token, with a reference
    top1_agree: float | None = None  # fraction of scored positions where both argmax agree


@dataclass
class _Sums:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    count: int = 0


def _window_logits(model: Transformer, ids: torch.Tensor, lo: int, hi: int,
                   batch_chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Run one window ids (1, ctx) from an empty cache in sub-chunks; yield (start, logits (n, V)) for the
    rows in [lo, hi) only, sub-chunk by sub-chunk (the whole window's logits are never held at once)."""
    ctx = ids.shape[1]
    cache = ModelCache.for_model(model, 1, ctx, batch_chunk)
    for s in range(0, ctx, batch_chunk):
        e = min(s + batch_chunk, ctx)
        pos = torch.arange(s, e, device=ids.device)[None]  # (1, n)
        cache.kv_len = e
        a, b = max(s, lo), min(e, hi)
        if a >= b:  # nothing scored here: only the cache matters, skip most of the output head
            model(ids[:, s:e], pos, cache, last_only=True)
            continue
        logits = model(ids[:, s:e], pos, cache)  # (1, n, V) fp32
        yield a, logits[0, a - s:b - s]  # (b - a, V)


def _score_window(model: Transformer, ref: Transformer | None, ids: torch.Tensor, first: int,
                  batch_chunk: int, sums: _Sums) -> None:
    """Add the window's scored positions first..ctx-2 (predicting ids[first+1..ctx-1]) to sums."""
    ctx = ids.shape[1]
    ours = _window_logits(model, ids, first, ctx - 1, batch_chunk)
    theirs = _window_logits(ref, ids, first, ctx - 1, batch_chunk) if ref is not None else None
    for a, logits in ours:  # logits: (n, V), rows for positions a..a+n-1
        ref_logits = None
        if theirs is not None:
            a_ref, ref_logits = next(theirs)
            assert a_ref == a and ref_logits.shape[0] == logits.shape[0]
        for r in range(0, logits.shape[0], ROW_BLOCK):
            lp = F.log_softmax(logits[r:r + ROW_BLOCK].float(), dim=-1)  # (m, V)
            p0 = a + r
            target = ids[0, p0 + 1:p0 + 1 + lp.shape[0]]  # (m,) the next tokens
            sums.nll -= lp.gather(1, target[:, None]).double().sum().item()
            sums.count += lp.shape[0]
            if ref_logits is not None:
                lq = F.log_softmax(ref_logits[r:r + ROW_BLOCK].float(), dim=-1)  # (m, V) reference
                kl = (lq.exp() * (lq - lp)).sum(-1)  # (m,) KL(ref || ours) per position
                sums.kl += kl.double().sum().item()
                sums.agree += int((lq.argmax(-1) == lp.argmax(-1)).sum())


@torch.inference_mode()
def perplexity(llm: LLM, text: str, ctx: int = 512, *, reference: LLM | None = None, batch_chunk: int = 512,
               max_chunks: int | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of `text` over non-overlapping ctx-token windows, scoring each window's second half.

    max_chunks: score only the first N windows (llama.cpp's --chunks). batch_chunk: tokens per forward
    pass (bounds memory; sliding-window layers keep W + batch_chunk slots).
    """
    if ctx < 3:
        raise LeanLMError(f"ctx must be at least 3 to score anything (got {ctx})")
    if batch_chunk < 1:
        raise LeanLMError(f"batch_chunk must be at least 1 (got {batch_chunk})")
    model = llm.model
    ref_model = reference.model if reference is not None else None
    if ref_model is not None and ref_model.cfg.vocab_size != model.cfg.vocab_size:
        raise LeanLMError(f"the reference model's vocabulary ({ref_model.cfg.vocab_size} tokens) differs "
                          f"from this model's ({model.cfg.vocab_size}); KL needs the same tokenizer")
    tok = llm.tokenizer
    add_bos = bool(tok.add_bos and tok.bos_id is not None)
    tokens = tok.encode(text, add_bos=add_bos, special=False)
    n_chunks = len(tokens) // ctx
    if n_chunks == 0:
        raise LeanLMError(f"the text tokenizes to {len(tokens)} tokens, fewer than one window of ctx={ctx} "
                          f"tokens (llama.cpp's perplexity tool asks for at least 2*ctx = {2 * ctx}); "
                          "use a longer text or a smaller ctx")
    if max_chunks is not None:
        n_chunks = min(n_chunks, max(max_chunks, 1))
    device = model.device
    all_ids = torch.tensor(tokens[:n_chunks * ctx], device=device).view(n_chunks, ctx)  # (n_chunks, ctx)
    if add_bos:
        all_ids[:, 0] = tok.bos_id
    first = ctx // 2
    sums = _Sums()
    per_chunk: list[float] = []
    from tqdm import tqdm

    bar = tqdm(range(n_chunks), desc="perplexity", unit="chunk", file=sys.stderr, disable=not progress)
    for i in bar:
        _score_window(model, ref_model, all_ids[i:i + 1], first, batch_chunk, sums)
        per_chunk.append(math.exp(sums.nll / sums.count))
        bar.set_postfix(ppl=f"{per_chunk[-1]:.4f}")
    bar.close()
    nll = sums.nll / sums.count
    res = PerplexityResult(math.exp(nll), nll, sums.count, n_chunks, ctx, per_chunk)
    if ref_model is not None:
        res.kl_mean, res.top1_agree = sums.kl / sums.count, sums.agree / sums.count
    return res
