"""Our own C kernels (native.py) against exact float math, and the fallback to PyTorch's kernels."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from helpers import needs_cpu

from leanlm.kernels import build as native
from leanlm.kernels.plan import KernelPlan

PLAN = KernelPlan.resolve()  # this machine's kernels under the environment's switches


@pytest.fixture()
def amx_switch():  # noqa: ANN201
    """Switches AMX tiles off and on for the process (kernels/amx.cpp), and back on after the test."""
    yield torch.ops.leanlm_native.amx_allow
    torch.ops.leanlm_native.amx_allow(True)


def reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (x.double() @ codes.double().T) * scales.double()


# m: tails of the 4-row tiles, and beyond MAX_ROWS the fallback to PyTorch's kernel (which needs an even k);
# k: a multiple of the vector width and an odd size
@pytest.mark.parametrize(("m", "k"), [(1, 576), (3, 576), (4, 576), (9, 576), (1, 37), (9, 37),
                                      (native.MAX_ROWS + 1, 576)])
@pytest.mark.parametrize("vnni", ["1", "0"])
def test_int8_matmul_is_exact_float_math(m: int, k: int, vnni: str) -> None:
    """fp32 math, or with VNNI (where the CPU has it) exact integer math on activations quantised per row."""
    plan = KernelPlan.resolve(env={"LEANLM_VNNI": vnni})
    g = torch.Generator().manual_seed(k + m)
    codes = torch.randint(-127, 128, (1000, k), dtype=torch.int8, generator=g)
    scales = (torch.rand(1000, generator=g) / 50).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    kernel = 0 if not plan.c_kernels else 2 if plan.vnni_head else 1  # as Int8Linear.use_plan chooses
    got = native.int8_matmul(x, codes, scales, kernel)
    ref = reference(x, codes, scales)
    if plan.vnni_head and m <= native.MAX_ROWS:  # x rounded to int16 with one scale per row, then exact
        d = x.float().abs().amax(1, keepdim=True) / 32767  # in fp32, as the kernel does
        ref = reference(torch.round(x.float() / d).double() * d.double(), codes, scales)
    assert got.dtype == torch.float32 and got.shape == (m, 1000)
    # fp32 accumulation over k products: relative to the size of the terms, not of the (cancelling) sum
    scale = (x.double().abs() @ codes.double().abs().T) * scales.double()
    tol = 1e-5 if m <= native.MAX_ROWS else 1e-2  # PyTorch's kernel rounds its output to bf16
    assert ((got.double() - ref).abs() / scale).max().item() < tol


def test_native_library_builds_here() -> None:
    """This machine has a C compiler: the kernels must build (a silent fallback would hide a slow path), and
    the VNNI head is used wherever the CPU has AVX-512 VNNI."""
    assert native.library() is not None
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert PLAN.c_kernels and PLAN.vnni_head == (" avx512_vnni" in flags and " avx512bw" in flags)


def test_the_plan_reads_the_switches_and_keys_what_they_choose() -> None:
    """kernels/plan.py: one place reads every LEANLM_* kernel switch; the key covers what chooses a layout or a
    route (not whether loaded models are saved); off the CPU, or with LEANLM_NATIVE=0, PyTorch runs everything."""
    off = KernelPlan.resolve(env={"LEANLM_NATIVE": "0", "LEANLM_WEIGHT_CACHE": "0"})
    assert off == KernelPlan(weight_cache=False)
    assert off.key() == KernelPlan.resolve(env={"LEANLM_NATIVE": "0"}).key() != PLAN.key()
    assert KernelPlan.resolve("meta") == KernelPlan(device="meta")
    assert not KernelPlan.resolve(env={"LEANLM_BLOCKED_KEYS": "0"}).blocked_keys
    assert not KernelPlan.resolve(env={"LEANLM_NATIVE_STEP": "0"}).native_step
    assert KernelPlan.resolve(env={"LEANLM_VNNI": "0"}).int4_vnni is False


@pytest.mark.parametrize(("n", "k", "mults", "g"), [(128, 96, (1.0,), 32), (192, 64, (1.0, 16.0), 32),
                                                    (64, 64, (1.0, 8.0), 16), (64, 64, (1.0, 0.0, 16.0), 16)])
def test_int4_dense_unpacks_the_kernel_layout(n: int, k: int, mults: tuple[float, ...], g: int) -> None:
    """The dense bf16 weight an Int4Linear unpacks for prefill is its exact weight, rounded once to bf16; one
    plane or several (wider formats), groups of 32 or 16; and prefill-sized inputs use it."""
    from leanlm.quant.int4 import DENSE_ROWS, Int4Linear, Int4Parts

    gen = torch.Generator().manual_seed(n + len(mults))
    kp = k * len(mults)
    # dyadic scales and zeros: exact in both layouts' fp16 / bf16 and in zero - 8 * scale
    scale = torch.randint(1, 16, (n, kp // 32), generator=gen) / 128
    zero = torch.randint(-16, 16, (n, kp // 32), generator=gen) / 64 + 8 * scale
    parts = Int4Parts(torch.randint(0, 16, (n, kp), generator=gen), scale, zero, g, mults)
    lin = Int4Linear(parts)
    exact = parts.dense()
    if PLAN.c_dense:  # our C unpacking of torch's layout (only where it reads this torch's layout)
        assert torch.equal(lin.dense_bf16(), exact.to(torch.bfloat16))
    else:  # torch packs another layout on this CPU: prefill stays on torch's int4 kernel
        assert lin.dense_bf16() is None
    x = torch.randn(DENSE_ROWS, k, generator=gen).bfloat16()
    ref = x.double() @ exact.double().T
    terms = x.double().abs() @ exact.double().abs().T  # the size of what is summed
    for rows in (x, x[:3]):  # the dense path and the int4 kernel agree with exact math (bf16 rounding)
        got = lin(rows).double()
        assert ((got - ref[:len(rows)]).abs() / terms[:len(rows)]).max().item() < 0.01


def test_c_dense_only_where_it_reads_torchs_layout() -> None:
    """torch packs int4 weights in a layout chosen by the CPU it runs on; the plan turns the C unpacking on only
    where a probe matrix comes back exact (on AVX2 torch's layout differs and prefill went wrong)."""
    assert PLAN.c_dense == native.int4_dense_matches_torch()


def test_loading_the_kernels_keeps_subnormal_floats() -> None:
    """Our library must not switch the process to flush-to-zero (what linking with -ffast-math does)."""
    import numpy as np

    native.library()
    tiny = np.array([1e-310])  # a subnormal double
    assert (tiny * 1.0)[0] != 0 and (tiny / 2)[0] != 0


# --- 4-bit weights on VNNI (kernels/int4_vnni.cpp) --------------------------------------------------------------
needs_vnni = needs_cpu("vnni", available=PLAN.int4_vnni, reason="no AVX-512 VNNI here (PyTorch's int4 kernel runs)")


def test_int4_vnni_is_used_where_the_cpu_has_it() -> None:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert PLAN.int4_vnni == (" avx512_vnni" in flags and " avx512bw" in flags)


def _vnni_linear(n: int, k: int, planes: int, seed: int, bits: int = 4):  # noqa: ANN202
    from leanlm.quant.int4 import Int4Linear, Int4Parts

    gen = torch.Generator().manual_seed(seed)
    kp = k * planes
    scale = (torch.rand(n, kp // 32, generator=gen) / 10 + 1e-3).half().float()
    mins = (torch.randn(n, kp // 32, generator=gen) / 10).half().float()
    codes = torch.randint(0, 2**bits, (n, kp), generator=gen)
    wide = (codes, scale, mins) if bits > 4 else None  # one plane of wider codes (Q5_0, Q8_0...)
    parts = Int4Parts(codes, scale, mins + 8 * scale, 32, (1.0,) * planes, wide)
    lin = Int4Linear(parts)
    assert lin.planes == planes and lin.bits == bits  # our layout
    # the weight the kernel holds: q * s + b with fp16 s and b = zero - 8 s (exact here), planes summed
    w = (codes.float().view(n, -1, 32) * scale[..., None] + mins[..., None]).view(n, k // 32, planes, 32)
    return lin, w.sum(2).reshape(n, k)


# n: whole tiles of 16 outputs and padded ones; k: 1 to 20 groups; m: the 4-row tiles and their tails
@needs_vnni
@pytest.mark.parametrize(("n", "k", "planes", "bits"), [(48, 512, 1, 4), (40, 576, 1, 4), (24, 640, 1, 4),
                                                       (16, 32, 1, 4), (7, 96, 1, 4), (32, 576, 2, 4),
                                                       (48, 576, 1, 5), (40, 96, 1, 6), (32, 640, 1, 8)])
@pytest.mark.parametrize("m", [1, 3, 4, 7, 40])  # 40: activations quantised on the thread pool, 16+ rows a piece
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_vnni_is_exact_integer_math(n: int, k: int, planes: int, bits: int, m: int, dtype: torch.dtype) -> None:
    """x quantised to int8 per group of 32 (x' = round(x * 127 / amax) * amax / 127), then x' W^T exactly;
    bf16 activations are read as they are (no copy). Codes of 4 bits, or 5 to 8 (extra bit planes)."""
    lin, w = _vnni_linear(n, k, planes, n + k + m, bits)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    xg = x.float().view(m, -1, 32)
    amax = xg.abs().amax(-1, keepdim=True)
    inv = torch.full_like(amax, 127) / amax  # IEEE division, as the kernel does (127 / amax is 127 * 1 / amax)
    xq = (torch.round(xg * inv) * (amax / 127)).view(m, k)
    got = lin(x).float()
    ref = xq.double() @ w.double().T
    terms = xq.double().abs() @ w.double().abs().T
    out_rounding = 2**-8 * ref.abs() if dtype == torch.bfloat16 else 0  # the output is cast back to x's dtype
    assert got.shape == (m, n) and ((got.double() - ref).abs() - out_rounding <= 1e-5 * terms).all()


@needs_vnni
def test_int4_vnni_dense_and_fused_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dense bf16 weight is the held weight rounded once; fused modules compute their parts side by
    side, on the kernel and on the dense path."""
    from leanlm.quant import int4
    from leanlm.quant.int4 import DENSE_ROWS, Int4Linear

    monkeypatch.setattr(int4, "VNNI_DENSE_ROWS", DENSE_ROWS)

    a, wa = _vnni_linear(64, 576, 2, 1)
    b, wb = _vnni_linear(32, 576, 2, 2)
    assert torch.equal(a.dense_bf16(), wa.to(torch.bfloat16))
    both = Int4Linear.cat([a, b])
    x = torch.randn(DENSE_ROWS + 1, 576)
    assert torch.equal(both(x[:5]), torch.cat([a(x[:5]), b(x[:5])], -1))  # the int4 kernel: exact
    # prefill's dense path: torch's bf16 matmul, whose blocking (AMX tiles once the process may use them) can
    # sum a column in another order for another width: equal up to the bf16 output's rounding
    sep, fused = torch.cat([a(x), b(x)], -1).float(), both(x).float()
    assert ((fused - sep).abs() <= 2**-7 * sep.abs() + 1e-5 * sep.abs().max()).all()
    ref = x.bfloat16().double() @ torch.cat([wa, wb]).bfloat16().double().T
    assert ((both(x).double() - ref).abs().max() / ref.abs().max()).item() < 1e-2


# --- few-query attention (kernels/attention.cpp) ----------------------------------------------------------------
@pytest.mark.avx512
@pytest.mark.skipif(not PLAN.attention, reason="no AVX-512 BF16 here (the fp32 reductions in model.py run)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("B", "H", "KV", "T", "hd", "S"), [(2, 9, 3, 5, 64, 300), (1, 4, 1, 3, 256, 33),
                                                           (1, 4, 2, 2, 128, 7), (1, 2, 2, 1, 48, 20)])
def test_attention_operator_is_the_reference_math(dtype: torch.dtype, B: int, H: int, KV: int, T: int, hd: int,
                                                   S: int) -> None:
    """Softmax attention over the allowed keys (grouped-query heads, cache views with spare slots), and each
    query row computed alike whatever T is (speculative decoding's exactness)."""
    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, T, H, hd, generator=g).to(dtype).transpose(1, 2)  # (B, H, T, hd) strided, as the model has it
    k, v = (torch.randn(B, KV, S + 9, hd, generator=g).to(dtype)[:, :, :S] for _ in range(2))
    mask = (torch.rand(B, T, S, generator=g) > 0.3)[:, None]
    mask[..., 0] = True
    got = torch.ops.leanlm_native.attend(q, k, v, mask, 0.125)
    qg = q.float().reshape(B, KV, H // KV, T, hd)
    s = ((qg[..., None, :] * k.float()[:, :, None, None]).sum(-1) * 0.125).masked_fill(~mask[:, :, None], -torch.inf)
    ref = (torch.softmax(s, -1)[..., None] * v.float()[:, :, None, None]).sum(-2).reshape(B, H, T, hd)
    tol = 1e-5 if dtype == torch.float32 else 2**-8  # bf16: the output's rounding
    assert ((got.float() - ref).abs() <= tol * (1 + ref.abs())).all()
    last = torch.ops.leanlm_native.attend(q[:, :, -1:], k, v, mask[:, :, -1:], 0.125)
    assert torch.equal(last, got[:, :, -1:])


# --- prompt attention (kernels/flash.cpp) ------------------------------------------------------------------------
@pytest.mark.avx512
@pytest.mark.skipif(not PLAN.flash, reason="no AVX-512 BF16 here (SDPA runs)")
@pytest.mark.parametrize(("B", "H", "KV", "T", "hd", "S", "window", "rolling"),
                         [(1, 4, 1, 100, 256, 300, 64, False), (2, 9, 3, 37, 64, 70, None, False),
                          (1, 8, 2, 33, 128, 33, None, False), (1, 4, 4, 20, 96, 41, 7, False),
                          (1, 4, 1, 50, 256, 48, 16, True)])
def test_prompt_attention_operator_is_the_reference_math(B: int, H: int, KV: int, T: int, hd: int, S: int,
                                                         window: int | None, rolling: bool) -> None:
    """Softmax attention over the keys the mask allows, for many queries: causal and windowed masks, a rolling
    buffer (slots out of position order), grouped-query heads, blocks cut at T and S, a second sequence whose
    keys are all masked for some queries (which get zeros), strided queries and cache views."""
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, T, H, hd, generator=g).bfloat16().transpose(1, 2)  # (B, H, T, hd) strided
    k, v = (torch.randn(B, KV, S + 5, hd, generator=g).bfloat16()[:, :, :S] for _ in range(2))
    qpos = torch.arange(200, 200 + T)
    kpos = torch.arange(200 + T - S, 200 + T)
    if rolling:  # slot s holds the position p with p % S == s
        kpos = kpos[torch.argsort(kpos % S)]
    mask = (kpos[None] <= qpos[:, None]) & ((qpos[:, None] - kpos[None] < window) if window else True)
    mask = mask[None, None].repeat(B, 1, 1, 1)
    if B > 1:
        mask[1, :, : T // 2] = False
    got = torch.ops.leanlm_native.flash_attend(q, k, v, mask, hd**-0.5)
    rep = H // KV
    s = (q.float() @ k.float().repeat_interleave(rep, 1).transpose(-1, -2)) * hd**-0.5
    p = torch.softmax(s.masked_fill(~mask, -torch.inf), -1).nan_to_num(0.0)
    ref = p @ v.float().repeat_interleave(rep, 1)
    assert got.shape == ref.shape
    assert ((got.float() - ref).abs() <= 2**-8 * (1 + ref.abs())).all()  # bf16: the output's and p's rounding


@needs_vnni
@pytest.mark.parametrize("bits", [4, 5, 8])
def test_int4_vnni_layout_unpacks_and_widens(bits: int) -> None:
    """The layout's inverse gives the codes back; modules of different widths fuse into the widest."""
    from leanlm.quant.int4 import Int4Linear, vnni_pack, vnni_unpack

    codes = torch.randint(0, 2**bits, (48, 96), generator=torch.Generator().manual_seed(bits))
    assert torch.equal(vnni_unpack(vnni_pack(codes, bits), 96), codes.to(torch.uint8))
    a, wa = _vnni_linear(32, 576, 1, 1, bits)
    b, wb = _vnni_linear(16, 576, 1, 2, 8)
    both = Int4Linear.cat([a, b])
    x = torch.randn(3, 576)
    assert both.bits == 8 and torch.equal(both(x), torch.cat([a(x), b(x)], -1))
    assert torch.equal(both.dense_bf16(), torch.cat([wa, wb]).to(torch.bfloat16))


@needs_vnni
def test_int4_vnni_rows_do_not_depend_on_their_company() -> None:
    """A row's output is the same bits alone or among others (a speculative block scores like single steps)."""
    lin, _ = _vnni_linear(96, 576, 1, 3)
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(5)).bfloat16()
    together = lin(x)
    for i in (0, 4, 8):
        assert torch.equal(lin(x[i:i + 1]), together[i:i + 1])


@pytest.mark.amx
@pytest.mark.skipif(not PLAN.amx, reason="no AMX here (or not granted to this process)")
@pytest.mark.parametrize(("n", "k", "bits"), [(48, 576, 4), (40, 640, 5), (32, 96, 6), (32, 640, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amx_tiles_score_exactly_like_the_vnni_loops(n: int, k: int, bits: int, dtype: torch.dtype,
                                                      amx_switch: Callable[[bool], None]) -> None:
    """Prompts and batches of 32 rows or more take AMX tiles (kernels/amx.cpp): every row must be the same bits as
    on the VNNI loops (a prompt's last row and a decode step score alike), whatever the row count's remainder."""
    lin, _ = _vnni_linear(n, k, 1, n + k, bits)
    x = torch.randn(95, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    for m in (32, 33, 47, 64, 79, 95):
        amx_switch(False)
        ref = lin(x[:m])
        amx_switch(True)
        assert torch.equal(lin(x[:m]), ref)


@pytest.mark.amx
@pytest.mark.skipif(not PLAN.amx, reason="no AMX here (or not granted to this process)")
def test_amx_tiles_with_16_wide_scales(amx_switch: Callable[[bool], None]) -> None:
    """Q6_K's half-group scales on AMX: two products per group, the same bits as the VNNI loops."""
    from leanlm.quant.int4 import Int4Linear, Int4Parts

    n, k = 48, 320
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 64, (n, k), generator=gen)
    scale = (torch.rand(n, k // 16, generator=gen) / 10 + 1e-3).half().float()
    planes = torch.zeros(n, 2 * k, dtype=torch.long)
    lin = Int4Linear(Int4Parts(planes, torch.ones(n, k // 16), torch.zeros(n, k // 16), 16, (1.0, 8.0),
                               (codes, scale, (-32 * scale).half().float())))
    x = torch.randn(77, k, generator=gen).bfloat16()
    amx_switch(False)
    ref = lin(x)
    amx_switch(True)
    assert torch.equal(lin(x), ref)


@pytest.mark.vnni
@pytest.mark.skipif(not PLAN.int8_head, reason="no AVX-512 VNNI here (native.int8_matmul runs)")
@pytest.mark.parametrize(("m", "k"), [(1, 576), (3, 640), (5, 64), (9, 576)])
def test_int8_head_is_exact_integer_math(m: int, k: int) -> None:
    """The tiled head: x quantised to int8 per group of 32 (as the int4 kernel does), then exact products
    with the int8 codes, times the row scales; rows do not depend on their company."""
    from leanlm.quant.int8 import Int8Linear

    g = torch.Generator().manual_seed(k + m)
    codes = torch.randint(-127, 128, (96, k), dtype=torch.int8, generator=g)
    scales = (torch.rand(96, generator=g) / 50).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    head = Int8Linear(codes.clone(), scales)
    assert head.tiled
    xg = x.float().view(m, -1, 32)
    amax = xg.abs().amax(-1, keepdim=True)
    xq = (torch.round(xg * (torch.full_like(amax, 127) / amax)) * (amax / 127)).view(m, k)
    ref = reference(xq, codes, scales)
    got = head(x)
    scale = (xq.double().abs() @ codes.double().abs().T) * scales.double()
    assert got.dtype == torch.float32 and ((got.double() - ref).abs() / scale).max().item() < 1e-6
    assert torch.equal(head(x[-1:]), got[-1:])


@needs_vnni
@pytest.mark.parametrize("m", [1, 6])
def test_int4_vnni_16_wide_scales(m: int) -> None:
    """6-bit codes with a scale and minimum per 16 inputs (Q6_K's sub-blocks): exact products on x quantised per
    32, and the dense weight for prefill."""
    from leanlm.quant.int4 import Int4Linear, Int4Parts

    n, k = 48, 320
    gen = torch.Generator().manual_seed(m)
    codes = torch.randint(0, 64, (n, k), generator=gen)
    scale = (torch.rand(n, k // 16, generator=gen) / 10 + 1e-3).half().float()
    mins = (-32 * scale).half().float()
    planes = torch.zeros(n, 2 * k, dtype=torch.long)  # the PyTorch-kernel form is not used here
    lin = Int4Linear(Int4Parts(planes, torch.ones(n, k // 16), torch.zeros(n, k // 16), 16, (1.0, 8.0),
                               (codes, scale, mins)))
    assert lin.planes == 1 and lin.bits == 6
    w = (codes.float().view(n, -1, 16) * scale[..., None] + mins[..., None]).view(n, k)
    assert torch.equal(lin.dense_bf16(), w.to(torch.bfloat16))
    x = torch.randn(m, k, generator=gen)
    xg = x.view(m, -1, 32)
    amax = xg.abs().amax(-1, keepdim=True)
    xq = (torch.round(xg * (torch.full_like(amax, 127) / amax)) * (amax / 127)).view(m, k)
    ref, terms = xq.double() @ w.double().T, xq.double().abs() @ w.double().abs().T
    assert ((lin(x).double() - ref).abs() <= 1e-5 * terms).all()


# --- row operators (kernels/rowops.cpp) ----------------------------------------------------------------------
@pytest.mark.avx512
@pytest.mark.skipif(not PLAN.argmax, reason="no AVX-512 here (torch.argmax runs)")
@pytest.mark.parametrize("V", [1, 17, 49152, 262147])
def test_argmax_operator_is_torch_argmax(V: int) -> None:
    """Greedy decoding's choice: the first maximum on ties (within and across lanes, in the tail past the
    last 16), rows of -inf, and rows with a NaN as torch.argmax has them."""
    from leanlm.runtime.sampling import argmax

    g = torch.Generator().manual_seed(V)
    x = torch.randn(6, V, generator=g)
    x[1] = -torch.inf
    x[2] = x[2].round()  # many ties at the maximum
    x[3, V // 2] = x[3, V - 1] = 100.0
    x[4, V - 1] = 100.0
    x[5, V // 3] = torch.nan
    assert torch.equal(argmax(x), x.argmax(-1))
    assert torch.equal(torch.ops.leanlm_native.argmax(x), x.argmax(-1))


@pytest.mark.avx512
@pytest.mark.skipif(not PLAN.row_ops, reason="no AVX-512 BF16 here (model.py's PyTorch ops run)")
def test_row_operators_match_pytorch() -> None:
    """rms_norm and gated activations on bf16 rows: the fp32 (norm) and float64 (activations) results rounded
    once per op, to within one bf16 step (the sum's order, rsqrt and exp differ in the last fp32 bit)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 640, generator=gen) * 3).bfloat16()
    w = torch.randn(640, generator=gen)
    ref = F.rms_norm(x.float(), (640,), w, 1e-6)
    got = torch.ops.leanlm_native.rms_norm(x, w, 1e-6)
    assert got.dtype == torch.bfloat16 and ((got.float() - ref).abs() <= 2**-7 * ref.abs() + 1e-6).all()
    g, u = (torch.randn(2, 5, 2048, generator=gen) * 4).bfloat16().unbind(0)
    for kind, act in ((0, F.silu), (1, lambda t: F.gelu(t, approximate="tanh"))):
        ref = (act(g.double()).bfloat16().float() * u.float())
        got = torch.ops.leanlm_native.gated(g, u, kind).float()
        assert ((got - ref).abs() <= 2**-7 * ref.abs() + 1e-6).all(), kind
