"""Exact-path parity: leanlm with dtype float32 against transformers loading the same GGUF.

transformers dequantizes every GGUF tensor to fp32, so with fp32 weights and math the two must
agree to float rounding: logits within 1e-3 at every prompt position, identical greedy tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import leanlm
from leanlm.model.cache import ModelCache
from leanlm.runtime.generate import generate_ids
from leanlm.runtime.sampling import SamplingParams, sample

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain why the sky is blue in two sentences.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish and German.",
]
LONG_TEXT = (
    "The history of computing is a story of ever smaller machines doing ever larger work. "
    "Early computers filled rooms, consumed enormous power, and were programmed by rewiring. "
    "Transistors replaced vacuum tubes; integrated circuits replaced discrete parts; and each "
    "step made machines cheaper, faster and more widely available to ordinary people. "
) * 12


def _pair(path: Path) -> tuple[leanlm.LLM, object]:
    llm = leanlm.load(path, dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return llm, hf


@pytest.fixture(scope="module")
def smol_pair(smol_path: Path):  # noqa: ANN201
    return _pair(smol_path)


@pytest.fixture(scope="module")
def gemma_pair(gemma_path: Path):  # noqa: ANN201
    return _pair(gemma_path)


def _greedy(llm: leanlm.LLM, ids: list[int], n: int) -> list[int]:
    greedy = SamplingParams(temperature=0)
    return list(generate_ids(llm.model, ids, lambda lg, h: sample(lg, greedy, h), n,
                             stop_ids=llm.tokenizer.eos_ids))


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0]


def _check_logits(llm: leanlm.LLM, hf, prompt: str) -> None:  # noqa: ANN001
    ids = llm.chat_prompt([{"role": "user", "content": prompt}])
    assert (llm.logits(ids) - _hf_logits(hf, ids)).abs().max().item() < 1e-3


def _check_greedy(llm: leanlm.LLM, hf, prompts: list[str]) -> None:  # noqa: ANN001
    for p in prompts:
        ids = llm.chat_prompt([{"role": "user", "content": p}])
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False,
                              eos_token_id=sorted(llm.tokenizer.eos_ids), pad_token_id=0)
        assert _greedy(llm, ids, 48) == out[0, len(ids):].tolist(), p


def test_smollm2_logits(smol_pair) -> None:  # noqa: ANN001
    _check_logits(*smol_pair, PROMPTS[0])


def test_smollm2_greedy_48_tokens_5_prompts(smol_pair) -> None:  # noqa: ANN001
    _check_greedy(*smol_pair, PROMPTS)


def test_gemma3_logits(gemma_pair) -> None:  # noqa: ANN001
    _check_logits(*gemma_pair, PROMPTS[0])


@torch.inference_mode()
def test_gemma3_sliding_window_past_512_tokens_chunked(gemma_pair) -> None:  # noqa: ANN001
    """A prompt longer than Gemma 3's 512-token window, prefilled in 128-token chunks through the
    rolling buffers (640 slots, so they wrap), gives transformers' logits at every position."""
    llm, hf = gemma_pair
    ids = llm.encode_prompt(LONG_TEXT)
    assert len(ids) > 700
    ref = _hf_logits(hf, ids)
    cache = ModelCache(llm.config, 1, len(ids), 128, torch.float32)
    got = []
    for s in range(0, len(ids), 128):
        piece = torch.tensor([ids[s:s + 128]])
        cache.kv_len = s + piece.shape[1]
        got.append(llm.model(piece, torch.arange(s, s + piece.shape[1])[None], cache)[0])
    assert cache.layers[0].size == 512 + 128
    assert (torch.cat(got) - ref).abs().max().item() < 1e-3


def test_gemma3_greedy_one_prompt(gemma_pair) -> None:  # noqa: ANN001
    _check_greedy(*gemma_pair, PROMPTS[:1])


@pytest.mark.slow
def test_gemma3_greedy_48_tokens_5_prompts(gemma_pair) -> None:  # noqa: ANN001
    _check_greedy(*gemma_pair, PROMPTS[1:])
