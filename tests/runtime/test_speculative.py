"""Speculative decoding: greedy output equals plain greedy output token for token (every proposer, full and
rolling caches, the ring wrapping while drafting), and speculative sampling keeps the target's distribution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.tiny_models import random_transformer

import leanlm
from leanlm.errors import LeanLMError
from leanlm.runtime.generate import generate_ids
from leanlm.runtime.logits import Chain
from leanlm.runtime.proposers import DraftModel, PromptLookup, early_exit
from leanlm.runtime.sampling import SamplingParams
from leanlm.runtime.sequence import SeqState
from leanlm.runtime.speculative import Proposer, SpecStats, accept, speculative_text

PROMPT = [1, 5, 9, 3, 5, 9, 3, 5, 9, 3, 7, 2]


def speculative_ids(model: torch.nn.Module, prompt: list[int], params: SamplingParams, proposer: Proposer, k: int,
                    **kw: object) -> list[int]:
    """The token ids speculative generation commits for a prompt (no tokenizer: no text, no stop ids)."""
    seq = SeqState(prompt, params, model.cfg.context_length)
    for _ in speculative_text(model, seq, proposer, k, **kw):
        pass
    return seq.generated


def greedy(logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


@pytest.fixture(scope="module")
def target() -> torch.nn.Module:
    # sliding layers with W = 4 and a 6-token chunk: rolling buffers of 10 slots, so 60 tokens wrap the ring
    # many times, also inside verified blocks of k + 1 = 5 tokens
    return random_transformer((4, None, 4), std=0.5)


@pytest.mark.parametrize("proposer", ["lookup", "same-model", "other-model", "early-exit"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_speculation_equals_plain_greedy(target: torch.nn.Module, proposer: str, k: int) -> None:
    want = list(generate_ids(target, PROMPT, greedy, 60, chunk=6))
    make = {"lookup": lambda: PromptLookup(),
            "same-model": lambda: DraftModel(target, 200, 6),  # every draft accepted
            "other-model": lambda: DraftModel(random_transformer((4,), std=0.5, hidden_dim=40), 200, 6),
            "early-exit": lambda: DraftModel(early_exit(target, 2), 200, 6)}
    spec = SpecStats()
    got = list(speculative_ids(target, PROMPT, SamplingParams(max_tokens=60, temperature=0), make[proposer](), k,
                               chunk=6, spec=spec))
    assert got == want
    assert spec.rounds < 60 if proposer == "same-model" else spec.rounds <= 59
    if proposer == "same-model":
        assert spec.acceptance == 1.0 and spec.tokens_per_forward > k


def test_prompt_lookup_drafts_what_followed_the_last_ngram() -> None:
    drafts, q = PromptLookup(max_ngram=2).propose([5, 6, 7, 8, 5, 6], 3, Chain(SamplingParams()), None)
    assert drafts == [7, 8, 5] and q is None
    assert PromptLookup().propose([1, 2, 3], 3, Chain(SamplingParams()), None)[0] == []


def test_speculative_sampling_keeps_the_target_distribution(target: torch.nn.Module) -> None:
    """The first token a round yields is distributed as the target's own next token, whatever the proposer
    (a sampled draft with its distribution q, or a fixed guess), within sampling noise."""
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = target(ids, torch.arange(len(PROMPT))[None])[0, -1:]  # (1, V)
        draft_logits = random_transformer((None,), std=0.5)(ids, torch.arange(len(PROMPT))[None])[0, -1]
    chain = Chain(params)
    p = chain.probs(logits[0], PROMPT)
    q = chain.probs(draft_logits, PROMPT)
    target_rows = torch.cat([logits, logits])  # row 1 (after an accepted draft) is not looked at here
    gen = torch.Generator().manual_seed(0)
    n = 20000
    for mode in ("sampled draft", "fixed guess"):
        counts = torch.zeros_like(p)
        for _ in range(n):
            if mode == "sampled draft":
                d = int(torch.multinomial(q, 1, generator=gen))
                kept, nxt = accept(target_rows, [d], q[None], chain, PROMPT, gen)
            else:
                d = int(p.argmax())
                kept, nxt = accept(target_rows, [d], None, chain, PROMPT, gen)
            counts[d if kept else nxt] += 1
        tv = 0.5 * float((counts / n - p).abs().sum())
        assert tv < 0.03, (mode, tv)  # ~0.01 expected from noise over 64 tokens; a wrong rule gives >> 0.03
    assert 0.5 * float((q - p).abs().sum()) > 0.2  # the draft really is a different distribution


def test_speculate_refuses_bad_settings(target: torch.nn.Module) -> None:
    with pytest.raises(LeanLMError, match="speculate"):
        list(speculative_ids(target, PROMPT, SamplingParams(temperature=0), PromptLookup(), 6, chunk=6))
    with pytest.raises(LeanLMError, match="early exit"):
        early_exit(target, 3)


@pytest.fixture(scope="module")
def smol(smol_path: Path) -> leanlm.LLM:
    return leanlm.load(smol_path, compile="off", progress=False)


@pytest.mark.parametrize("how", ["lookup", "early-exit", "low-precision draft"])
def test_real_model_greedy_speculation_is_exact(smol: leanlm.LLM, smol_path: Path, how: str) -> None:
    msgs = [{"role": "user", "content": "Repeat this sentence twice: the quick brown fox jumps over the lazy dog."}]
    if how == "low-precision draft":  # target in exact fp32; the same file, int4 / int8 in memory, drafts
        target = leanlm.load(smol_path, dtype="float32", compile="off", progress=False)
        draft = smol
    else:
        target, draft = smol, None
    want = "".join(target.chat(msgs, temperature=0, max_tokens=48))
    target.speculate(4, lookup=how == "lookup", early_exit=20 if how == "early-exit" else None, draft=draft)
    try:
        got = "".join(target.chat(msgs, temperature=0, max_tokens=48))
    finally:
        target.speculate()  # off again: the model is shared with other tests
    assert got == want
    assert target.last_spec is not None and target.last_spec.rounds < 48


@pytest.mark.slow
@pytest.mark.parametrize("how", ["lookup", "early-exit", "low-precision draft"])
def test_gemma_greedy_speculation_is_exact(gemma_path: Path, how: str) -> None:
    """Gemma 3: sliding-window layers (W 512) with rolling buffers of W + 16 slots (prefill chunk 16) that
    wrap during a 600-token answer."""
    quant = leanlm.load(gemma_path, compile="off", progress=False, prefill_chunk=16)
    target = leanlm.load(gemma_path, dtype="float32", compile="off", progress=False, prefill_chunk=16) \
        if how.startswith("low") else quant
    msgs = [{"role": "user", "content": "Write the numbers from 1 to 300 in words, separated by commas."}]
    want = "".join(target.chat(msgs, temperature=0, max_tokens=600, ignore_eos=True))
    target.speculate(4, lookup=how == "lookup", early_exit=9 if how == "early-exit" else None,
                     draft=quant if how.startswith("low") else None)
    got = "".join(target.chat(msgs, temperature=0, max_tokens=600, ignore_eos=True))
    assert got == want and target.last_stats.prompt_tokens + 600 > 512 + 16


def test_repetition_penalty_is_applied_row_by_row(target: torch.nn.Module) -> None:
    """Each verified row is penalised with the text up to it (drafts included), as plain decoding does."""
    from leanlm.runtime.sampling import sample

    params = SamplingParams(max_tokens=60, temperature=0, repeat_penalty=1.5, repeat_last_n=8)
    want = list(generate_ids(target, PROMPT, lambda lg, h: sample(lg, params, h), 60, chunk=6))
    assert want != list(generate_ids(target, PROMPT, greedy, 60, chunk=6))  # the penalty matters here
    got = list(speculative_ids(target, PROMPT, params, DraftModel(target, 200, 6), 4, chunk=6))
    assert got == want


def test_a_draft_with_another_vocabulary_is_refused() -> None:
    from types import SimpleNamespace

    from leanlm.runtime.proposers import check_vocab

    def tok(pieces: list[bytes]) -> SimpleNamespace:
        return SimpleNamespace(vocab_size=len(pieces), token_bytes=lambda i: pieces[i])

    a = tok([b"a", b"b", b"c"])
    check_vocab(a, tok([b"a", b"b", b"c"]), 3, 3)
    with pytest.raises(LeanLMError, match="token 1 differs"):
        check_vocab(a, tok([b"a", b"x", b"c"]), 3, 3)
    with pytest.raises(LeanLMError, match="vocabulary"):
        check_vocab(a, tok([b"a", b"b"]), 3, 2)
