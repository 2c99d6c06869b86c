"""One request's sequence in the serving engine: the shared per-sequence state (runtime/sequence.py) plus where it
sits in the batch (its row, how much of its prompt is cached, the token to feed next) and how its events leave
(`emit` gets `Output`s)."""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from leanlm.llm import LLM
from leanlm.runtime.sampling import SamplingParams
from leanlm.runtime.sequence import SeqState
from leanlm.runtime.speculative import Proposer
from leanlm.runtime.structured import Constraint


@dataclass
class Output:
    """One event of a sequence: a piece of text (with its token), or the end (finish_reason set)."""

    text: str = ""
    token: int | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprob: float | None = None  # of `token` under the model (when the request asked for logprobs)
    top_logprobs: list[tuple[int, float]] | None = None  # the `logprobs` most likely tokens and theirs


Emit = Callable[[Output], None]


class Sequence(SeqState):
    def __init__(self, prompt: Seq[int], params: SamplingParams, emit: Emit, llm: LLM, max_len: int, *,
                 logprobs: int | None = None, constraint: Constraint | None = None) -> None:
        super().__init__(prompt, params, max_len, tokenizer=llm.tokenizer, constraint=constraint,
                         logprobs=logprobs)
        self.emit = emit
        self.row = -1
        self.prefilled = 0  # prompt tokens already in the cache
        self.next_token: int | None = None  # sampled, not yet fed back
        self.proposer: Proposer | None = None  # speculative decoding's drafts for this sequence, if any
        self.cancelled = self.finished = False
        self.arrived = time.perf_counter()

    @property
    def decoding(self) -> bool:
        return self.next_token is not None

    @property
    def position(self) -> int:
        """Position of the token fed next (next_token while decoding, else the next prompt token)."""
        return len(self.prompt) + len(self.generated) - 1 if self.decoding else self.prefilled

    def cancel(self) -> None:
        """Stop this sequence at the next engine iteration (a client went away)."""
        self.cancelled = True
