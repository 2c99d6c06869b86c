"""The engine's runner: token ids and positions in, logits out, over the rows of one shared KV cache.

It knows nothing of requests: the scheduler (scheduler.py) says which row prefills which prompt tokens and
what each row is fed in a decode step; the engine (engine.py) turns the logits into tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from leanlm.llm import LLM
from leanlm.model.cache import ModelCache


class Runner:
    def __init__(self, llm: LLM, max_batch: int, slots: int, chunk: int) -> None:
        """slots: positions per row (the context, plus room for a verified block's padding)."""
        self.llm, self.model = llm, llm.model
        self.cache = ModelCache.for_model(llm.model, max_batch, slots, chunk)

    def clear_row(self, row: int) -> None:
        """Forget what a row held (a sequence takes it)."""
        self.cache.clear_row(row)

    def prefill(self, row: int, ids: Sequence[int], start: int) -> torch.Tensor:
        """Run prompt tokens ids at positions start.. in one row; the last position's logits (1, V)."""
        device = self.model.device
        e = start + len(ids)
        tokens = torch.tensor([list(ids)], device=device)
        pos = torch.arange(start, e, device=device)[None]
        return self.model(tokens, pos, self.cache.rows(row, row + 1), last_only=True, kv_len=e)[:, -1]

    def step(self, blocks: Sequence[Sequence[int] | None], starts: Sequence[int]) -> torch.Tensor:
        """One batched forward over rows 0..len(blocks)-1: row r is fed blocks[r] (None: nothing, a harmless
        zero input) at consecutive positions from starts[r], every row padded to the longest block with zeros
        at the following positions (engine.py and speculation.py: why padding and idle rows do no harm).
        Logits (rows, T, V); a row's outputs past its block are junk."""
        hi = len(blocks)
        T = max((len(b) for b in blocks if b), default=1)
        tokens = torch.zeros(hi, T, dtype=torch.long)
        positions = torch.arange(T).repeat(hi, 1) + torch.tensor(list(starts))[:, None]
        for r, block in enumerate(blocks):
            if block:
                tokens[r, :len(block)] = torch.tensor(list(block))
        kv_len = int(positions.max()) + 1
        step = self.llm.decode_step(hi, tokens=T)
        logits = step(self.model, self.cache.rows(0, hi), tokens, positions, kv_len)
        return logits[:, None] if T == 1 else logits
