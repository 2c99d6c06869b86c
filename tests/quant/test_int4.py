"""4-bit GGUF weights kept quantized: decoding to the int4 kernel's (q, scale, zero) form is exact, and
Int4Linear multiplies like the dequantized weight up to bf16 rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

import leanlm
from leanlm.formats.gguf_file import GGUFFile
from leanlm.quant.int4 import Int4Linear
from leanlm.quant.repack import REPACKED, int4_parts, repack

Q = GGMLQuantizationType


def _reference(f: GGUFFile, name: str) -> torch.Tensor:
    info = f.tensors[name]
    return torch.from_numpy(np.array(quants.dequantize(f.raw(name), info.qtype), np.float32).reshape(info.shape))


# where each k-quant keeps its fp16 super-block scales (byte offsets), so random bytes can be made valid
_HALVES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def _random_tensor(qtype: GGMLQuantizationType, n: int, k: int) -> np.ndarray:
    """GGUF bytes of an (n, k) tensor: the reference quantizer's output, or random k-quant blocks."""
    rng = np.random.default_rng(int(qtype))
    if qtype not in _HALVES:
        return quants.quantize(rng.normal(size=(n, k)).astype(np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
    for off in _HALVES[qtype]:
        raw[:, off:off + 2] = rng.uniform(-0.02, 0.02, size=(len(raw), 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("qtype", REPACKED)
def test_every_block_type_repacks_exactly(qtype: GGMLQuantizationType) -> None:
    raw = _random_tensor(qtype, 48, 512)
    ref = torch.from_numpy(np.array(quants.dequantize(raw, qtype), np.float32))
    parts = repack(torch.from_numpy(raw.reshape(-1).copy()), qtype, 48, 512)
    assert (parts.dense() - ref).abs().max() <= 1e-6 * ref.abs().max()  # exact up to fp32 rounding of 8 s - m
    x = torch.randn(5, 512)
    y = Int4Linear(parts)(x)
    exact = x @ ref.t()
    assert (y - exact).abs().max() < 0.02 * exact.abs().max()  # bf16 activations and scales


def test_real_tensors_repack_exactly(smol_path: Path, gemma_path: Path) -> None:
    seen = set()
    for path in (smol_path, gemma_path):
        f = GGUFFile(path)
        for name, info in f.tensors.items():
            if info.qtype in REPACKED and info.qtype not in seen and info.shape[0] < 10000:
                seen.add(info.qtype)
                parts = int4_parts(f, name)
                assert torch.equal(parts.dense(), _reference(f, name))
                x = torch.randn(5, info.shape[1])
                ref = x @ _reference(f, name).t()
                assert (Int4Linear(parts)(x) - ref).abs().max() < 0.02 * ref.abs().max()
    assert seen == {Q.Q4_1, Q.Q4_K, Q.Q5_0, Q.Q6_K, Q.Q8_0}


def test_auto_dtype_keeps_4bit_weights_quantized(smol_path: Path) -> None:
    llm = leanlm.load(smol_path)  # dtype auto
    n_int4 = sum(isinstance(m, Int4Linear) for m in llm.model.modules())
    assert n_int4 == 30 * 4  # every attention and MLP matrix of SmolLM2 is Q4_1; q/k/v and gate/up fused
    assert all(layer.attn.wqkv is not None and layer.ffn.w13 is not None for layer in llm.model.layers)
    dense = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    int4 = [m for m in llm.model.modules() if isinstance(m, Int4Linear)]
    packed = sum(b.numel() * b.element_size() for m in int4 for b in m.buffers())
    weights = sum(m.in_features * m.out_features for m in int4)
    assert weights == 30 * (576 * (576 + 2 * 192) + 576 * 576 + 3 * 576 * 1536)
    assert packed < 0.7 * weights  # 0.5 byte per weight + bf16 scale and zero per 32, not 2 or 4 bytes
    assert dense < 1e6  # only norms stay dense: the tied head/embedding is int8 (Int8Linear + Int8Embedding)
    assert type(llm.model.output).__name__ == "Int8Linear"


def test_int8_head_rows_are_within_half_a_step(smol_path: Path) -> None:
    from leanlm.quant.dequant import dequantize_rows
    from leanlm.quant.int8 import Int8Embedding, Int8Linear, quantize_rows

    f = GGUFFile(smol_path)
    w = dequantize_rows(f, "token_embd.weight", 0, 1024)  # whole tiles: the tiled kernel where the CPU has it
    codes, scales = quantize_rows(1024, lambda s, e: w[s:e])
    err = (codes.float() * scales.float()[:, None] - w).abs()
    assert (err <= scales.float()[:, None] * 0.5 + 1e-6).all()
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(0))
    ref = x @ w.t()
    natural = Int8Embedding(codes.clone(), scales, torch.float32)
    head = Int8Linear(codes, scales)  # packs the codes in place where our tiled kernel runs
    assert (head(x) - ref).abs().max() < 0.04 * ref.abs().max()  # (x is int8 per 32 on the tiled kernel)
    ids = torch.tensor([[0, 999], [17, 500]])
    emb = Int8Embedding.tied(head, torch.float32)(ids)  # rows read back from the head's layout
    assert torch.equal(emb, natural(ids))
    assert (emb[0] - w[[0, 999]]).abs().max() <= scales.float().max()


@torch.inference_mode()
def test_fused_projections_compute_exactly_the_same(gemma_path: Path) -> None:
    from leanlm.formats import load_model
    from leanlm.quant.fuse import fuse_projections

    model, tok = load_model(gemma_path, torch.bfloat16, "cpu", True)  # as leanlm.load, before fusing
    ids = torch.tensor([tok.encode("Fusing q, k and v changes no number.")])
    pos = torch.arange(ids.shape[1])[None]
    plain = model(ids, pos)
    assert fuse_projections(model) == 2 * model.cfg.n_layers  # Gemma's q/k/v (Q5_0 / Q8_0 planes), gate/up
    assert torch.equal(model(ids, pos), plain)
