"""The compiled decode step (compiled.py) computes what the eager step computes, for any cache size.

One artifact is compiled per layout and reused for caches of other sizes, rolling buffers that wrap,
other kv_len and (batched) other batch sizes: each of those is checked against the eager step here.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FIXTURES
from helpers.tiny_models import random_transformer

from leanlm.errors import LeanLMError
from leanlm.model.cache import ModelCache
from leanlm.model.transformer import Transformer
from leanlm.runtime.steps import compiled, eager, select
from leanlm.runtime.steps.eager import StepKind

ONE, BATCHED = StepKind.of(1), StepKind.of(2)


def tiny(**kw) -> Transformer:
    return random_transformer((4, None, 4), vocab_size=96, head_dim=16, qk_norm=True, rope_local_base=100.0, **kw)


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One model, its compiled steps for batch 1 and batch >= 2, in a private artifact folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LEANLM_HOME", str(tmp_path_factory.mktemp("leanlm-cache")))
    m = tiny()
    out = {"model": m, 1: compiled.build(m, ONE, "on"), 2: compiled.build(m, BATCHED, "on")}
    yield out
    mp.undo()


def decode(m: Transformer, step: eager.DecodeStep, ids: torch.Tensor, prompt: int, max_len: int,
           chunk: int = 3) -> torch.Tensor:
    """Prefill ids[:, :prompt] eagerly, then feed the rest through `step`; the decode logits (B, N, V)."""
    B, T = ids.shape
    cache = ModelCache.for_model(m, B, max_len, chunk)
    with torch.inference_mode():
        for s in range(0, prompt, chunk):
            n = min(chunk, prompt - s)
            m(ids[:, s:s + n], torch.arange(s, s + n).expand(B, n), cache, kv_len=s + n)
        out = [step(m, cache, ids[:, t:t + 1], torch.full((B, 1), t), t + 1) for t in range(prompt, T)]
    return torch.stack(out, 1)


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("max_len", [40, 97])
def test_compiled_step_equals_eager(steps: dict, batch: int, max_len: int) -> None:
    """Full buffers of 40 and 97 slots, rolling buffers of 7 that wrap many times, batch 1, 2 and 5."""
    m = steps["model"]
    ids = torch.randint(0, 96, (batch, 40), generator=torch.Generator().manual_seed(batch))
    ref = decode(m, eager.decode_step, ids, 9, max_len)
    got = decode(m, steps[1 if batch == 1 else 2], ids, 9, max_len)
    assert ref.shape == (batch, 31, 96)
    assert (got - ref).abs().max().item() < 1e-4


def test_artifacts_are_saved_and_reused(steps: dict) -> None:
    m = steps["model"]
    files = sorted(compiled.cache_dir().glob("decode-*.bin"))
    assert [f.name for f in files] == sorted(f"decode-{compiled.layout_key(m, k)}.bin" for k in (ONE, BATCHED))
    again = compiled.build(m, ONE, "auto")  # loads from disk: no compile
    assert again is not None and again.backend == "compiled" and select(m, ONE, "auto").backend == "compiled"
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(7))
    assert torch.equal(decode(m, again, ids, 5, 30), decode(m, steps[1], ids, 5, 30))


def test_layout_key_tracks_what_the_graph_depends_on(steps: dict, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    m = steps["model"]
    assert compiled.layout_key(m, ONE) == compiled.layout_key(tiny(), ONE)  # same layout, other weights object
    assert compiled.layout_key(m, ONE) != compiled.layout_key(m, BATCHED)
    assert compiled.layout_key(m, BATCHED) == compiled.layout_key(m, StepKind.of(32))
    assert compiled.layout_key(m, ONE) != compiled.layout_key(tiny(post_norms=True), ONE)
    other = tiny()  # the same weights on other kernels: the modules took other routes
    other.apply_plan(replace(m.plan, attention=not m.plan.attention))
    assert compiled.layout_key(m, ONE) != compiled.layout_key(other, ONE)
    # nothing built for this layout yet: auto stays eager, off is always eager
    monkeypatch.setenv("LEANLM_HOME", str(tmp_path))
    assert compiled.build(m, ONE, "auto") is None and select(m, ONE, "auto").backend == "eager"
    assert compiled.build(m, ONE, "off") is None and select(m, ONE, "off").backend == "eager"
    assert not list(tmp_path.rglob("*.bin"))


def test_a_compiled_step_refuses_a_cache_of_another_layout(steps: dict) -> None:
    """The graph indexes the cache's tensors as laid out when it was traced (torch's guards are off): a cache
    kept otherwise (here bf16 K/V for a step traced with the model's fp32 ones) is refused, not misread."""
    m = steps["model"]
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(5))
    assert ModelCache.layout_for(m) == "rows/float32"
    decode(m, steps[1], ids[:1], 5, 30)  # the layout it was traced with
    other = ModelCache(m.cfg, 2, 30, 3, torch.bfloat16, plan=m.plan)
    assert other.layout == "rows/bfloat16"
    with torch.inference_mode(), pytest.raises(LeanLMError, match="built for a rows/float32 K/V cache, not rows/bf"):
        steps[2](m, other, ids[:, :1], torch.zeros(2, 1, dtype=torch.long), 1)
    with torch.inference_mode(), pytest.raises(LeanLMError, match="not rows/bfloat16"):  # views of rows, too
        steps[1](m, other.rows(1, 2), ids[:1, :1], torch.zeros(1, 1, dtype=torch.long), 1)


