"""Legacy block quantizers (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) against the gguf package's numpy reference: RTN bytes
are bit-identical, fits decode exactly like the packed bytes, and column-by-column rounding (GPTQ) agrees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from leanlm.quant.blocks import dequant, quantize_rtn
from leanlm.quant.legacy import LEGACY_FORMATS

Q = GGMLQuantizationType
TYPES = list(LEGACY_FORMATS)


def _data(kind: str, n: int = 48, k: int = 256) -> torch.Tensor:
    """(n, k) fp32 test weights of one kind."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(n, k, generator=g) * 0.05
    if kind == "zero_block":
        w[3, 64:96] = 0
        w[0, :32] = 0
        w[5, 32:64] = -0.0
    elif kind == "outliers":
        idx = torch.randint(0, n * k, (40,), generator=g)
        w.view(-1)[idx] = torch.randn(40, generator=g) * 20
        w[2, 0:32] = 1.0  # a block of equal values (min == max)
        w[4, 32:64] = torch.tensor([1.0, -1.0] * 16)  # sign ties for the largest magnitude
    elif kind == "ties":  # small integers: exact .5 products and many magnitude ties
        w = torch.randint(-4, 5, (n, k), generator=g).float()
    return w


KINDS = ["normal", "zero_block", "outliers", "ties"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_rtn_bytes_match_gguf(qtype: GGMLQuantizationType, kind: str) -> None:
    w = _data(kind)
    ours = quantize_rtn(w, LEGACY_FORMATS[qtype])
    ref = quants.quantize(w.numpy(), qtype)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_fit_decodes_like_packed_bytes(qtype: GGMLQuantizationType, kind: str) -> None:
    fmt, w = LEGACY_FORMATS[qtype], _data(kind)
    fit = fmt.fit(w)
    assert fit.scale.shape == fit.offset.shape == (w.shape[0], w.shape[1] // 32)
    assert fit.scale.dtype == fit.offset.dtype == torch.float32
    codes = fmt.codes(w, fit)
    assert codes.shape == w.shape and int(codes.min()) >= 0 and int(codes.max()) <= fmt.qmax
    ref = quants.dequantize(fmt.pack(codes, fit), qtype)
    assert torch.equal(dequant(codes, fit, fmt.group), torch.from_numpy(np.asarray(ref, np.float32)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_codes_column_by_column(qtype: GGMLQuantizationType, kind: str) -> None:
    fmt, w = LEGACY_FORMATS[qtype], _data(kind)
    fit = fmt.fit(w)
    whole = fmt.codes(w, fit)
    cols = [fmt.codes(w[:, j:j + 1], fit, torch.tensor([j])) for j in range(w.shape[1])]
    assert torch.equal(torch.cat(cols, 1), whole)
    part = torch.arange(20, 85)  # columns across block boundaries, and a permuted set (GPTQ's act order)
    assert torch.equal(fmt.codes(w[:, part], fit, part), whole[:, part])
    perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(0))
    assert torch.equal(fmt.codes(w[:, perm], fit, perm), whole[:, perm])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_shape_errors(qtype: GGMLQuantizationType) -> None:
    fmt = LEGACY_FORMATS[qtype]
    with pytest.raises(ValueError, match="multiple of 32"):
        fmt.fit(torch.randn(4, 40))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_rtn(torch.randn(4, 33), fmt)
    with pytest.raises(ValueError, match="2-D"):
        fmt.fit(torch.randn(64))
    w = torch.randn(4, 64)
    fit = fmt.fit(w)
    with pytest.raises(ValueError, match="does not match"):
        fmt.codes(w[:, :32], fit)
    with pytest.raises(ValueError, match="does not match"):
        fmt.codes(w[:, :3], fit, torch.arange(2))
    codes = fmt.codes(w, fit)
    with pytest.raises(ValueError, match="multiple of 32"):
        fmt.pack(codes[:, :40], fit)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_many_row_chunks(qtype: GGMLQuantizationType) -> None:
    """Matrices larger than one internal row chunk (2^18 weights) still match, whole and per column."""
    fmt, w = LEGACY_FORMATS[qtype], _data("outliers", n=1100, k=256)
    assert np.array_equal(quantize_rtn(w, fmt), quants.quantize(w.numpy(), qtype))
    fit = fmt.fit(w)
    whole = fmt.codes(w, fit)
    for j in (0, 31, 32, 200, 255):
        assert torch.equal(fmt.codes(w[:, j:j + 1], fit, torch.tensor([j])), whole[:, j:j + 1])
