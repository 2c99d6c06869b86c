"""The 8-bit K/V cache (kv_int8.py) and the decode attention over its codes (kernels/attend_int8.cpp)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import FIXTURES, needs_cpu
from helpers.tiny_models import random_transformer

from leanlm.errors import LeanLMError
from leanlm.kernels.plan import KernelPlan
from leanlm.model.cache import KVBuffer, ModelCache
from leanlm.model.kv_int8 import Int8KVBuffer, quantize_rows

needs_kernels = needs_cpu("vnni", "avx512", available=KernelPlan.resolve().int8_kv, reason="no AVX-512 VNNI/BF16 here")


def test_rows_quantize_to_codes_within_half_a_step() -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, 64, generator=g) * torch.rand(5, 3, 1, generator=g) * 10).bfloat16()
    x[2, 1] = 0  # a row of zeros: scale 0, codes 0
    codes, s = quantize_rows(x)
    assert codes.dtype == torch.int8 and s.shape == (5, 3)
    assert codes.abs().max() <= 127 and (codes.abs().amax(-1)[s > 0] == 127).all()
    assert s[2, 1] == 0 and (codes[2, 1] == 0).all()
    assert ((codes.float() * s[..., None] - x.float()).abs() <= s[..., None] / 2 + 1e-6).all()


def test_buffer_keeps_codes_and_views_dequantized_rows() -> None:
    """Random slots of a batch written through an int8 and a bf16 buffer: the int8 view is each row's
    quantize -> dequantize; the key byte of the module docstring's example lands where it says."""
    g = torch.Generator().manual_seed(1)
    pos = torch.zeros(2, 48, dtype=torch.long)
    rows = KVBuffer(2, 3, 48, 64, None, torch.bfloat16, pos)
    q8 = Int8KVBuffer(2, 3, 48, 64, None, torch.bfloat16, pos)
    for T in (5, 1, 3):
        slots = torch.stack([torch.randperm(48, generator=g)[:T] for _ in range(2)])
        k, v = torch.randn(2, 3, T, 64, generator=g).bfloat16(), torch.randn(2, 3, T, 64, generator=g).bfloat16()
        rows.write(slots, k, v)
        q8.write(slots, k, v)
    k, v = q8.view(40)
    for got, ref in ((k, rows.k[:, :, :40]), (v, rows.v[:, :, :40])):
        codes, s = quantize_rows(ref)
        assert torch.equal(got, (codes.float() * s[..., None]).bfloat16())
    codes, s = quantize_rows(rows.k)
    assert q8.k[1, 2, 2, 2, 5, 2] == codes[1, 2, 37, 10] + 128 and q8.k_scale[1, 2, 37] == s[1, 2, 37]


@needs_kernels
@pytest.mark.parametrize("int8", [False, True])
def test_cache_operators_write_and_read_the_same_bits_as_pytorch(int8: bool) -> None:
    """kernels/cache_ops.cpp against the PyTorch code it replaces: int8 and blocked bf16 buffers, random slots
    of a batch, head dims 64 and 256; the dequantized rows too."""
    g = torch.Generator().manual_seed(3)
    for hd in (64, 256):
        pos = torch.zeros(3, 32, dtype=torch.long)
        args = (3, 2, 32, hd, None, torch.bfloat16, pos)
        ours, ref = (Int8KVBuffer(*args, native=native) if int8 else KVBuffer(*args, blocked=True, native=native)
                     for native in (True, False))  # our operators, and the PyTorch code beside them
        for T in (7, 1, 2):
            slots = torch.stack([torch.randperm(32, generator=g)[:T] for _ in range(3)])
            k = torch.randn(3, T, 2, hd, generator=g).bfloat16().transpose(1, 2)  # (B, KV, T, hd) strided
            v = torch.randn(3, 2, T, hd, generator=g).bfloat16() * 5
            ours.write(slots, k, v)
            ref.write(slots, k, v)
            want = ref.view(29)
        assert all(torch.equal(a, b) for a, b in zip(ours.tensors(), ref.tensors()))
        assert all(torch.equal(a, b) for a, b in zip(ours.view(29), want))


def test_int8_cache_needs_our_kernels_and_says_why() -> None:
    m = random_transformer((None,), dim=128, n_heads=2, n_kv_heads=1, head_dim=64)
    with pytest.raises(LeanLMError, match="int8 K/V cache needs"):
        ModelCache(m.cfg, 1, 40, 6, torch.float32, kv="int8")  # fp32 compute
    with pytest.raises(LeanLMError, match="unknown K/V cache type"):
        ModelCache(m.cfg, 1, 40, 6, torch.bfloat16, kv="fp8")


@needs_kernels
@pytest.mark.parametrize(("B", "H", "KV", "T", "hd", "S"), [(2, 9, 3, 1, 64, 300), (3, 9, 3, 5, 64, 37),
                                                           (1, 4, 1, 3, 256, 33), (5, 6, 2, 1, 128, 90)])
