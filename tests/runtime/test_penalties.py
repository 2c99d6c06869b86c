"""OpenAI presence/frequency penalties mean the same in `LLM.generate`, in speculative generation and in the
serving engine: one logits chain (sampling.py, logits.py) and one sequence state (sequence.py) for all."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import random_transformer

from leanlm.llm import LLM, Speculation
from leanlm.runtime.generate import generate_ids
from leanlm.runtime.sampling import SamplingParams
from leanlm.serve.engine import Engine, Output

PROMPT = [1, 5, 9, 3, 5, 9, 3, 5, 9, 3, 7, 2]


class NumberTokenizer:
    """Token i reads "<i>", so text gives the tokens back."""

    vocab_size = 64
    eos_ids = frozenset({7})

    def is_special(self, i: int) -> bool:
        return False

    def token_bytes(self, i: int) -> bytes:
        return f"<{i}>".encode()


def tokens(text: str) -> list[int]:
    return [int(t) for t in text.strip("<>").split("><")] if text else []


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(random_transformer((4, None), std=0.5), NumberTokenizer(), None, prefill_chunk=6, compile="off")


def reference(llm: LLM, sp: SamplingParams) -> list[int]:
    """Greedy decoding with OpenAI's rule written out: minus frequency x count, minus presence if seen, over the
    generated tokens only."""
    def sampler(logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(history[0, len(PROMPT):], minlength=logits.shape[-1]).float()
        return (logits - sp.frequency_penalty * counts - sp.presence_penalty * (counts > 0).float()).argmax(-1)

    return list(generate_ids(llm.model, PROMPT, sampler, sp.max_tokens, chunk=6))


def engine_tokens(llm: LLM, sp: SamplingParams, speculation: Speculation | None = None) -> list[int]:
    engine = Engine(llm, max_batch=2, max_len=100, chunk=6, speculation=speculation)
    out: list[int] = []
    ended: list[bool] = []

    def emit(o: Output) -> None:
        if o.token is not None and (o.finish_reason is None or len(out) < o.completion_tokens):
            out.append(o.token)
        if o.finish_reason is not None:
            ended.append(True)

    with torch.inference_mode():
        engine.submit(PROMPT, sp, emit)
        while not ended:
            engine.step()
    return out


@pytest.mark.parametrize("kind", ["presence", "frequency"])
def test_generate_honours_openai_penalties(llm: LLM, kind: str) -> None:
    plain = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, **{f"{kind}_penalty": 2.0})
    unpenalised = tokens("".join(llm.generate_from_ids(PROMPT, plain)))
    got = tokens("".join(llm.generate_from_ids(PROMPT, sp)))
    want = reference(llm, sp)
    assert got == want
    assert got != unpenalised  # the penalty matters here
    repeated = {t for t in unpenalised if unpenalised.count(t) > 1}
    assert repeated and max(got.count(t) for t in repeated) < max(unpenalised.count(t) for t in repeated)
    assert engine_tokens(llm, sp) == want  # the server's answer to the same request


@pytest.mark.parametrize("how", ["lookup", "draft"])
def test_speculative_generation_honours_openai_penalties(llm: LLM, how: str) -> None:
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.5)
    want = reference(llm, sp)
    spec = Speculation(4, llm if how == "draft" else None, how)
    llm.speculation = spec
    try:
        got = tokens("".join(llm.generate_from_ids(PROMPT, sp)))
    finally:
        llm.speculation = None
    assert got == want
    assert llm.last_spec is not None and llm.last_spec.proposed > 0
    assert engine_tokens(llm, sp, spec) == want


def test_seeded_sampling_with_penalties_matches_the_engine(llm: LLM) -> None:
    sp = SamplingParams(max_tokens=30, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3, ignore_eos=True,
                        presence_penalty=1.0, frequency_penalty=1.0)
    got = tokens("".join(llm.generate_from_ids(PROMPT, sp)))
    assert len(got) == 30 and got == engine_tokens(llm, sp)
    assert got != tokens("".join(llm.generate_from_ids(PROMPT, SamplingParams(
        max_tokens=30, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3, ignore_eos=True))))
