"""4-bit GGUF weights kept quantized: decoding to the int4 kernel's (q, scale, zero) form is exact, and
Int4Linear multiplies like the dequantized weight up to bf16 rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

import leanlm
from leanlm.gguf_file import GGUFFile
from leanlm.quant.int4 import INT4_TYPES, Int4Linear, dense_reference, int4_parts

Q = GGMLQuantizationType


def _reference(f: GGUFFile, name: str) -> torch.Tensor:
    info = f.tensors[name]
    return torch.from_numpy(np.array(quants.dequantize(f.raw(name), info.qtype), np.float32).reshape(info.shape))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_random_legacy_blocks_decode_exactly(qtype: GGMLQuantizationType, tmp_path: Path) -> None:
    from gguf import GGUFWriter

    x = np.random.default_rng(0).normal(size=(48, 256)).astype(np.float32)
    w = GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("t", quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(tmp_path / "t.gguf")
    assert torch.equal(dense_reference(*int4_parts(f, "t")), _reference(f, "t"))


def test_real_q4_1_and_q4_k_tensors_decode_exactly(smol_path: Path, gemma_path: Path) -> None:
    seen = set()
    for path in (smol_path, gemma_path):
        f = GGUFFile(path)
        for name, info in f.tensors.items():
            if info.qtype in INT4_TYPES and info.qtype not in seen:
                seen.add(info.qtype)
                parts = int4_parts(f, name)
                assert torch.equal(dense_reference(*parts), _reference(f, name))
                lin = Int4Linear(*parts)
                x = torch.randn(5, info.shape[1])
                ref = x @ _reference(f, name).t()
                assert (lin(x) - ref).abs().max() < 0.02 * ref.abs().max()  # bf16 activations and scales
    assert seen == {Q.Q4_1, Q.Q4_K}


def test_auto_dtype_keeps_4bit_weights_quantized(smol_path: Path) -> None:
    llm = leanlm.load(smol_path)  # dtype auto
    n_int4 = sum(isinstance(m, Int4Linear) for m in llm.model.modules())
    assert n_int4 == 30 * 7  # every attention and MLP matrix of SmolLM2 is Q4_1
    dense = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    int4 = [m for m in llm.model.modules() if isinstance(m, Int4Linear)]
    packed = sum(b.numel() * b.element_size() for m in int4 for b in m.buffers())
    weights = sum(m.in_features * m.out_features for m in int4)
    assert packed < 0.7 * weights  # 0.5 byte per weight + bf16 scale and zero per 32, not 2 or 4 bytes
    assert dense < 1e6  # only norms stay dense: the tied head/embedding is int8 (Int8Linear + Int8Embedding)
    assert type(llm.model.output).__name__ == "Int8Linear"


def test_int8_head_rows_are_within_half_a_step(smol_path: Path) -> None:
    from leanlm.quant.dequant import dequantize_rows
    from leanlm.quant.int8 import Int8Embedding, Int8Linear, quantize_rows

    f = GGUFFile(smol_path)
    w = dequantize_rows(f, "token_embd.weight", 0, 1000)
    codes, scales = quantize_rows(1000, lambda s, e: w[s:e])
    err = (codes.float() * scales.float()[:, None] - w).abs()
    assert (err <= scales.float()[:, None] * 0.5 + 1e-6).all()
    x = torch.randn(3, w.shape[1])
    ref = x @ w.t()
    assert (Int8Linear(codes, scales)(x) - ref).abs().max() < 0.02 * ref.abs().max()
    emb = Int8Embedding(codes, scales, torch.float32)(torch.tensor([[0, 999]]))
    assert (emb[0] - w[[0, 999]]).abs().max() <= scales.float().max()
