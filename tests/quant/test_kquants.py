"""Q4_K / Q5_K / Q6_K quantizers: exact decode, small error, and the same bytes as llama.cpp's quantizer."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from leanlm.formats.gguf_file import GGUFFile
from leanlm.quant.blocks import dequant, quantize_rtn
from leanlm.quant.kquants import KQUANT_FORMATS

Q = GGMLQuantizationType
TYPES = [Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The fit is many small memory-bound ops: on a shared CPU, OpenMP's fork/join waits dominate (20x)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Heavy-tailed weights plus rows that hit the quantizers' corner cases (zero / flat / tiny groups)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(5, size=(rows, cols)) * 0.02).astype(np.float32)
    w[0, :256] = 0  # an all-zero super-block
    w[1, :16] *= 1e-4  # a group whose sub-scale rounds to 0: its codes come from the first search
    w[1, 40:48] *= 1e-3
    w[2, :32] = -0.01  # a constant negative group (max == min)
    w[3, :32] = 0.01  # a constant positive group (min clamps to 0)
    w[4, :256] *= 1e-30  # squares underflow
    w[5, 7] = 3.0  # an outlier
    w[6, :64] = np.round(w[6, :64] * 100)  # exact ties
    w[7, ::2] = 0
    return w


def _quantize(w: torch.Tensor, qtype: GGMLQuantizationType) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    fmt = KQUANT_FORMATS[qtype]
    fit = fmt.fit(w)
    codes = fmt.codes(w, fit)
    return dequant(codes, fit, fmt.group), codes, fmt.pack(codes, fit)


@pytest.mark.parametrize("qtype", TYPES)
def test_fit_decodes_exactly_like_the_packed_bytes(qtype: GGMLQuantizationType) -> None:
    w = torch.from_numpy(_weights(16, 768))
    ours, codes, raw = _quantize(w, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (16, 3 * GGML_QUANT_SIZES[qtype][1])
    assert torch.equal(ours, torch.from_numpy(quants.dequantize(raw, qtype)))
    fmt = KQUANT_FORMATS[qtype]
    fit = fmt.fit(w)
    cols = torch.tensor([100, 3, 700])  # GPTQ rounds a column at a time, in any order
    assert torch.equal(fmt.codes(w[:, cols], fit, cols), codes[:, cols])
    assert int(codes.max()) <= fmt.qmax
    with pytest.raises(ValueError, match="does not match"):
        fmt.codes(w[:, :256], fit)


def test_round_trip_error_is_small() -> None:
    """Relative RMSE on N(0, 1) weights, bounded by the uniform-rounding estimate step / sqrt(12).

    Q4_K/Q5_K: a group of 32 normals spans ~4.1 sigma, step = span / 15 or / 31 -> 0.079, 0.038.
    Q6_K: groups of 16, max |x| ~2.0 sigma, step = max / 32 -> 0.018. The searches only do better.
    """
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    err = {}
    for qtype in TYPES:
        ours = _quantize(w, qtype)[0]
        err[qtype] = float(((ours - w).pow(2).mean() / w.pow(2).mean()).sqrt())
    assert err[Q.Q6_K] < 0.02 and err[Q.Q5_K] < 0.04 and err[Q.Q4_K] < 0.08, err
    assert err[Q.Q6_K] < err[Q.Q5_K] < err[Q.Q4_K]


def test_rows_must_be_whole_super_blocks() -> None:
    with pytest.raises(ValueError, match="multiple of the 256"):
        KQUANT_FORMATS[Q.Q4_K].fit(torch.zeros(4, 576))


def test_get_format_returns_them() -> None:
    pytest.importorskip("leanlm.quant.legacy")
    from leanlm.quant.writable import get_format

    for qtype in TYPES:
        assert get_format(qtype) is KQUANT_FORMATS[qtype]


def _tiny_llama(path: Path, dim: int = 256, hidden: int = 512, layers: int = 2, vocab: int = 256,
                ) -> dict[str, np.ndarray]:
    """An F32 llama-architecture GGUF that llama.cpp's quantizer accepts; returns its 2-D weights."""
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,),
                                          "output.weight": (vocab, dim)}
    for i in range(layers):
        for name, shape in [("attn_norm", (dim,)), ("ffn_norm", (dim,)), ("attn_q", (dim, dim)),
                            ("attn_k", (dim, dim)), ("attn_v", (dim, dim)), ("attn_output", (dim, dim)),
                            ("ffn_gate", (hidden, dim)), ("ffn_up", (hidden, dim)), ("ffn_down", (dim, hidden))]:
            shapes[f"blk.{i}.{name}.weight"] = shape
    data = {}
    for seed, (name, shape) in enumerate(shapes.items()):
        data[name] = _weights(*shape, seed=seed) if len(shape) == 2 else np.ones(shape, np.float32)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(dim // 4)
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * vocab)
    for name, arr in data.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: v for k, v in data.items() if v.ndim == 2}


@pytest.mark.llamacpp
def test_bytes_match_llama_cpp(tmp_path: Path) -> None:
    """llama.cpp quantizes without an imatrix through quantize_row_q{4,5,6}_K_ref: we must write the same bytes."""
    llama_cpp = pytest.importorskip("llama_cpp")
    weights = _tiny_llama(tmp_path / "f32.gguf")
    seen: dict[GGMLQuantizationType, int] = {}
    for ftype in ("Q4_K_M", "Q5_K_M", "Q6_K"):  # the _M mixes also write Q6_K (attn_v, ffn_down, output)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.nthread = 1
        out = tmp_path / f"{ftype}.gguf"
        assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(out).encode(),
                                              ctypes.byref(params)) == 0
        f = GGUFFile(out)
        for name, info in f.tensors.items():
            if info.qtype not in KQUANT_FORMATS:
                continue
            ours = quantize_rtn(torch.from_numpy(weights[name]), KQUANT_FORMATS[info.qtype])
            theirs = np.asarray(f.raw(name)).reshape(ours.shape)
            assert np.array_equal(ours, theirs), f"{ftype} {name} ({info.qtype.name})"
            seen[info.qtype] = seen.get(info.qtype, 0) + 1
    assert set(seen) == set(TYPES) and sum(seen.values()) >= 40, seen
