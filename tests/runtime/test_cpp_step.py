"""The decode step as one C++ call (runtime/steps/cpp.py, kernels/decode.cpp) against the eager model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.tiny_models import random_transformer
from torch import nn

from leanlm.kernels.plan import KernelPlan
from leanlm.model.cache import ModelCache
from leanlm.model.transformer import Transformer
from leanlm.quant.fuse import fuse_projections
from leanlm.quant.int4 import Int4Linear, Int4Parts
from leanlm.quant.int8 import Int8Embedding, Int8Linear, quantize_rows
from leanlm.runtime.steps import cpp, eager, select
from leanlm.runtime.steps.eager import StepKind

ONE, BLOCK = StepKind.of(1), StepKind.of(1, tokens=2)

pytestmark = [pytest.mark.vnni, pytest.mark.avx512,
              pytest.mark.skipif(not KernelPlan.resolve().native_step,
                                 reason="needs our C++ operators (AVX-512 VNNI, BF16)")]


def int4(lin: nn.Linear) -> Int4Linear:
    """4-bit codes per group of 32 with a scale and minimum (Q4_1-like), round to nearest."""
    w = lin.weight.detach().float()
    N, K = w.shape
    g = w.view(N, K // 32, 32)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15).clamp(min=1e-6)
    q = ((g - lo[..., None]) / s[..., None]).round().clamp(0, 15).to(torch.uint8).view(N, K)
    return Int4Linear(Int4Parts(q, s, lo + 8 * s))


def quantized(gemma: bool, fuse: bool = True, head_dim: int = 16) -> Transformer:
    """A tiny model in the form real GGUF files load into: bf16, 4-bit projections, an int8 head tied to the
    embedding. gemma: Gemma 3's extras (q/k norms, post norms, gelu, local rope base, embedding scale,
    sliding layers with rolling buffers); else llama's (interleaved rope, silu, full attention). head_dim 64:
    the cache keeps its keys in blocks of 16 slots (cache.py), which decode.cpp writes and attends over."""
    extra = dict(qk_norm=True, post_norms=True, act="gelu_tanh", rope_local_base=100.0, embed_scale=8.0,
                 norm_add_one=True) if gemma else dict(rope_interleaved=True)
    m = random_transformer((4, None, 4) if gemma else (None, None), vocab_size=96, dim=64, n_heads=4,
                           n_kv_heads=2, head_dim=head_dim, hidden_dim=96, std=0.2, **extra).to(torch.bfloat16)
    for layer in m.layers:
        for mod in (layer.attn, layer.ffn):
            for name, child in list(mod.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(mod, name, int4(child))
    w = m.output.weight.detach().float()
    m.output = Int8Linear(*quantize_rows(w.shape[0], lambda s, e: w[s:e]))
    m.tok_embeddings = Int8Embedding.tied(m.output, torch.bfloat16)
    if fuse:
        fuse_projections(m)
    return m


def run(m: Transformer, step: eager.DecodeStep, ids: torch.Tensor, lag: torch.Tensor, blocks: list[int], *,
        max_len: int = 40, chunk: int = 6) -> tuple[list[torch.Tensor], ModelCache]:
    """Prefill 6 tokens per row eagerly, then feed blocks of T tokens through `step` (rows `lag` positions
    behind row 0); the logits of every block (B, T, V), and the cache."""
    B = ids.shape[0]
    cache = ModelCache.for_model(m, B, max_len, chunk)
    out = []
    with torch.inference_mode():
        m(ids[:, :6], torch.arange(6).expand(B, 6), cache, kv_len=6)
        s = 6
        for T in blocks:
            pos = torch.arange(s, s + T)[None] + lag  # (B, T)
            logits = step(m, cache, ids.gather(1, pos), pos, int(pos.max()) + 1)
            out.append(logits if logits.dim() == 3 else logits[:, None])
            s += T
    return out, cache


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("head_dim", "kv"), [(16, "auto"), (64, "auto"), (64, "int8")])
def test_native_step_matches_the_eager_model(gemma: bool, batch: int, head_dim: int, kv: str) -> None:
    """Decode steps, one sequence and a batch whose rows sit at different positions; Gemma-style rolling
    buffers (window 4 + chunk 6 slots) wrap many times. The same bf16 arithmetic: equal up to the rounding of
    a norm's sum or an exp (on these sizes they agree exactly; on real ones a
    last-bit difference in bf16 can move logits by ~1%)."""
    m = quantized(gemma, head_dim=head_dim)
    m.kv_cache = kv
    step = cpp.build(m, ONE)
    assert step is not None and step.backend == "native"
    ids = torch.randint(0, 96, (batch, 40), generator=torch.Generator().manual_seed(batch))
    lag = -torch.arange(batch)[:, None] * 2  # row r runs 2r positions behind row 0
    blocks = [1] * 25
    ref, ref_cache = run(m, eager.decode_step, ids, lag, blocks)
    got, got_cache = run(m, step, ids, lag, blocks)
    assert got_cache.layers[0].blocked == (head_dim == 64) and got_cache.layers[0].quantized == (kv == "int8")
    ref, got = torch.cat(ref, 1), torch.cat(got, 1)
    assert got.shape == ref.shape == (batch, 25, 96)
    assert torch.equal(got, ref)
    for w, t in ref_cache.slot_pos.items():  # the step records positions in the slot tables itself
        assert torch.equal(got_cache.slot_pos[w], t)
    for a, b in zip(ref_cache.layers, got_cache.layers):  # the same writes (int8: the same codes and scales)
        assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("head_dim", "kv"), [(16, "auto"), (64, "auto"), (64, "int8")])
def test_a_verified_block_scores_like_single_steps(gemma: bool, batch: int, head_dim: int, kv: str) -> None:
    """Speculative decoding's exactness: the verify step's logits for blocks of 2-6 tokens equal the decode
    step's for the same tokens one at a time, bit for bit."""
    m = quantized(gemma, head_dim=head_dim)
    m.kv_cache = kv
    single, verify = cpp.build(m, ONE), cpp.build(m, BLOCK)
    ids = torch.randint(0, 96, (batch, 40), generator=torch.Generator().manual_seed(7))
    lag = -torch.arange(batch)[:, None] * 3
    blocks = [5, 2, 6, 3, 4, 2]
    got, _ = run(m, verify, ids, lag, blocks)
    ref, _ = run(m, single, ids, lag, [1] * sum(blocks))
    assert torch.equal(torch.cat(got, 1), torch.cat(ref, 1))


