"""Greedy parity with llama.cpp on the real GGUF models (fixtures from scripts/record_llamacpp_greedy.py).

For each model and chat prompt the fixture holds the prompt ids (built by leanlm), llama.cpp's greedy
continuation (up to 48 tokens, stopping at its end-of-generation token) and llama.cpp's top-5 ids at
every generated step. With leanlm in fp32 we check:

(a) our own greedy continuation (the cached decode path): at every step up to and including the first
    one where our token differs from llama.cpp's, llama.cpp's token is in our top-5; at that first
    divergence our token is also in llama.cpp's top-5;
(b) teacher forcing (one cache-free forward over the prompt + llama.cpp's tokens): at every generated
    position llama.cpp's next token is in our top-5.

Exact equality of the whole continuation is not expected and not asserted. llama.cpp does not compute
the same function as exact fp32 math on the dequantized weights: in its quantized matmuls it quantizes
the *activations* to 8 bits per block (Q8_0 / Q8_K) before the integer dot products, and it accumulates
in a different order. On these models its logits differ from exact dequantized fp32 logits by up to
~0.6, so wherever the top two candidates are closer than that (a near-tie, common in the repetitive text
these small models produce), either engine may pick the other token, and the continuations then diverge
for good. A top-5 check at every position is robust to that and still catches real bugs (a wrong RoPE,
norm, mask or cache would push llama.cpp's choice far down our ranking within a few tokens).

The number of identical leading tokens and the logit gap at the first divergence are reported in the
terminal summary (not asserted).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FIXTURES

from leanlm.llm import LLM, load
from leanlm.runtime.generate import generate_ids
from leanlm.runtime.sampling import SamplingParams, sample

MODELS = {"smollm2": "smol_path", "gemma3": "gemma_path"}  # fixture file suffix -> path fixture
pytestmark = pytest.mark.real_model  # `run` asks for the path fixtures by name, out of conftest's sight
N_CASES = 5
TOP_K = 5
GREEDY = SamplingParams(temperature=0)


@dataclass
class CaseResult:
    prompt: str
    ref: list[int]  # llama.cpp's greedy tokens
    ref_top5: list[list[int]]  # llama.cpp's top-5 at each of its steps
    ours: list[int]  # our greedy tokens, up to and including the first divergence
    our_top5: list[list[int]]  # our top-5 at each of those steps
    our_gap: float  # at the divergence: our logit of our token minus our logit of llama.cpp's token
    ref_gap: float | None  # at the divergence: the same gap in llama.cpp's logits (None: ours not in its top-5)
    tf_top5: list[list[int]]  # teacher-forced top-5 at each of llama.cpp's steps
    tf_argmax_same: int  # teacher-forced positions where our argmax is llama.cpp's token

    @property
    def leading_same(self) -> int:
        n = 0
        while n < min(len(self.ours), len(self.ref)) and self.ours[n] == self.ref[n]:
            n += 1
        return n


class ModelRun:
    """One loaded model and its fixture; each case is computed once, on first use."""

    def __init__(self, name: str, llm: LLM, data: dict[str, Any]) -> None:
        self.name, self.llm, self.data = name, llm, data
        self.done: dict[int, CaseResult] = {}

    def case(self, i: int) -> CaseResult:
        if i not in self.done:
            self.done[i] = self._compute(i)
        return self.done[i]

    def _compute(self, i: int) -> CaseResult:
        c = self.data["cases"][i]
        prompt, ref = c["prompt_ids"], c["gen"]
        ours, our_top5, gap = self._greedy_until_divergence(prompt, ref)
        logits = self.llm.logits(prompt + ref[:-1])[len(prompt) - 1:]  # row j predicts ref[j]
        tf_top5 = torch.topk(logits, TOP_K, dim=-1).indices.tolist()
        same = int((logits.argmax(-1) == torch.tensor(ref)).sum())
        ref_gap = None
        d = len(ours) - 1
        if ours[d] != ref[d] and ours[d] in c["top5"][d]:
            ref_gap = c["top5_logits"][d][0] - c["top5_logits"][d][c["top5"][d].index(ours[d])]
        return CaseResult(c["prompt"], ref, c["top5"], ours, our_top5, gap, ref_gap, tf_top5, same)

    def _greedy_until_divergence(self, prompt: list[int], ref: list[int]) -> tuple[list[int], list[list[int]], float]:
        tops: list[list[int]] = []
        last: list[torch.Tensor] = []  # the latest step's logits

        def sampler(logits: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
            last[:] = [logits[0].float()]
            tops.append(torch.topk(logits[0], TOP_K).indices.tolist())
            return sample(logits, GREEDY, hist)

        ours: list[int] = []
        gap = 0.0
        for i, tid in enumerate(generate_ids(self.llm.model, prompt, sampler, len(ref))):
            ours.append(tid)
            if tid != ref[i]:
                gap = float(last[0][tid] - last[0][ref[i]])
                break
        return ours, tops[:len(ours)], gap


class _Summary:
    """A plugin registered at run time: prints the per-case agreement at the end of the session."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.lines:
            terminalreporter.section("llama.cpp greedy parity (fp32)")
            for line in self.lines:
                terminalreporter.write_line(line)


