"""Keys kept in blocks of 16 slots (cache.py's blocked layout) and the kernels that read them in place
(kernels/attend_blocked.cpp for decode steps, kernels/flash.cpp for prompts)."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import random_transformer

from leanlm.kernels.plan import KernelPlan
from leanlm.model.cache import BLOCK, KVBuffer, ModelCache, key_rows

pytestmark = [pytest.mark.avx512, pytest.mark.skipif(not KernelPlan.resolve().blocked_keys,
                                                     reason="no AVX-512 BF16 here (keys stay in rows)")]


def blocked(k: torch.Tensor) -> torch.Tensor:
    """(B, KV, S, hd) rows, S a multiple of 16 -> (B, KV, S / 16, hd / 2, 16, 2), written independently of
    cache.py: element [b, h, s // 16, d // 2, s % 16, d % 2] is k[b, h, s, d]."""
    B, KV, S, hd = k.shape
    out = torch.empty(B, KV, S // 16, hd // 2, 16, 2, dtype=k.dtype)
    for s in range(S):
        for d in range(hd):
            out[:, :, s // 16, d // 2, s % 16, d % 2] = k[:, :, s, d]
    return out


def test_buffer_writes_blocks_and_reads_rows_back() -> None:
    """Random slots of a batch written through a blocked and a row buffer hold the same keys; the slot of the
    class docstring's example lands where it says."""
    g = torch.Generator().manual_seed(0)
    pos = torch.zeros(2, 48, dtype=torch.long)
    rows = KVBuffer(2, 3, 48, 64, None, torch.bfloat16, pos)
    blk = KVBuffer(2, 3, 48, 64, None, torch.bfloat16, pos, blocked=True)
    assert blk.size == rows.size == 48
    for T in (5, 1, 3):
        slots = torch.stack([torch.randperm(48, generator=g)[:T] for _ in range(2)])
        k, v = torch.randn(2, 3, T, 64, generator=g).bfloat16(), torch.randn(2, 3, T, 64, generator=g).bfloat16()
        rows.write(slots, k, v)
        blk.write(slots, k, v)
    assert torch.equal(blk.k, blocked(rows.k)) and torch.equal(blk.v, rows.v)
    assert torch.equal(key_rows(blk.k, 48), rows.k)
    kb, vb = blk.view(37)  # 37 slots: whole blocks of keys (3), exact values
    assert kb.shape[2] == 3 and vb.shape[2] == 37 and torch.equal(key_rows(kb, 37), rows.k[:, :, :37])
    assert torch.equal(blk.k[1, 2, 2, 5, 5], rows.k[1, 2, 37, 10:12])  # slot 37, dims 10 and 11


def test_model_caches_round_to_whole_blocks() -> None:
    """A blocked cache's buffers hold whole blocks (a rolling buffer only gains slack); rows stay unrounded."""
    m = random_transformer((5, None), dim=128, n_heads=2, n_kv_heads=1, head_dim=64)
    c = ModelCache(m.cfg, 1, 40, 6, torch.bfloat16)
    assert all(b.blocked for b in c.layers) and [b.size for b in c.layers] == [16, 48]
    c = ModelCache(m.cfg, 1, 40, 6, torch.float32)
    assert not any(b.blocked for b in c.layers) and [b.size for b in c.layers] == [11, 40]


@pytest.mark.parametrize(("B", "H", "KV", "T", "hd", "S"), [(2, 9, 3, 1, 64, 300), (3, 9, 3, 5, 64, 37),
                                                           (1, 4, 1, 3, 256, 33), (2, 4, 1, 1, 256, 16),
                                                           (1, 8, 2, 2, 128, 7), (5, 6, 2, 1, 128, 90)])
def test_decode_attention_over_blocked_keys(B: int, H: int, KV: int, T: int, hd: int, S: int) -> None:
    """Softmax attention over the allowed keys, the same as over rows up to fp32 rounding; each row computed
    alike whatever T is and whichever rows share its task (speculative decoding's exactness): the last query
    alone, and each sequence alone (fewer tasks take fewer rows each), give the same bits."""
    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, T, H, hd, generator=g).bfloat16().transpose(1, 2)  # (B, H, T, hd) strided
    size = -(-(S + 9) // BLOCK) * BLOCK
    k, v = (torch.randn(B, KV, size, hd, generator=g).bfloat16() for _ in range(2))
    kb = blocked(k)[:, :, :-(-S // BLOCK)]
    k, v = k[:, :, :S], v[:, :, :S]
    mask = (torch.rand(B, T, S, generator=g) > 0.3)[:, None]
    mask[..., 0] = True
    if B > 1:
        mask[1, :, :, S // 2:] = False  # a sequence with fewer keys: whole blocks skipped
    op = torch.ops.leanlm_native.attend
    got = op(q, kb, v, mask, 0.125)
    qg = q.float().reshape(B, KV, H // KV, T, hd)
    s = ((qg[..., None, :] * k.float()[:, :, None, None]).sum(-1) * 0.125).masked_fill(~mask[:, :, None], -torch.inf)
    ref = (torch.softmax(s, -1)[..., None] * v.float()[:, :, None, None]).sum(-2).reshape(B, H, T, hd)
    assert ((got.float() - ref).abs() <= 2**-8 * (1 + ref.abs())).all()  # the output's bf16 rounding
    assert ((got.float() - op(q, k, v, mask, 0.125).float()).abs() <= 2**-7 * (1 + ref.abs())).all()
    assert torch.equal(op(q[:, :, -1:], kb, v, mask[:, :, -1:], 0.125), got[:, :, -1:])
    for b in range(B):
        assert torch.equal(op(q[b:b + 1], kb[b:b + 1], v[b:b + 1], mask[b:b + 1], 0.125), got[b:b + 1])


@pytest.mark.parametrize(("B", "H", "KV", "T", "hd", "S"), [(1, 4, 1, 100, 256, 300), (2, 9, 3, 37, 64, 70),
                                                           (1, 8, 2, 33, 128, 33)])
def test_prompt_attention_reads_blocked_keys_in_place(B: int, H: int, KV: int, T: int, hd: int, S: int) -> None:
    """flash.cpp over blocked keys reads the same pairs of dims as over rows: the same bits."""
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, T, H, hd, generator=g).bfloat16().transpose(1, 2)
    size = -(-S // BLOCK) * BLOCK
    k, v = (torch.randn(B, KV, size, hd, generator=g).bfloat16() for _ in range(2))
    qpos, kpos = torch.arange(S - T, S), torch.arange(S)
    mask = (kpos[None] <= qpos[:, None])[None, None].repeat(B, 1, 1, 1)
    op = torch.ops.leanlm_native.flash_attend
    assert torch.equal(op(q, blocked(k), v[:, :, :S], mask, hd**-0.5), op(q, k[:, :, :S], v[:, :, :S], mask, hd**-0.5))
