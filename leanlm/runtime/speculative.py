"""Speculative decoding: a cheap proposer guesses k tokens, the target checks them in one forward pass.

Round by round (batch 1):
    committed: the prompt and every token generated so far; the last one, `pending`, is not yet in the
    target's cache.  The proposer drafts d1..dk.  The target runs [pending, d1..dk] at positions
    n..n+k in one forward and gives k + 1 rows of logits; row i is the target's distribution for the
    token after d_i (row 0: after pending).  Acceptance (below) keeps d1..dj and adds one token of the
    target's own, so every round yields between 1 and k + 1 tokens for one target forward.

Rejected drafts need no undo in the cache. Their keys sit in slots whose recorded position is beyond
every later query until the next round writes those positions again (the mask hides a key whose position
is greater than the query's). Rolling buffers (slot = position % S, S = W + C) are safe too while a round
writes at most C positions: example with W = 4, C = 2, S = 6, pending at position 9 and one draft:
the round writes positions 9, 10 into slots 3, 4, overwriting positions 3 and 4; the draft is rejected, so
the next round writes 10 (slot 4) again and its queries need positions >= 7: positions 3 and 4 were out of
every future window anyway. In general a rejected draft at n + j overwrote position n + j - S, and the
next queries (>= n + 1) need positions > n + 1 - W, which holds while j < C + 2.

Acceptance keeps the target's distribution exactly (Leviathan et al. 2023, Chen et al. 2023): with p the
target's (processed) distribution and q the proposer's, draft d is kept with probability min(1, p(d)/q(d));
at the first rejection the token is drawn from max(0, p - q), renormalised; if all k are kept, a bonus
token is drawn from the last row. A deterministic proposer (prompt lookup, greedy drafts) has q = one-hot.
Greedy decoding keeps a draft iff it is the target's argmax, so the output equals plain greedy decoding.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from leanlm.errors import LeanLMError
from leanlm.model.cache import ModelCache
from leanlm.model.transformer import Transformer
from leanlm.runtime.generate import GenStats, prefill
from leanlm.runtime.logits import Chain
from leanlm.runtime.sequence import SeqState
from leanlm.runtime.steps.eager import DecodeStep, verify_step


class Proposer(Protocol):
    def propose(self, tokens: Sequence[int], k: int, chain: Chain,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """Up to k draft tokens after `tokens` and their proposal distributions (k, V) under the sequence's
        chain, or None when the drafts are deterministic (q = one-hot)."""
        ...


@dataclass
class SpecStats:
    rounds: int = 0  # target forward passes that verified drafts
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per verifying forward (1 = no gain; at most k + 1)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


def accept(target: torch.Tensor, drafts: Sequence[int], q: torch.Tensor | None, chain: Chain,
           tokens: Sequence[int], generator: torch.Generator | None = None) -> tuple[int, int]:
    """How many drafts to keep and the token after them. target: logits (k + 1, V); tokens: every token before
    the first row's prediction; row i is processed by the chain as if drafts[:i] were text already."""
    if chain.params.greedy:
        for i, d in enumerate(drafts):
            best = int(chain.apply(target[i:i + 1], tokens, drafts[:i])[0].argmax())
            if best != d:
                return i, best
        return len(drafts), int(chain.apply(target[len(drafts):len(drafts) + 1], tokens, drafts)[0].argmax())
    for i, d in enumerate(drafts):
        p = chain.probs(target[i], tokens, drafts[:i])
        qd = float(q[i, d]) if q is not None else 1.0
        u = float(torch.rand((), generator=generator))
        if u * qd < float(p[d]):  # u < p/q without dividing by a zero q
            continue
        residual = (p - q[i]).clamp_min(0) if q is not None else p.clone()
        if q is None:
            residual[d] = 0
        if float(residual.sum()) <= 0:  # p == q: the draft was always right; cannot happen after a reject
            residual = p
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    p = chain.probs(target[len(drafts)], tokens, drafts)
    return len(drafts), int(torch.multinomial(p, 1, generator=generator))


@torch.inference_mode()
def speculative_text(model: Transformer, seq: SeqState, proposer: Proposer, k: int, *, chunk: int = 512,
                     stats: GenStats | None = None, spec: SpecStats | None = None,
                     verify: DecodeStep = verify_step) -> Iterator[str]:
    """Generate for seq as generate.generate_text does (committing each token, yielding text pieces), `k`
    drafts checked per target forward. verify: (model, cache, tokens (1, T), positions (1, T), kv_len) ->
    logits (1, T, V) (compiled.py)."""
    if not 1 <= k < chunk:
        raise LeanLMError(f"speculate must be in [1, {chunk - 1}] (the prefill chunk bounds a verified block)")
    if seq.constraint is not None:
        raise LeanLMError("structured output with speculative decoding is not supported yet")
    stats = stats if stats is not None else GenStats()
    spec = spec if spec is not None else SpecStats()
    n, max_tokens = len(seq.prompt), seq.max_tokens
    stats.prompt_tokens = n
    if max_tokens <= 0:
        piece = seq.finish("length")
        stats.finish_reason = "length"
        if piece:
            yield piece
        return
    device = model.device
    cache = ModelCache.for_model(model, 1, n + max_tokens + k, chunk)
    t0 = time.perf_counter()
    logits = prefill(model, cache, torch.tensor([seq.prompt], device=device), 0, chunk)
    first = accept(logits, [], None, seq.chain, seq.tokens, seq.generator)[1]
    stats.prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    new = [first]
    while True:
        for t in new:
            stats.gen_tokens += 1
            stats.decode_s = time.perf_counter() - t1
            piece = seq.commit(t)
            if piece:
                yield piece
            if seq.finish_reason is not None:
                stats.finish_reason = seq.finish_reason
                return
        budget = max_tokens - len(seq.generated)  # tokens still wanted; a round yields up to len(drafts) + 1
        drafts, q = proposer.propose(seq.tokens, min(k, budget - 1), seq.chain, seq.generator) \
            if budget > 1 else ([], None)
        pos = len(seq.tokens) - 1  # of the pending token
        block = torch.tensor([[seq.tokens[-1], *drafts]], device=device)
        positions = torch.arange(pos, pos + block.shape[1], device=device)[None]
        target = verify(model, cache, block, positions, pos + block.shape[1])[0]  # (T, V)
        kept, nxt = accept(target, drafts, q, seq.chain, seq.tokens, seq.generator)
        spec.rounds += 1
        spec.proposed += len(drafts)
        spec.accepted += kept
        new = drafts[:kept] + [nxt]
