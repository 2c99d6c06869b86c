"""The engine's scheduler: which sequence is where and what runs next, with no tensors.

- admission: waiting sequences take free rows of the shared cache, oldest first;
- prefill: at most one chunk per iteration, of the oldest sequence still prefilling (so a long prompt delays
  the others by one chunk, not by its whole prefill);
- decode: one batched step over rows 0..hi-1, hi one past the highest busy row; what each row is fed (a
  decoding row its pending token and drafts, others a harmless input: engine.py's docstring), and whether
  sequences draft at all (speculation.py).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from leanlm.serve.speculation import RowSpeculation

if TYPE_CHECKING:
    from leanlm.serve.sequence import Sequence

Drafts = tuple[list[int], torch.Tensor | None]  # draft tokens and their proposal distributions (or None)


@dataclass
class Batch:
    """One decode step: each row's input block (None: not decoding) and first position, the decoding
    sequences, and the drafts by row."""

    blocks: list[list[int] | None]
    starts: list[int]
    live: list[Sequence]
    drafts: dict[int, Drafts]


class Scheduler:
    def __init__(self, max_batch: int, chunk: int, spec: RowSpeculation | None) -> None:
        self.max_batch, self.chunk, self.spec = max_batch, chunk, spec
        self.rows: list[Sequence | None] = [None] * max_batch
        self.waiting: deque[Sequence] = deque()
        self.lock = threading.Condition()  # guards `waiting` (submitted from other threads)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.rows)

    def admit(self, clear_row: Callable[[int], None]) -> None:
        """Give free rows to waiting sequences (cancelled ones are dropped), each row cleared first."""
        with self.lock:
            for r in range(self.max_batch):
                if self.rows[r] is None and self.waiting:
                    seq = self.waiting.popleft()
                    if seq.cancelled:
                        continue
                    seq.row, self.rows[r] = r, seq
                    clear_row(r)
                    if self.spec is not None:
                        self.spec.attach(seq)

    def release(self, seq: Sequence) -> None:
        if seq.row >= 0 and self.rows[seq.row] is seq:
            self.rows[seq.row] = None

    def prefill_chunk(self) -> tuple[Sequence, int, int] | None:
        """The sequence to prefill this iteration and its prompt range [start, end), if any prefills."""
        prefilling = [s for s in self.rows if s is not None and not s.decoding]
        if not prefilling:
            return None
        seq = min(prefilling, key=lambda s: s.arrived)
        return seq, seq.prefilled, min(len(seq.prompt), seq.prefilled + self.chunk)

    def batch(self) -> Batch | None:
        """This iteration's decode step, if any sequence decodes."""
        if not any(s is not None and s.decoding for s in self.rows):
            return None
        hi = max(r for r, s in enumerate(self.rows) if s is not None) + 1
        live = [s for s in self.rows[:hi] if s is not None and s.decoding]
        drafts = self.spec.drafts(live) if self.spec is not None else {}
        blocks: list[list[int] | None] = [None] * hi
        for seq in live:
            assert seq.next_token is not None
            blocks[seq.row] = [seq.next_token, *drafts.get(seq.row, ([], None))[0]]
        starts = [s.position if s is not None else 0 for s in self.rows[:hi]]  # idle rows: from 0
        return Batch(blocks, starts, live, drafts)
