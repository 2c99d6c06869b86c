"""KV cache: chunked prefill and token-by-token decoding through rolling buffers equal one full pass."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import random_transformer

from leanlm.model.cache import ModelCache, attention_mask
from leanlm.model.transformer import Transformer


def tiny(windows: tuple[int | None, ...], **kw) -> Transformer:
    return random_transformer(windows, **kw)


def run_cached(m: Transformer, ids: torch.Tensor, chunk: int, decode_from: int) -> torch.Tensor:
    """Prefill ids[:decode_from] in chunks, then feed the rest one token at a time; all logits."""
    T = ids.shape[1]
    cache = ModelCache(m.cfg, 1, T, chunk, torch.float32)
    out = []
    s = 0
    while s < T:
        n = min(chunk, decode_from - s) if s < decode_from else 1
        pos = torch.arange(s, s + n)[None]
        cache.kv_len = s + n
        out.append(m(ids[:, s:s + n], pos, cache))
        s += n
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("kw", [dict(), dict(rope_interleaved=True, rope_local_base=100.0, qk_norm=True,
                                              post_norms=True, act="gelu_tanh", embed_scale=5.0)])
@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
@torch.no_grad()
def test_rolling_cache_matches_full_pass(kw: dict, chunk: int) -> None:
    m = tiny((4, None, 4), **kw)
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = m(ids, torch.arange(40)[None])
    got, cache = run_cached(m, ids, chunk, decode_from=25)
    assert (got - ref).abs().max().item() < 1e-4
    # sliding layers hold W + chunk slots however long the sequence; full layers hold all of it
    assert [b.size for b in cache.layers] == [4 + chunk, 40, 4 + chunk]


@torch.no_grad()
def test_window_changes_the_result() -> None:
    """Guards the test above: a window of 4 must matter on 40 tokens."""
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    a = tiny((4, None, 4))(ids, torch.arange(40)[None])
    b = tiny((None, None, None))(ids, torch.arange(40)[None])
    assert (a[:, :4] - b[:, :4]).abs().max() < 1e-5
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-2


def test_window_boundary_sees_itself_and_w_minus_one_before() -> None:
    mask = attention_mask(torch.tensor([[10]]), torch.arange(12)[None], window=4)
    assert mask[0, 0, 0].nonzero().flatten().tolist() == [7, 8, 9, 10]
    empty = attention_mask(torch.tensor([[1]]), torch.tensor([[0, 1, -1]]), window=None)
    assert empty[0, 0, 0].tolist() == [True, True, False]


@torch.no_grad()
def test_sliding_buffer_keeps_its_size_while_decoding_4w_tokens() -> None:
    from leanlm.runtime.generate import generate_ids
    from leanlm.runtime.sampling import SamplingParams, sample

    W, chunk = 8, 4
    m = tiny((W, None))
    sizes = []
    orig = ModelCache.__init__

    def spy(self, *a, **kw) -> None:  # noqa: ANN001, ANN002, ANN003
        orig(self, *a, **kw)
        sizes.append(self)

    ModelCache.__init__ = spy
    try:
        greedy = SamplingParams(temperature=0)
        out = list(generate_ids(m, [1, 2, 3], lambda lg, h: sample(lg, greedy, h), 4 * W, chunk=chunk))
    finally:
        ModelCache.__init__ = orig
    assert len(out) == 4 * W
    (cache,) = sizes
    assert cache.layers[0].size == W + chunk  # rolling: constant, however many tokens
    assert cache.layers[1].size == 3 + 4 * W  # full attention: the whole sequence
    assert int(cache.layers[0].pos.max()) == 3 + 4 * W - 2  # it did wrap: holds the latest positions


def test_sliding_cache_bytes_do_not_grow_with_length() -> None:
    cfg = tiny((16, 16)).cfg
    small = ModelCache(cfg, 1, 1000, 8, torch.float16, device="meta").nbytes()
    big = ModelCache(cfg, 1, 100_000, 8, torch.float16, device="meta").nbytes()
    assert small == big


def test_cache_layout_follows_the_plan() -> None:
    """`ModelCache.layout` names how K/V are kept, as the model's kernel plan decides (kernels/plan.py): what a
    compiled step checks its caches against. Built on the meta device, laid out as on the CPU."""
    from dataclasses import replace

    from leanlm.kernels.plan import KernelPlan

    cfg = tiny((None, 4), dim=128, n_heads=2, n_kv_heads=1, head_dim=64).cfg
    torch_only = KernelPlan()
    ours = replace(torch_only, attention=True, flash=True, blocked_keys=True, int8_kv=True)

    def layout(dtype: torch.dtype, plan: KernelPlan, kv: str = "auto") -> str:
        c = ModelCache(cfg, 1, 40, 8, dtype, "meta", kv, layout_device="cpu", plan=plan)
        assert all(b.blocked == c.layout.startswith(("blocked", "int8")) for b in c.layers)
        return c.layout

    assert layout(torch.bfloat16, torch_only) == "rows/bfloat16"
    assert layout(torch.bfloat16, ours) == "blocked/bfloat16"
    assert layout(torch.bfloat16, ours, "int8") == "int8/bfloat16"
    assert layout(torch.float32, ours) == "rows/float32"  # our attention kernels are bf16 only
    assert layout(torch.bfloat16, replace(ours, blocked_keys=False)) == "rows/bfloat16"
    assert ModelCache(cfg, 2, 40, 8, torch.bfloat16, "meta", layout_device="cpu", plan=ours).rows(0, 1).layout == \
        "blocked/bfloat16"