def _summary(config: pytest.Config) -> _Summary:
    plugin = config.pluginmanager.get_plugin("leanlm-llamacpp-parity")
    if plugin is None:
        plugin = _Summary()
        config.pluginmanager.register(plugin, "leanlm-llamacpp-parity")
    return plugin


@pytest.fixture(scope="module", params=list(MODELS))
def run(request: pytest.FixtureRequest) -> Iterator[ModelRun]:
    name = request.param
    path: Path = request.getfixturevalue(MODELS[name])
    data = json.loads((FIXTURES / f"llamacpp_greedy_{name}.json").read_text(encoding="utf-8"))
    assert len(data["cases"]) == N_CASES
    if path.stat().st_size != data["model_size"]:
        pytest.skip(f"{path} is not the file the fixture was recorded from ({data['model']})")
    r = ModelRun(name, load(path, dtype="float32", progress=False), data)
    yield r
    summary = _summary(request.config)
    for i, c in sorted(r.done.items()):
        diverged = c.leading_same < len(c.ref)
        ref_gap = "-" if c.ref_gap is None else f"{c.ref_gap:.3f}"
        div = (f"first divergence at {c.leading_same}, logit gap ours {c.our_gap:.3f} / llama.cpp {ref_gap}"
               if diverged else "no divergence")
        summary.lines.append(
            f"{name} #{i}: identical leading tokens {c.leading_same}/{len(c.ref)} ({div}); "
            f"teacher-forced argmax == llama.cpp {c.tf_argmax_same}/{len(c.ref)}  [{c.prompt}]"
        )


@pytest.mark.parametrize("i", range(N_CASES))
def test_greedy_top5_until_divergence(run: ModelRun, i: int) -> None:
    c = run.case(i)
    for step, (ref_tok, top5) in enumerate(zip(c.ref, c.our_top5)):
        assert ref_tok in top5, f"{run.name} #{i} step {step}: llama.cpp's {ref_tok} not in our top-5 {top5}"
    if c.leading_same < len(c.ref):
        d = c.leading_same
        assert c.ours[d] in c.ref_top5[d], (
            f"{run.name} #{i} step {d}: our {c.ours[d]} not in llama.cpp's top-5 {c.ref_top5[d]}"
        )


@pytest.mark.parametrize("i", range(N_CASES))
def test_teacher_forced_top5(run: ModelRun, i: int) -> None:
    c = run.case(i)
    assert len(c.tf_top5) == len(c.ref)
    bad = [(j, t, top) for j, (t, top) in enumerate(zip(c.ref, c.tf_top5)) if t not in top]
    assert not bad, f"{run.name} #{i}: llama.cpp's token not in our top-5 at (position, token, top-5) {bad[:5]}"