def test_separate_projections_give_the_fused_result() -> None:
    """q/k/v and gate/up as separate modules (their layouts could not be fused): the same logits."""
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(0))
    lag = torch.zeros(1, 1, dtype=torch.long)
    fused, _ = run(m := quantized(True), cpp.build(m, ONE), ids, lag, [1] * 10)
    apart, _ = run(m := quantized(True, fuse=False), cpp.build(m, ONE), ids, lag, [1] * 10)
    assert torch.equal(torch.cat(fused, 1), torch.cat(apart, 1))


def test_models_it_does_not_fit_keep_the_other_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    fp32 = random_transformer((None,))  # fp32, nn.Linear weights
    assert cpp.build(fp32, ONE) is None and not cpp.supports(fp32, ONE, fp32.plan)
    assert select(fp32, ONE).backend == "eager"
    m = quantized(False)
    m.layers[1].ffn.w2 = nn.Linear(96, 64).to(torch.bfloat16)  # one projection not on our kernel
    assert cpp.build(m, ONE) is None and select(m, ONE, "off").backend == "eager"
    monkeypatch.setenv("LEANLM_NATIVE_STEP", "0")  # read when the model is planned (built here)
    m = quantized(False)
    assert not m.plan.native_step and cpp.build(m, ONE) is None and select(m, ONE).backend != "native"


def test_real_model_native_decode_keeps_quality(smol_path: Path) -> None:
    """SmolLM2 (Q4_1 + int8 head): the native step's perplexity is within 1% of fp32's and its top tokens are
    the eager bf16 step's (test_compiled.check_decode_quality); generation picks it by itself."""
    from test_compiled import check_decode_quality

    import leanlm

    llm = leanlm.load(smol_path, progress=False)
    step = llm.decode_step(1)
    assert step.backend == "native"
    check_decode_quality(smol_path, llm, step, 0.99)
    gen = "".join(llm.generate("The capital of France is", max_tokens=8, temperature=0.0))
    assert llm.decode_kind() == "native" and gen
