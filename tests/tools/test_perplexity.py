"""Perplexity as llama.cpp's perplexity tool computes it (fixture from scripts/record_llamacpp_perplexity.py).

Real models: our perplexity of tests/fixtures/ppl_text.txt (the GPL-3 text) must be within 1% of
llama.cpp's, over the same windows. Exact equality is not expected: llama.cpp quantizes activations to
8 bits in its quantized matmuls (see test_llamacpp_parity.py), ours is fp32 on the dequantized weights.
The fast tests use the first few windows (the fixture keeps llama.cpp's running perplexity after each
window); the slow ones use the whole text. Gemma 3 at ctx 1024 runs its 512-token sliding-window layers
past the window in every scored position.

Tiny random model: the scoring rule (which positions, BOS substitution, sub-chunked cached windows) and
the KL / top-1 numbers are checked against a direct computation with one cache-free forward per window.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import FIXTURES

from leanlm.errors import LeanLMError
from leanlm.llm import LLM, load
from leanlm.model.config import ModelConfig
from leanlm.model.transformer import Transformer
from leanlm.tools.perplexity import perplexity

TEXT = (FIXTURES / "ppl_text.txt").read_text(encoding="utf-8")
TOLERANCE = 0.01


# --- real models against llama.cpp ---------------------------------------------------------------------
def _recorded(name: str, ctx: int) -> dict[str, Any]:
    data = json.loads((FIXTURES / "llamacpp_perplexity.json").read_text(encoding="utf-8"))
    assert data["text"] == "ppl_text.txt"
    return next(r for r in data["runs"] if r["name"] == name and r["ctx"] == ctx)


def _check_against_llamacpp(path: Path, name: str, ctx: int, chunks: int | None, dtype: str = "float32") -> None:
    rec = _recorded(name, ctx)
    if path.stat().st_size != rec["model_size"]:
        pytest.skip(f"{path} is not the file the fixture was recorded from ({rec['model']})")
    llm = load(path, dtype=dtype, progress=False)
    res = perplexity(llm, TEXT, ctx, max_chunks=chunks, progress=False)
    n = chunks or rec["n_chunks"]
    assert res.n_chunks == n
    assert res.n_tokens_scored == n * (ctx - 1 - ctx // 2)
    want = rec["per_chunk"][n - 1]  # llama.cpp's running perplexity after n windows
    assert abs(res.perplexity / want - 1) < TOLERANCE, f"ours {res.perplexity:.4f} vs llama.cpp {want:.4f}"
    # window by window: the exact path against llama.cpp; a fast path (int8 activations, as llama.cpp's own)
    # against our exact one, the reference the issue sets, since llama.cpp's first Gemma window is itself
    # 0.8% from exact math and a fast path closer to exact can sit 1% from llama.cpp's there
    ref = rec["per_chunk"] if dtype == "float32" else \
        perplexity(load(path, dtype="float32", progress=False), TEXT, ctx, max_chunks=chunks, progress=False).per_chunk
    for ours, theirs in zip(res.per_chunk, ref):
        assert abs(ours / theirs - 1) < TOLERANCE


# "auto" is the fast path (bf16 activations, 4-bit weights kept quantized): it must stay within 1% too
@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_smollm2_ctx512_first_chunks_match_llamacpp(smol_path: Path, dtype: str) -> None:
    _check_against_llamacpp(smol_path, "smollm2", 512, chunks=4, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_gemma3_ctx1024_first_chunks_match_llamacpp(gemma_path: Path, dtype: str) -> None:
    _check_against_llamacpp(gemma_path, "gemma3", 1024, chunks=2, dtype=dtype)


@pytest.mark.slow
@pytest.mark.real_model  # the path fixture is asked for by name, out of conftest's sight
@pytest.mark.parametrize("name, ctx", [("smollm2", 512), ("smollm2", 1024), ("gemma3", 1024)])
def test_whole_text_matches_llamacpp(name: str, ctx: int, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue("smol_path" if name == "smollm2" else "gemma_path")
    _check_against_llamacpp(path, name, ctx, chunks=None)


# --- tiny random model: the scoring rule ---------------------------------------------------------------
class CharTokenizer:
    """One id per character (mod the vocab), with an optional BOS."""

    def __init__(self, vocab: int, add_bos: bool) -> None:
        self.vocab, self.add_bos, self.bos_id = vocab, add_bos, vocab - 1

    def encode(self, text: str, *, add_bos: bool | None = None, special: bool = False) -> list[int]:
        bos = [self.bos_id] if (self.add_bos if add_bos is None else add_bos) else []
        return bos + [ord(c) % (self.vocab - 1) for c in text]


def tiny_llm(seed: int = 0, add_bos: bool = False) -> LLM:
    cfg = ModelConfig(arch="test", vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                      hidden_dim=48, layer_windows=(4, None, 4))
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return LLM(m, CharTokenizer(cfg.vocab_size, add_bos))


def direct(llm: LLM, text: str, ctx: int, ref: LLM | None = None) -> tuple[float, int, float, float]:
    """(mean nll, scored count, mean KL(ref || llm), top-1 agreement) from one full forward per window."""
    tok = llm.tokenizer
    ids = tok.encode(text)
    nll = kl = agree = 0.0
    count = 0
    with torch.no_grad():
        for c in range(len(ids) // ctx):
            w = ids[c * ctx:(c + 1) * ctx]
            if tok.add_bos:
                w[0] = tok.bos_id
            t = torch.tensor([w])
            lp = F.log_softmax(llm.model(t, torch.arange(ctx)[None])[0], -1)  # (ctx, V)
            for p in range(ctx // 2, ctx - 1):  # logits at p predict token p + 1
                nll -= lp[p, w[p + 1]].item()
                count += 1
            if ref is not None:
                lq = F.log_softmax(ref.model(t, torch.arange(ctx)[None])[0], -1)[ctx // 2:ctx - 1]
                mine = lp[ctx // 2:ctx - 1]
                kl += (lq.exp() * (lq - mine)).sum().item()
                agree += (lq.argmax(-1) == mine.argmax(-1)).sum().item()
    return nll / count, count, kl / count, agree / count


LOREM = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 4


@pytest.mark.parametrize("ctx, batch_chunk, add_bos", [(16, 5, False), (16, 16, True), (15, 4, True),
                                                       (16, 64, False), (3, 2, False)])
def test_scoring_rule_matches_direct_computation(ctx: int, batch_chunk: int, add_bos: bool) -> None:
    llm = tiny_llm(add_bos=add_bos)
    res = perplexity(llm, LOREM, ctx, batch_chunk=batch_chunk, progress=False)
    n_tokens = len(llm.tokenizer.encode(LOREM))
    assert res.n_chunks == n_tokens // ctx and res.ctx == ctx
    assert res.n_tokens_scored == res.n_chunks * (ctx - 1 - ctx // 2)
    nll, count, _, _ = direct(llm, LOREM, ctx)
    assert count == res.n_tokens_scored
    assert res.nll == pytest.approx(nll, abs=1e-4)
    assert res.perplexity == pytest.approx(math.exp(nll), rel=1e-4)
    assert len(res.per_chunk) == res.n_chunks and res.per_chunk[-1] == pytest.approx(res.perplexity)
    assert res.kl_mean is None and res.top1_agree is None


def test_max_chunks_scores_the_first_windows_only() -> None:
    llm = tiny_llm()
    full = perplexity(llm, LOREM, 16, progress=False)
    part = perplexity(llm, LOREM, 16, max_chunks=3, progress=False)
    assert part.n_chunks == 3 and part.n_tokens_scored == 3 * 7
    assert part.per_chunk == pytest.approx(full.per_chunk[:3])


def test_reference_against_itself_gives_zero_kl_and_full_agreement() -> None:
    llm = tiny_llm()
    res = perplexity(llm, LOREM, 16, reference=llm, batch_chunk=6, progress=False)
    assert res.kl_mean == pytest.approx(0.0, abs=1e-6)
    assert res.top1_agree == 1.0


def test_reference_kl_and_agreement_match_direct_computation() -> None:
    llm, ref = tiny_llm(seed=0), tiny_llm(seed=1)
    res = perplexity(llm, LOREM, 16, reference=ref, batch_chunk=6, progress=False)
    nll, _, kl, agree = direct(llm, LOREM, 16, ref)
    assert res.nll == pytest.approx(nll, abs=1e-4)
    assert res.kl_mean == pytest.approx(kl, abs=1e-4) and res.kl_mean > 0.01
    assert res.top1_agree == pytest.approx(agree) and res.top1_agree < 1.0


def test_short_text_and_bad_ctx_raise() -> None:
    llm = tiny_llm()
    with pytest.raises(LeanLMError, match="fewer than one window"):
        perplexity(llm, "too short", 16, progress=False)
    with pytest.raises(LeanLMError, match="at least 3"):
        perplexity(llm, LOREM, 2, progress=False)
