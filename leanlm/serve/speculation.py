"""Speculative decoding inside the continuous batch: drafts per sequence, one verify forward for all rows.

Each decoding sequence gets its own proposer (prompt lookup, or a draft model with a cache of its own) and
drafts up to k tokens. The engine then runs one forward over rows 0..hi-1 with T = 1 + the most drafts any
row has, every row fed T consecutive positions:

    row 0 decoding, 3 drafts:   tokens [p, d1, d2, d3]   positions [40, 41, 42, 43]
    row 1 decoding, 1 draft:    tokens [p, d1, 0, 0]     positions [17, 18, 19, 20]
    row 2 prefilling at 256:    tokens [0, 0, 0, 0]      positions [256, 257, 258, 259]
    row 3 idle:                 tokens [0, 0, 0, 0]      positions [0, 1, 2, 3]

Padding needs no undo, by the same argument as a rejected draft (speculative.py): a padded or rejected
entry holds a position beyond the row's last committed token, so every later query masks it until the row
writes that position again for real. Row 2's junk at 256..259 is overwritten by its next prefill chunk (or,
past the prompt's end, lies beyond every query like padding); row 3 is cleared when a sequence takes it.
In a rolling buffer of S = W + C slots, a block of T <= C + 1 positions only overwrites positions that every
later query of the row has left behind (the engine keeps k < C). Full-attention buffers get k extra slots
so that padding past the context's last position has somewhere to go.

Drafts and their acceptance go through the sequence's logits chain (runtime/logits.py), penalties included,
row by row as if the drafts before were text already. Sequences with a structured-output constraint take
part with no drafts (the grammar would have to run ahead over the drafts): one token per forward.
With more than `max_batch` sequences decoding, nobody drafts (vLLM's speculative_disable_by_batch_size):
a verify forward costs about its rows, so once the batch itself fills the kernels speculation stops paying
(bench/NOTES.md: on 2 CPU cores it gains with 1 sequence, breaks even at 2, loses at 4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from leanlm.llm import LLM, Speculation
from leanlm.runtime.speculative import SpecStats, accept

Commit = Callable[[object, int, torch.Tensor], bool]  # (sequence, token, its logits row (1, V)) -> goes on


class RowSpeculation:
    """The engine's speculative decoding: proposers per sequence, and acceptance totals for /metrics."""

    def __init__(self, llm: LLM, speculation: Speculation, max_batch: int | None = None) -> None:
        self.llm, self.speculation, self.k = llm, speculation, speculation.k
        self.max_batch = max_batch  # draft only while at most this many sequences decode (None: always)
        self.stats = SpecStats()  # summed over sequences: a round is one sequence's block in one forward

    def attach(self, seq) -> None:  # noqa: ANN001 (engine.Sequence: imported the other way round)
        """Give a sequence that just took a row its proposer, if its sampling allows drafts."""
        if seq.constraint is None:
            seq.proposer = self.speculation.proposer(self.llm, len(seq.prompt), seq.params)

    def drafts(self, live: list) -> dict[int, tuple[list[int], torch.Tensor | None]]:
        """Drafts per batch row for the decoding sequences `live` (none when the batch is too large)."""
        if self.max_batch is not None and len(live) > self.max_batch:
            return {}
        return {seq.row: self.propose(seq) for seq in live}

    def propose(self, seq) -> tuple[list[int], torch.Tensor | None]:  # noqa: ANN001
        """Drafts for a decoding sequence: never more than the tokens it may still generate after the next."""
        budget = seq.max_tokens - len(seq.generated)  # a round yields up to len(drafts) + 1 tokens
        if seq.proposer is None or budget <= 1:
            return [], None
        return seq.proposer.propose(seq.tokens, min(self.k, budget - 1), seq.chain, seq.generator)

    def settle(self, seq, target: torch.Tensor, drafts: list[int], q: torch.Tensor | None,  # noqa: ANN001
               commit: Commit) -> None:
        """Accept drafts against the target's rows (1 + len(drafts), V) and commit the tokens that result,
        one by one, until the sequence ends."""
        kept, nxt = accept(target, drafts, q, seq.chain, seq.tokens, seq.generator)
        self.stats.rounds += 1
        self.stats.proposed += len(drafts)
        self.stats.accepted += kept
        for i, tid in enumerate([*drafts[:kept], nxt]):
            if not commit(seq, tid, target[i:i + 1]):
                return