def check_decode_quality(smol_path: Path, llm: Any, step: eager.DecodeStep, min_agree: float) -> None:
    """SmolLM2 decoded through `step`, teacher-forced over real text: perplexity within 1% of the fp32
    reference's, and the top token equal to the eager bf16 step's at more than `min_agree` of positions."""
    import leanlm

    text = (FIXTURES / "calibration.txt").read_text()[:2000]
    ids = llm.encode_prompt(text)[:160]
    m = llm.model
    logits = decode(m, step, torch.tensor([ids]), 32, len(ids), chunk=32)[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[33:]))
    ref_llm = leanlm.load(smol_path, dtype="float32", progress=False)
    ref = torch.nn.functional.cross_entropy(ref_llm.logits(ids)[32:-1], torch.tensor(ids[33:]))
    assert abs(nll.exp() / ref.exp() - 1) < 0.01, (nll.exp(), ref.exp())
    ref = decode(m, eager.decode_step, torch.tensor([ids]), 32, len(ids), chunk=32)[0].argmax(-1)
    agree = (logits.argmax(-1) == ref[:-1]).float().mean().item()
    assert agree > min_agree, agree


@pytest.mark.slow
def test_real_model_compiled_decode_keeps_quality(smol_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolLM2 (int4 + int8 head, bf16 activations): the compiled step keeps quality (check_decode_quality)."""
    import leanlm

    monkeypatch.setenv("LEANLM_NATIVE_STEP", "0")  # the compiled step, not cpp.py's
    llm = leanlm.load(smol_path, progress=False)
    step = llm.decode_step(1, "on")
    assert step.backend == "compiled"
    check_decode_quality(smol_path, llm, step, 0.97)


def test_a_damaged_artifact_falls_back_to_eager(steps: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = steps["model"]
    monkeypatch.setenv("LEANLM_HOME", str(tmp_path))
    path = compiled.cache_dir() / f"decode-{compiled.layout_key(m, ONE)}.bin"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a compiled function")
    said: list[str] = []
    assert select(m, ONE, "auto", said.append).backend == "eager"
    assert said and "running eagerly" in said[0]


@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_verify_step_equals_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    """Speculative decoding's verify step (blocks of T >= 2 tokens per row; one sequence, or a batch of rows
    at different positions) compiled once, used for any T and batch size."""
    monkeypatch.setenv("LEANLM_HOME", str(tmp_path))
    m = tiny()
    kind = StepKind.of(batch, tokens=2)
    step = compiled.build(m, kind, "on")
    assert step is not None and step.backend == "compiled" and kind.block
    assert compiled.layout_key(m, kind) != compiled.layout_key(m, StepKind.of(batch))
    ids = torch.randint(0, 96, (batch, 50), generator=torch.Generator().manual_seed(3))
    lag = torch.arange(batch)[:, None] * 3  # row r runs 3r positions behind row 0
    for B in (batch, 2) if batch > 1 else (1,):
        with torch.inference_mode():
            caches = [ModelCache(m.cfg, B, 60, 6, m.dtype) for _ in range(2)]
            s = 0
            for T in (6, 2, 5, 3, 6, 4, 2, 6, 6):  # the rolling buffers (W 4 + chunk 6) wrap several times
                pos = torch.arange(s, s + T)[None] + 6 - lag[:B]  # (B, T), row 0 from 6, row 2 from 0
                blk = ids[:B].gather(1, pos)
                ref = eager.verify_step(m, caches[0], blk, pos, int(pos.max()) + 1)
                got = step(m, caches[1], blk, pos, int(pos.max()) + 1)
                assert got.shape == (B, T, 96) and (got - ref).abs().max().item() < 1e-4
                s += T


@pytest.mark.slow  # compiles SmolLM2's decode and verify steps (about 5 minutes) unless they are cached
def test_bf16_compiled_block_scores_like_single_steps(smol_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Speculative decoding's exactness with compiled bf16 steps on the real model: the verify graph's logits
    for a block equal the decode graph's for the same tokens one at a time, bit for bit. Without inductor's
    emulate_precision_casts the two graphs kept different values in fp32 (logits apart by up to 0.9)."""
    import leanlm

    monkeypatch.setenv("LEANLM_NATIVE_STEP", "0")  # the compiled steps, not cpp.py's
    llm = leanlm.load(smol_path, progress=False, compile="on")
    m = llm.model
    step, verify = llm.decode_step(1), llm.decode_step(1, tokens=2)
    ids = llm.encode_prompt("The quick brown fox jumps over the lazy dog. " * 6)
    n = len(ids)
    with torch.inference_mode():
        caches = [ModelCache(m.cfg, 1, 256, 64, m.dtype) for _ in range(2)]
        for c in caches:
            m(torch.tensor([ids[:n - 9]]), torch.arange(n - 9)[None], c, kv_len=n - 9)
        for s, T in ((n - 9, 5), (n - 4, 4)):
            block = verify(m, caches[1], torch.tensor([ids[s:s + T]]), torch.arange(s, s + T)[None], s + T)[0]
            singles = [step(m, caches[0], torch.tensor([[ids[t]]]), torch.tensor([[t]]), t + 1)[0]
                       for t in range(s, s + T)]
            assert torch.equal(block, torch.stack(singles))
