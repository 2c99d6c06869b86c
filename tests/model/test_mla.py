"""Multi-head latent attention (mla.py) and DeepSeek-V2's expert routing (moe.py), beyond the parity with
transformers in test_hf_models.py: the two ways of computing attention agree, the cache stays latent (its
size does not grow with the number of heads), a batch decodes like its sequences one by one, bf16 stays
close to fp32, and group-limited routing picks what its definition says."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import random_transformer

from leanlm.model.cache import LatentBuffer, ModelCache
from leanlm.model.config import MlaConfig, MoeConfig
from leanlm.model.transformer import Transformer

MLA = MlaConfig(kv_rank=24, q_rank=None, nope_dim=8, rope_dim=4, v_dim=6)


def tiny_mla(n_heads: int = 4, **cfg: object) -> Transformer:
    return random_transformer((None, None), n_heads=n_heads, n_kv_heads=n_heads, head_dim=12, rope_dim=4,
                              rope_interleaved=True, mla=MLA, **cfg)


def decode(m: Transformer, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of ids (B, T): the first `prefill` positions in one forward, then one token at a time."""
    B, T = ids.shape
    cache = ModelCache(m.cfg, B, T, 16, m.dtype)
    cache.kv_len = prefill
    out = [m(ids[:, :prefill], torch.arange(prefill).expand(B, -1), cache)]
    for t in range(prefill, T):
        cache.kv_len = t + 1
        out.append(m(ids[:, t:t + 1], torch.full((B, 1), t), cache))
    return torch.cat(out, 1)


@torch.inference_mode()
def test_absorbed_decode_equals_expanded_attention() -> None:
    """Decode steps score queries against the cached latents (absorbed weights); a full pass of 40 tokens
    expands per-head keys and values. Both are the same attention."""
    m = tiny_mla()
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    full = m(ids, torch.arange(40)[None])  # T = 40 > 16 queries: expanded
    stepped = decode(m, ids, prefill=4)  # 4 then 1 at a time: absorbed
    assert (full - stepped).abs().max().item() < 1e-4
    assert full.abs().max().item() > 1.0  # not a vanishing signal


def test_cache_holds_latents_whatever_the_head_count() -> None:
    """Per token and layer the cache keeps kv_rank + rope_dim numbers, for 4 heads or 16."""
    sizes = []
    for heads in (4, 16):
        cache = ModelCache(tiny_mla(heads).cfg, 2, 100, 16, torch.float32)
        assert all(isinstance(b, LatentBuffer) for b in cache.layers)
        sizes.append(sum(t.nbytes for b in cache.layers for t in b.tensors()))
    assert sizes[0] == sizes[1] == 2 * 2 * 100 * (MLA.kv_rank + MLA.rope_dim) * 4  # layers, batch, slots, fp32


@torch.inference_mode()
def test_batch_decodes_like_each_sequence_alone() -> None:
    m = tiny_mla()
    ids = torch.randint(0, 64, (3, 30), generator=torch.Generator().manual_seed(1))
    together = decode(m, ids, prefill=6)
    for b in range(3):
        alone = decode(m, ids[b:b + 1], prefill=6)
        assert (together[b] - alone[0]).abs().max().item() < 1e-5


@torch.inference_mode()
def test_bf16_stays_close_to_fp32() -> None:
    m = tiny_mla(std=0.2)
    ids = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(2))
    ref = decode(m, ids, prefill=10)
    got = decode(m.to(torch.bfloat16), ids, prefill=10).float()
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.parametrize(("groups", "want"), [(4, {1, 4}), (1, {1, 4})])
def test_group_limited_routing_keeps_the_best_groups(groups: int, want: set[int]) -> None:
    """The moe.py docstring's example: scores [.1 .3 | .05 .05 | .2 .1 | .1 .1], 4 groups of 2, best 2 groups."""
    moe = MoeConfig(8, 2, score_first=True, n_group=groups, topk_group=2, routed_scale=2.0)
    m = random_transformer((None,), moe=moe)
    scores = torch.tensor([[.1, .3, .05, .05, .2, .1, .1, .1]])
    weights, experts = m.layers[0].ffn._scores_top_k(scores.log())
    assert set(experts[0].tolist()) == want
    assert torch.allclose(weights.sort(descending=True).values, torch.tensor([[.6, .4]]))


def test_groups_exclude_a_high_score_outside_them() -> None:
    """With only the best group kept, expert 2 (second best overall) loses to expert 1 of the best group."""
    moe = MoeConfig(8, 2, score_first=True, n_group=4, topk_group=1)
    m = random_transformer((None,), moe=moe)
    scores = torch.tensor([[.3, .01, .29, .0, .0, .0, .28, .0]])  # group bests .3, .29, 0, .28
    pick = lambda s: set(m.layers[0].ffn._scores_top_k(s.clamp_min(1e-9).log())[1][0].tolist())  # noqa: E731
    assert pick(scores) == {0, 1}
    m.layers[0].ffn.moe = MoeConfig(8, 2, score_first=True)  # no groups: the two best overall
    assert pick(scores) == {0, 2}


@pytest.mark.parametrize("speculate", [False, True])
def test_serving_engine_equals_plain_greedy(speculate: bool) -> None:
    """Continuous batching (sequences joining late, prefill chunks between decode steps) over latent caches,
    with MoE layers (a dense first layer, routed experts with a shared one), plain and with prompt-lookup
    drafts: every sequence gets exactly its plain greedy tokens."""
    from test_serve_speculative import EOS, PROMPTS, run, tiny_llm

    from leanlm.llm import Speculation
    from leanlm.runtime.generate import generate_ids
    from leanlm.runtime.sampling import SamplingParams
    from leanlm.serve.engine import Engine

    moe = MoeConfig(4, 2, hidden_dim=16, score_first=True, n_shared=1, first_dense=1)
    target = tiny_llm((None, None), n_kv_heads=4, head_dim=12, rope_dim=4, rope_interleaved=True, mla=MLA, moe=moe)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=i % 2 == 0)
              for i, n in enumerate((40, 9, 60, 30, 25, 1))]
    want = [list(generate_ids(target.model, p, lambda lg, h: lg.argmax(-1), sp.max_tokens, chunk=6,
                              stop_ids=frozenset() if sp.ignore_eos else frozenset({EOS})))
            for p, sp in zip(PROMPTS, params)]
    spec = Speculation(4, None, "lookup") if speculate else None
    engine = Engine(target, max_batch=3, max_len=100, chunk=6, speculation=spec)
    assert run(engine, PROMPTS, params, late=2) == want
    assert len({t for w in want for t in w}) > 5  # not one token repeated