def test_decode_attention_over_int8_codes(B: int, H: int, KV: int, T: int, hd: int, S: int) -> None:
    """The kernel's math: the query row quantized to int8 as the keys are, scores from the integer sums, values
    from the codes times p and each row's scale, in fp32. Against that written in PyTorch: the output's bf16
    rounding; against unquantized attention: the codes' error. Each row alike whatever T is and whichever
    rows share its task (speculative decoding's exactness)."""
    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, T, H, hd, generator=g).bfloat16().transpose(1, 2)
    size = -(-(S + 9) // 16) * 16
    k, v = (torch.randn(B, KV, size, hd, generator=g).bfloat16() for _ in range(2))
    buf = Int8KVBuffer(B, KV, size, hd, None, torch.bfloat16, torch.zeros(B, size, dtype=torch.long))
    buf.write(torch.arange(size).expand(B, size), k, v)
    mask = (torch.rand(B, T, S, generator=g) > 0.3)[:, None]
    mask[..., 0] = True
    if B > 1:
        mask[1, :, :, S // 2:] = False
    op = torch.ops.leanlm_native.attend_int8
    got = op(q, *buf.codes(S), mask, 0.125)
    (kc, ks), (vc, vs), (qc, qs) = quantize_rows(k[:, :, :S]), quantize_rows(v[:, :, :S]), quantize_rows(q)
    rep = H // KV

    def attention(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor) -> torch.Tensor:
        s = (qf @ kf.repeat_interleave(rep, 1).transpose(-1, -2)) * 0.125
        return torch.softmax(s.masked_fill(~mask, -torch.inf), -1) @ vf.repeat_interleave(rep, 1)

    ref = attention(*(c.double() * sc.double()[..., None] for c, sc in ((qc, qs), (kc, ks), (vc, vs))))
    assert ((got.double() - ref).abs() <= 2**-8 * (1 + ref.abs())).all()
    exact = attention(q.double(), k[:, :, :S].double(), v[:, :, :S].double())
    err = (got.double() - exact).abs()  # the codes' error, on unit Gaussian q, k, v
    assert err.max() < 0.05 and err.mean() < 0.02 * exact.abs().mean()
    assert torch.equal(op(q[:, :, -1:], *buf.codes(S), mask[:, :, -1:], 0.125), got[:, :, -1:])
    for b in range(B):
        one = [t[b:b + 1] for t in buf.codes(S)]
        assert torch.equal(op(q[b:b + 1], *one, mask[b:b + 1], 0.125), got[b:b + 1])


@needs_kernels
def test_real_model_with_int8_kv_keeps_quality(smol_path: Path) -> None:
    """SmolLM2 decoding over an int8 cache, teacher-forced on real text: perplexity within 1% of the fp32
    reference's, and the top token that of the bf16 cache's decode at 90% of positions or more (95% here;
    the misses are near-ties: over 567 tokens, perplexity 14.89 with int8, 14.94 with bf16, 14.86 in fp32)."""
    from test_compiled import decode

    import leanlm

    text = (FIXTURES / "calibration.txt").read_text()[:2000]
    llm = leanlm.load(smol_path, progress=False, kv_cache="int8")
    ids = llm.encode_prompt(text)[:160]
    x = torch.tensor([ids])
    step = llm.decode_step(1)
    logits = decode(llm.model, step, x, 32, len(ids), chunk=32)[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, x[0, 33:])
    ref_llm = leanlm.load(smol_path, dtype="float32", progress=False)
    ref = torch.nn.functional.cross_entropy(ref_llm.logits(ids)[32:-1], x[0, 33:])
    assert abs(nll.exp() / ref.exp() - 1) < 0.01, (nll.exp(), ref.exp())
    llm.model.kv_cache = "auto"
    bf16 = decode(llm.model, step, x, 32, len(ids), chunk=32)[0, :-1].float()
    assert (logits.argmax(-1) == bf16.argmax(-1)).float().mean() >= 0.9


@needs_kernels
@pytest.mark.parametrize("speculate", [False, True])
def test_serving_engine_on_an_int8_cache_equals_plain_greedy(speculate: bool) -> None:
    """A continuous batch over an int8 cache (rows joining and leaving, prefill chunks between decode steps,
    rolling buffers, verified blocks): every sequence gets the tokens greedy decoding alone gives it."""
    from test_serve_speculative import EOS, PROMPTS, run, tiny_llm

    from leanlm.llm import Speculation
    from leanlm.runtime.generate import generate_ids
    from leanlm.runtime.sampling import SamplingParams
    from leanlm.serve.engine import Engine

    llm = tiny_llm(dim=128, head_dim=64)
    llm.model.to(torch.bfloat16).kv_cache = "int8"
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=i % 2 == 0)
              for i, n in enumerate((50, 9, 70, 60, 33, 1))]
    want = [list(generate_ids(llm.model, p, lambda lg, h: lg.argmax(-1), sp.max_tokens, chunk=6,
                              stop_ids=frozenset() if sp.ignore_eos else frozenset({EOS})))
            for p, sp in zip(PROMPTS, params)]
    engine = Engine(llm, max_batch=3, max_len=100, chunk=6, speculation=Speculation(4, None, "lookup") if speculate
                    else None)
    assert engine.cache.layers[0].quantized
    assert run(engine, PROMPTS, params, late=2) == want
