"""One sequence's logits-processor chain (the order and the pure functions are sampling.py's): its parameters, its
structured-output constraint, and the generated-token counts the OpenAI penalties read. Plain sampling, speculative
acceptance (speculative.py) and a draft model's proposals (proposers.py) all ask it, so a sampling setting means
the same on every path, drafts included: `extra` tokens (drafts not yet committed) count as text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from leanlm.runtime.sampling import SamplingParams, distribution, draw, penalise
from leanlm.runtime.structured import Constraint


class Chain:
    """One sequence's processors: its parameters, its constraint, and the generated-token counts that the
    OpenAI penalties read (kept up to date by `push`, so no pass over the text per token)."""

    def __init__(self, params: SamplingParams, constraint: Constraint | None = None) -> None:
        self.params, self.constraint = params, constraint
        self.counting = bool(params.presence_penalty or params.frequency_penalty)
        self.generated: list[int] = []  # only kept while counting
        self._counts: torch.Tensor | None = None

    def push(self, token: int) -> None:
        """A token was generated."""
        if not self.counting:
            return
        self.generated.append(token)
        if self._counts is not None:
            if token < self._counts.shape[0]:
                with torch.inference_mode():  # the counts may have been made inside it (the decode loops)
                    self._counts[token] += 1
            else:
                self._counts = None

    def counts(self, vocab: int, extra: Sequence[int] = ()) -> torch.Tensor | None:
        """Generated-token counts (>= vocab entries), with `extra` tokens (drafts) counted too."""
        if not self.counting or not (self.generated or extra):
            return None
        if self._counts is None or self._counts.shape[0] < vocab:
            size = max(vocab, max(self.generated, default=0) + 1)
            self._counts = torch.bincount(torch.tensor(self.generated, dtype=torch.long), minlength=size).float()
        counts = self._counts
        if extra:
            counts = counts.clone()
            for t in extra:
                if t < counts.shape[0]:
                    counts[t] += 1
        return counts

    def history(self, tokens: Sequence[int], extra: Sequence[int] = (), device: torch.device | str = "cpu") \
            -> torch.Tensor | None:
        """The tail of prompt + text (+ extra) that the repetition penalty reads, (1, N); None when it is off."""
        p = self.params
        n = p.repeat_last_n if p.repeat_penalty != 1.0 else 0
        if not n:
            return None
        tail = [*tokens[max(len(tokens) - n, 0):], *extra][-n:]
        return torch.tensor([tail], dtype=torch.long, device=device)

    def apply(self, logits: torch.Tensor, tokens: Sequence[int], extra: Sequence[int] = ()) -> torch.Tensor:
        """Penalised, masked fp32 logits (1, V) for the token after tokens + extra."""
        return penalise(logits, self.params, self.history(tokens, extra, logits.device),
                        self.counts(logits.shape[-1], extra), self.constraint)

    def probs(self, logits: torch.Tensor, tokens: Sequence[int], extra: Sequence[int] = ()) -> torch.Tensor:
        """The distribution (V,) sampling draws the token after tokens + extra from; logits (V,)."""
        return distribution(self.apply(logits[None], tokens, extra), self.params)[0]

    def pick(self, logits: torch.Tensor, tokens: Sequence[int], generator: torch.Generator | None) -> torch.Tensor:
        """The next token (1,) after tokens, from logits (1, V)."""
        return draw(self.apply(logits, tokens), self.params, generator)
