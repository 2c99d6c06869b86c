"""Our dequantization matches the gguf package's reference, on real tensors and random blocks."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from leanlm.errors import UnsupportedError
from leanlm.formats.gguf_file import GGUFFile
from leanlm.quant.dequant import dequantize, dequantize_blocks, dequantize_rows

Q = GGMLQuantizationType
LEGACY = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
# byte offsets of each k-quant block's fp16 fields (d, dmin): random bytes there could be inf/nan
K_HALVES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


@pytest.mark.parametrize("qtype", LEGACY)
def test_random_blocks_match_gguf_reference(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 256)).astype(np.float32)
    packed = quants.quantize(x, qtype)  # (64, bytes per row), made by the reference quantizer
    ref = quants.dequantize(packed, qtype)
    got = dequantize_blocks(torch.from_numpy(packed.reshape(-1).copy()), qtype).reshape(64, 256)
    assert torch.equal(got, torch.from_numpy(ref))
    assert GGML_QUANT_SIZES[qtype][0] == 32


@pytest.mark.parametrize("qtype", list(K_HALVES))
def test_random_k_blocks_match_gguf_reference(qtype: GGMLQuantizationType) -> None:
    """Any bytes are a valid k-quant block once the fp16 fields are finite: every bit field is exercised."""
    block, size = GGML_QUANT_SIZES[qtype]
    assert block == 256
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, size=(300, size), dtype=np.uint8)
    for at in K_HALVES[qtype]:
        raw[:, at:at + 2] = (rng.normal(size=(300, 1)) * 0.01).astype(np.float16).view(np.uint8)
    ref = quants.dequantize(raw, qtype)  # (300, 256)
    got = dequantize_blocks(torch.from_numpy(raw.reshape(-1)), qtype).view(300, 256)
    assert torch.equal(got, torch.from_numpy(ref))


def test_real_tensors_match_gguf_reference(smol_path: Path, gemma_path: Path) -> None:
    seen = set()
    for path in (smol_path, gemma_path):
        f = GGUFFile(path)
        for name, info in f.tensors.items():
            if info.qtype in seen or not name.startswith("blk.0"):
                continue
            seen.add(info.qtype)
            ref = torch.from_numpy(np.array(quants.dequantize(f.raw(name), info.qtype), np.float32))
            ref = ref.reshape(info.shape)
            assert torch.equal(dequantize(f, name, torch.float32), ref)
            if len(info.shape) == 2:
                assert torch.equal(dequantize_rows(f, name, 3, 7), ref[3:7])
    assert {Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K} <= seen


def test_unsupported_type_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("w", np.zeros((2, 66), np.uint8), raw_dtype=Q.IQ2_XXS)  # two 256-weight IQ2_XXS blocks
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(path)
    for call in (lambda: dequantize(f, "w", torch.float32), lambda: dequantize_rows(f, "w", 0, 1)):
        with pytest.raises(UnsupportedError, match="tensor w has GGML type IQ2_XXS"):
            call()
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        dequantize_blocks(torch.zeros(66, dtype=torch.uint8), Q.IQ2_XXS)
