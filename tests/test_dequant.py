"""Our dequantization matches the gguf package's reference, on real tensors and random blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from leanlm.gguf_file import GGUFFile
from leanlm.quant.dequant import dequantize, dequantize_blocks

Q = GGMLQuantizationType
LEGACY = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]


@pytest.mark.parametrize("qtype", LEGACY)
def test_random_blocks_match_gguf_reference(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 256)).astype(np.float32)
    packed = quants.quantize(x, qtype)  # (64, bytes per row), made by the reference quantizer
    ref = quants.dequantize(packed, qtype)
    got = dequantize_blocks(torch.from_numpy(packed.reshape(-1).copy()), qtype).reshape(64, 256)
    assert torch.equal(got, torch.from_numpy(ref))
    assert GGML_QUANT_SIZES[qtype][0] == 32


def test_real_tensors_match_gguf_reference(smol_path: Path, gemma_path: Path) -> None:
    seen = set()
    for path in (smol_path, gemma_path):
        f = GGUFFile(path)
        for name, info in f.tensors.items():
            if info.qtype in seen or not name.startswith("blk.0"):
                continue
            seen.add(info.qtype)
            ref = quants.dequantize(f.raw(name), info.qtype).reshape(info.shape)
            assert torch.equal(dequantize(f, name, torch.float32), torch.from_numpy(np.array(ref, np.float32)))
    assert {Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K} <= seen
