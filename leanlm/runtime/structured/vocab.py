"""Token masks: which vocabulary entries keep the output inside the grammar.

The mask of a parser state is found by walking the vocabulary sorted by bytes, so tokens sharing a
prefix share the parser work on it, and a dead prefix skips every token that starts with it at once.
Example, sorted tokens ["a", "ab", "abc", "b"] in a state that allows "a" but not "ab": "a" is walked
(1 byte, allowed); "ab" reuses the state after "a" (their common prefix is 1 byte), feeds "b" and dies;
"abc" shares "ab" with the dead token, so it is skipped without work; "b" starts again from the root.

Inside a string with no pending escape, most tokens are plain text (no quote, backslash or control byte,
whole UTF-8 characters): they are allowed together, by a precomputed mask and their character counts,
and only the other tokens are walked. Masks are cached per state: states repeat (every free string,
every position between values), so after a few tokens most steps only look up a mask.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from leanlm.runtime.structured import parser
from leanlm.runtime.structured.parser import State
from leanlm.runtime.structured.schema import Node

SKIP_DEPTHS = 4  # precomputed skip tables for dead prefixes this short (longer runs are short)


class _Sorted:
    """Tokens sorted by their bytes, with each one's common prefix length with the one before."""

    def __init__(self, items: list[tuple[bytes, int]]) -> None:
        items.sort()
        self.toks = [t for t, _ in items]
        self.ids = [i for _, i in items]
        lcp = [0] * len(items)
        for k in range(1, len(items)):
            a, b = self.toks[k - 1], self.toks[k]
            n = min(len(a), len(b))
            j = 0
            while j < n and a[j] == b[j]:
                j += 1
            lcp[k] = j
        self.lcp = lcp
        arr = np.asarray(lcp + [0], dtype=np.int64)  # sentinel: the end
        ends = []
        for d in range(SKIP_DEPTHS):  # ends[d][k]: first index after k whose prefix differs within d + 1 bytes
            pos = np.flatnonzero(arr <= d)
            pos[-1] = len(items)
            ends.append(pos[np.searchsorted(pos, np.arange(len(items)) + 1)].tolist())
        self.ends = ends

    def walk(self, state: State, out: list[int]) -> None:
        """Append to out the ids of tokens whose bytes the state accepts."""
        toks, ids, lcp, ends = self.toks, self.ids, self.lcp, self.ends
        states = [state]
        k, n = 0, len(toks)
        while k < n:
            t = toks[k]
            d = min(lcp[k], len(states) - 1)
            del states[d + 1:]
            while d < len(t):
                s = parser.advance(states[d], t[d:d + 1])
                if not s:
                    break
                states.append(s)
                d += 1
            if d == len(t):
                out.append(ids[k])
                k += 1
            elif d < SKIP_DEPTHS:
                k = ends[d][k]
            else:
                k += 1
                while k < n and lcp[k] > d:
                    k += 1


class TokenIndex:
    """What the masks need to know about a vocabulary; built once per tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eos = sorted(i for i in tokenizer.eos_ids if i < vocab_size)
        n = min(vocab_size, tokenizer.vocab_size)
        self.bytes: list[bytes] = [b""] * vocab_size
        plain, other = [], []
        lengths = np.zeros(vocab_size, dtype=np.int64)
        for i in range(n):
            if tokenizer.is_special(i):
                continue
            t = tokenizer.token_bytes(i)
            if not t:
                continue
            self.bytes[i] = t
            text = _plain_text(t)
            if text is None:
                other.append((t, i))
            else:
                plain.append(i)
                lengths[i] = len(text)
        self.plain = torch.zeros(vocab_size, dtype=torch.bool)
        self.plain[plain] = True
        self.plain_len = torch.from_numpy(lengths)
        self.all = _Sorted(other + [(self.bytes[i], i) for i in plain])
        self.other = _Sorted(other)


def _plain_text(t: bytes) -> str | None:
    """The text of a token that can sit anywhere inside a JSON string unchanged, else None."""
    if b'"' in t or b"\\" in t or any(c < 0x20 for c in t):
        return None
    try:
        return t.decode("utf-8")
    except UnicodeDecodeError:
        return None


class Grammar:
    """A compiled grammar over one vocabulary, with its masks cached per parser state."""

    def __init__(self, node: Node, index: TokenIndex, max_cached: int | None = None) -> None:
        self.node, self.index = node, index
        self.initial = parser.initial(node)
        self.cache: OrderedDict[State, torch.Tensor] = OrderedDict()
        self.max_cached = max_cached or max(64, (64 << 20) // index.vocab_size)

    def mask(self, state: State) -> torch.Tensor:
        """(V,) bool: the tokens allowed in this state (end-of-sequence ids when the value is complete)."""
        hit = self.cache.get(state)
        if hit is not None:
            self.cache.move_to_end(state)
            return hit
        ix = self.index
        ids: list[int] = []
        strings = [s[-1] for s in state if s[-1][0] == "s" and s[-1][4] == 0 and s[-1][5] == 0]
        if strings and len(strings) == len(state):  # every parse is inside a string: plain tokens in bulk
            m = torch.zeros(ix.vocab_size, dtype=torch.bool)
            for _, _, hi, count, _, _ in strings:
                m |= ix.plain if hi is None else ix.plain & (ix.plain_len <= hi - count)
            ix.other.walk(state, ids)
        else:
            m = torch.zeros(ix.vocab_size, dtype=torch.bool)
            ix.all.walk(state, ids)
        m[ids] = True
        if parser.can_end(state):
            m[ix.eos] = True
        self.cache[state] = m
        if len(self.cache) > self.max_cached:
            self.cache.popitem(last=False)
        return m


class Constraint:
    """One sequence's place in a grammar: mask the logits, then advance by the chosen token."""

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        self.state = grammar.initial

    def mask(self) -> torch.Tensor:
        return self.grammar.mask(self.state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., V) with every token the grammar forbids at -inf."""
        m = self.mask().to(logits.device)
        return logits.float().masked_fill(~m[: logits.shape[-1]], float("-inf"))

    def advance(self, token: int) -> None:
        if token in self.grammar.index.eos:
            return
        state = parser.advance(self.state, self.grammar.index.bytes[token])
        if not state:
            raise ValueError(f"token {token} ({self.grammar.index.bytes[token]!r}) is not allowed here")
        self.state = state

    @property
    def done(self) -> bool:
        """The value is complete and nothing can follow it: the sequence may end without another step."""
        return parser.done(self.state)
