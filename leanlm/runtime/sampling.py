"""Sampling: the parameters, and the pure functions of the logits-processor chain, in this order:

    OpenAI presence/frequency penalties (counts of the generated tokens)
    -> structured-output mask (the constraint's allowed tokens)
    -> repetition penalty (llama.cpp's rule over the last repeat_last_n tokens of prompt + text)
    -> temperature -> top-k -> top-p -> min-p -> draw (temperature 0: argmax of the penalised logits)

(`penalise` then `distribution` / `draw`). Plain sampling, speculative acceptance (speculative.py) and a draft
model's proposals (proposers.py) all go through them, via one sequence's `logits.Chain` where state is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from leanlm.errors import LeanLMError
from leanlm.kernels.plan import KernelPlan

if TYPE_CHECKING:
    from leanlm.runtime.structured import Constraint


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0.0 = off
    repeat_penalty: float = 1.0  # 1.0 = off; llama.cpp's rule over the last `repeat_last_n` tokens
    repeat_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    presence_penalty: float = 0.0  # OpenAI's: minus this from every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the token's count in the generated text
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 0, "max_tokens must be >= 0"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise LeanLMError(msg)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repeat_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """llama.cpp / CTRL rule: for each token seen, divide a positive logit, multiply a negative one."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(-1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, history, seen)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Set to -inf every logit outside top-k, outside the top-p nucleus, or below min_p * p_max.

    logits: (..., V) already divided by the temperature. The most likely token always survives.
    """
    neg = torch.finfo(logits.dtype).min
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, neg)
    if min_p > 0.0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), neg)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop_sorted = (cum - torch.softmax(sorted_logits, -1)) >= top_p  # mass before this token already >= p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, neg)
    return logits


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy choice per row (B, V) -> (B,), the first maximum on ties: our vectorised operator for fp32 logits
    on the CPU (kernels/rowops.cpp; torch.argmax spent 0.22 ms of a Gemma 3 decode step on 262144 logits)."""
    fits = logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
    if fits and KernelPlan.resolve().argmax:  # this process's plan: sampling holds no model
        return torch.ops.leanlm_native.argmax(logits)
    return logits.argmax(-1)


def penalise(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None = None,
             counts: torch.Tensor | None = None, constraint: Constraint | None = None) -> torch.Tensor:
    """fp32 logits (B, V) after the penalties and the constraint mask. history (B, N): prompt + text, whose last
    repeat_last_n tokens are penalised; counts (>= V,): how often each token was generated (None: none yet)."""
    logits = logits.float()
    if counts is not None and (params.presence_penalty or params.frequency_penalty):
        counts = counts[:logits.shape[-1]]
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    if constraint is not None:
        logits = constraint.apply(logits)
    if history is not None and params.repeat_penalty != 1.0 and params.repeat_last_n > 0:
        logits = apply_repeat_penalty(logits, history[..., -params.repeat_last_n:], params.repeat_penalty)
    return logits


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """What sampling draws from: penalised logits (..., V) -> temperature, top-k/p, min-p -> probabilities."""
    return torch.softmax(filter_logits(logits / params.temperature, params.top_k, params.top_p, params.min_p), -1)


def draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """A token per row of penalised logits (B, V) -> (B,). No host sync."""
    if params.greedy:
        return argmax(logits)
    return torch.multinomial(distribution(logits, params), 1, generator=generator).squeeze(-1)


def sample(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token for each row of logits (B, V) -> (B,); history (B, N): prompt + text. No host sync."""
    return draw(penalise(logits, params, history), params, generator)
