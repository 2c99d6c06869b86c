"""One generation's state, whoever drives it (`LLM.generate`, speculative generation, the serving engine):
prompt and tokens, the token budget (the one context check, `token_budget`), the seeded generator, the
logits-processor chain, stop ids, the streaming detokeniser with stop strings, the structured-output
constraint, logprobs and the finish reason. `pick` chooses a token from logits; `commit` takes a token and
gives the text it adds, ending the sequence where it ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from leanlm.errors import LeanLMError
from leanlm.formats.tokenizer import StreamDecoder
from leanlm.runtime.logits import Chain
from leanlm.runtime.sampling import SamplingParams
from leanlm.runtime.stops import StopStrings
from leanlm.runtime.structured import Constraint

TopLogprobs = list[tuple[int, float]]


def token_budget(n_prompt: int, max_tokens: int, context: int) -> int:
    """How many tokens may be generated after a prompt of n_prompt tokens; refuses prompts that cannot run."""
    if n_prompt == 0:
        raise LeanLMError("the prompt is empty")
    if n_prompt >= context:
        raise LeanLMError(f"the prompt is {n_prompt} tokens, which does not fit the context of {context} tokens")
    return min(max_tokens, context - n_prompt)


class SeqState:
    """tokenizer None: token ids only (no text, no stop ids unless given); logprobs: None, or how many top
    alternatives to report with each token's own logprob."""

    def __init__(self, prompt: Sequence[int], params: SamplingParams, context: int, *, tokenizer: Any = None,
                 stop_ids: frozenset[int] | None = None, constraint: Constraint | None = None,
                 logprobs: int | None = None, device: torch.device | str = "cpu") -> None:
        self.prompt, self.params, self.logprobs = list(prompt), params, logprobs
        self.max_tokens = token_budget(len(self.prompt), params.max_tokens, context)
        self.tokens = list(prompt)  # the prompt and every generated token (proposers, repetition penalty)
        self.generated: list[int] = []
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.constraint = constraint  # structured output: masks the logits, advanced by each token
        self.chain = Chain(params, constraint)
        if stop_ids is None:
            stop_ids = tokenizer.eos_ids if tokenizer is not None else frozenset()
        self.stop_ids: frozenset[int] = frozenset() if params.ignore_eos else stop_ids
        self.detok = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.stops = StopStrings(params.stop)
        self.finish_reason: str | None = None  # "stop", "length" or "abort" once it has ended
        self.last_logprobs: tuple[float | None, TopLogprobs | None] = (None, None)

    def pick(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """The next token (1,) from the model's logits (1, V), through this sequence's chain. history: what
        generate.generate_ids passes a sampler; unused, this state holds the text."""
        return self.chain.pick(logits, self.tokens, self.generator)

    def commit(self, tid: int, raw: torch.Tensor | None = None) -> str:
        """Append token tid (raw: the model's logits (1, V) it was drawn from, for logprobs); the text it adds,
        with the held-back tail once the sequence ends (`finish_reason` set)."""
        if self.logprobs is not None and raw is not None:  # under the model's own distribution
            logp = torch.log_softmax(raw[0].float(), -1)
            top = None
            if self.logprobs > 0:
                v, i = logp.topk(self.logprobs)
                top = list(zip(i.tolist(), v.tolist()))
            self.last_logprobs = (float(logp[tid]), top)
        self.generated.append(tid)
        self.tokens.append(tid)
        self.chain.push(tid)
        if tid in self.stop_ids:
            return self.finish("stop")
        if self.constraint is not None:
            self.constraint.advance(tid)
        text = self.stops.push(self.detok.push(tid)) if self.detok is not None else ""
        if self.stops.stopped:
            self.finish_reason = "stop"
            return text
        if self.constraint is not None and self.constraint.done:  # the JSON value is complete: no step for EOS
            return text + self.finish("stop")
        if len(self.generated) >= self.max_tokens:
            return text + self.finish("length")
        return text

    def finish(self, reason: str) -> str:
        """End the sequence; the text still held back (none for "abort")."""
        self.finish_reason = reason
        if reason == "abort" or self.detok is None:
            return ""
        tail = self.stops.push(self.detok.flush())
        return tail if self.stops.stopped else tail + self.stops.flush()
