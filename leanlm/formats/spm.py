"""SentencePiece tokenization of one word as llama.cpp does it (`llm_tokenizer_spm_session`).

Score-driven: repeatedly merge the adjacent pair that forms the highest-scoring vocabulary entry, leftmost on
ties; symbols no entry covers fall back to their ``<0xNN>`` byte tokens. Written here instead of a `tokenizers`
BPE because deriving the ~0.5M merges from the scores takes 2-3 s for Gemma's 262k vocabulary.
"""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Sequence


def spm_merge(word: str, vocab: dict[str, int], scores: array, byte_ids: Sequence[int | None]) -> list[int]:
    """The ids of `word` (spaces already ``▁``): best-score adjacent merge, leftmost first."""
    syms = list(word)
    n = len(syms)
    nxt = [*range(1, n), -1]
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        tid = vocab.get(syms[i] + syms[i + 1])
        if tid is not None:
            heap.append((-scores[tid], i, i + 1, 2))
    heapq.heapify(heap)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        a, b = syms[left], syms[right]
        if not a or not b or len(a) + len(b) != size:
            continue  # stale: one side changed since this pair was queued
        syms[left], syms[right] = a + b, ""
        nr = nxt[left] = nxt[right]
        if nr >= 0:
            prv[nr] = left
        for lft, rgt in ((prv[left], left), (left, nr)):
            if lft >= 0 and rgt >= 0:
                t = syms[lft] + syms[rgt]
                if (tid := vocab.get(t)) is not None:
                    heapq.heappush(heap, (-scores[tid], lft, rgt, len(t)))
    ids: list[int] = []
    for sym in filter(None, syms):  # merged-away symbols are empty; the rest are in text order
        if (tid := vocab.get(sym)) is not None:
            ids.append(tid)
        else:
            ids.extend(t for t in map(byte_ids.__getitem__, sym.encode()) if t is not None)
    return ids
