"""Q4_K, Q5_K and Q6_K quantizers: llama.cpp's reference algorithms (no importance matrix), vectorised.

A super-block of 256 weights holds fp16 `d` (and `dmin`) plus per-group integer sub-scales:

    Q4_K / Q5_K   8 groups of 32   w = d*sc_j * q - dmin*m_j    sc, m 6-bit, q 4 / 5-bit
    Q6_K         16 groups of 16   w = d*sc_j * (q - 32)        sc int8,     q 6-bit

Fitting follows llama.cpp's `quantize_row_q{4,5,6}_K_ref`: per group, a weighted least-squares grid
search for (scale, min) (Q4_K/Q5_K) or an rmse-weighted search for a symmetric scale (Q6_K); then
the group scales are themselves quantized against the super-block's `d`, and the codes are rounded
again with the effective scales. We do the same float32 operations in the same order, over all
groups at once (layout (group size, groups), loops only over the search steps and the sequential
sums), so the packed bytes match llama.cpp's bit for bit. The work is many small memory-bound ops:
on a busy shared CPU, one torch thread is far faster than OpenMP's fork/join (20x in our tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType

from leanlm.quant.blocks import BlockFormat, Fit, expand

Q = GGMLQuantizationType
QK = 256  # weights per super-block
CHUNK = 1 << 18  # weights fitted per step: keeps the search's temporaries in cache
EPS = torch.tensor(1e-15, dtype=torch.float32)  # llama.cpp's GROUP_MAX_EPS


def _f32(v: float) -> torch.Tensor:
    """A float32 0-d tensor, so that `_f32(a) / t` is an IEEE division (Python `a / t` is a * (1/t))."""
    return torch.tensor(v, dtype=torch.float32)


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """(..., n, M) -> (..., M): sum over n in index order, like C's `for (i...) s += t[i]` (torch.sum reorders)."""
    acc = torch.zeros_like(t[..., 0, :])
    for i in range(t.shape[-2]):
        acc += t[..., i, :]
    return acc


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (torch's float32 sqrt kernel is off by an ulp at times)."""
    return t.double().sqrt().float()


def _qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qkx2_quants for every group: x, w (n, M) -> codes (n, M), scale (M,), min (M,).

    Fits x ~ scale * q + mn with q in 0..nmax, mn <= 0, minimising the w-weighted squared error over a
    grid of nstep + 1 inverse scales (each followed by a least-squares refit); returns -mn as the min.
    """
    mn = torch.where(x.amin(0) > 0, 0.0, x.amin(0))  # (M,)
    mx = x.amax(0)
    flat = mx == mn
    sum_w, sum_x = _seqsum(w), _seqsum(w * x)
    iscale = _f32(nmax) / (mx - mn)
    scale = _f32(1.0) / iscale
    L = torch.clamp(torch.round(iscale * (x - mn)), 0, nmax)  # (n, M)
    diff = scale * L + mn - x
    best = _seqsum(w * (diff * diff))
    buf = torch.empty(3, *x.shape)  # (3, n, M): w q, w q q, w q x, summed in one pass
    for i in range(nstep + 1):
        num = np.float32(rmin) + np.float32(rdelta) * np.float32(i) + np.float32(nmax)
        lq = torch.sub(x, mn).mul_(_f32(float(num)) / (mx - mn)).round_().clamp_(0, nmax)
        wl = torch.mul(w, lq, out=buf[0])
        torch.mul(wl, lq, out=buf[1])
        torch.mul(wl, x, out=buf[2])
        sl, sl2, sxl = _seqsum(buf)
        D = sum_w * sl2 - sl * sl
        this_scale = (sum_w * sxl - sum_x * sl) / D
        this_min = (sl2 * sum_x - sl * sxl) / D
        pos = this_min > 0
        this_min = torch.where(pos, 0.0, this_min)
        this_scale = torch.where(pos, sxl / sl2, this_scale)
        diff = (this_scale * lq).add_(this_min).sub_(x)
        err = _seqsum(diff.mul_(diff).mul_(w))  # w * diff^2
        better = (D > 0) & (err < best)
        L = torch.where(better, lq, L)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    return torch.where(flat, 0.0, L), torch.where(flat, 0.0, scale), -mn


def _qx(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qx_quants (rmse_type 1, weights x^2) for every group: x (n, M) -> codes, scale (M,).

    Symmetric: x ~ scale * (q - nmax), q in 0..2 nmax - 1, best of 19 inverse scales around -nmax / max.
    """
    at = x.abs().argmax(0, keepdim=True)  # first largest |x|, as C's strict `>` scan
    big = x.gather(0, at)[0]  # (M,) signed
    zero = big.abs() < EPS
    w = x * x
    wx = w * x

    def attempt(num: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lq = torch.clamp(torch.round(_f32(num) / big * x), -nmax, nmax - 1)
        return lq, _seqsum(wx * lq), _seqsum(w * lq * lq)

    L, sumlx, suml2 = attempt(-nmax)
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for i in [*range(-9, 0), *range(1, 10)]:
        lq, sumlx, suml2 = attempt(float(-(np.float32(nmax) + np.float32(0.1) * np.float32(i))))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better, lq, L)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, 0.0, L + nmax), torch.where(zero, 0.0, scale)


def _chunks(w: torch.Tensor, block: int) -> list[torch.Tensor]:
    """Row slices of fp32 (N, K) with about CHUNK weights each."""
    N, K = w.shape
    if K % block:
        raise ValueError(f"row length {K} is not a multiple of the {block}-weight super-block")
    rows = max(1, CHUNK // K)
    return [w[i:i + rows].float() for i in range(0, N, rows)]


def _per_column(w: torch.Tensor, fit: Fit, group: int, cols: torch.Tensor | None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, scale, offset) as fp32 (N, C): all K columns, or the fitted matrix's columns `cols` (C of them)."""
    n_cols = fit.scale.shape[1] * group if cols is None else len(cols)
    if w.ndim != 2 or w.shape != (fit.scale.shape[0], n_cols):
        raise ValueError(f"codes: w {tuple(w.shape)} does not match the fit ({fit.scale.shape[0]}, {n_cols})")
    if cols is None:
        return w.float(), expand(fit.scale, group), expand(fit.offset, group)
    g = torch.as_tensor(cols) // group
    return w.float(), fit.scale[:, g], fit.offset[:, g]


def _round_code(v: torch.Tensor, lo: int, hi: int, scale: torch.Tensor) -> torch.Tensor:
    """clamp(round(v), lo, hi) where the effective scale is nonzero, else 0 (those groups decode to their offset)."""
    return torch.where(scale != 0, torch.clamp(torch.round(v), lo, hi), 0.0)


@dataclass(frozen=True)
class _Q45K:
    """Q4_K / Q5_K: asymmetric groups of 32 with 6-bit sub-scales and sub-mins."""

    qtype: GGMLQuantizationType
    qmax: int
    rmin: float
    rdelta: float
    nstep: int
    group: int = 32
    block: int = QK

    def fit(self, w: torch.Tensor) -> Fit:
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("d", "dmin", "sc", "m", "L")}
        for wc in _chunks(w, QK):
            x = wc.reshape(-1, 32).T.contiguous()  # (32, M): one column per group
            av = _sqrt(_seqsum(x * x) / 32)
            L, scales, mins = _qkx2(x, av + x.abs(), self.qmax, self.rmin, self.rdelta, self.nstep)
            s8, m8 = scales.view(-1, 8), mins.view(-1, 8)  # (B, 8): groups of one super-block
            for s, key, dkey in ((s8, "sc", "d"), (m8, "m", "dmin")):
                top = s.amax(1, keepdim=True)
                top = torch.where(top > 0, top, 0.0)  # (B, 1)
                inv = torch.where(top > 0, _f32(63.0) / top, 0.0)
                q = torch.round(inv * s).to(torch.int32) & 0xFF  # C stores nearest_int in a uint8
                parts[key].append(torch.clamp(q, max=63).to(torch.uint8).view(wc.shape[0], -1))
                parts[dkey].append((top / 63).half().view(wc.shape[0], -1))
            parts["L"].append(L.T.reshape(wc.shape).to(torch.uint8))
        f = {k: torch.cat(v) for k, v in parts.items()}
        d, dmin = expand(f["d"].float(), 8), expand(f["dmin"].float(), 8)  # (N, K / 32)
        return Fit(scale=d * f["sc"], offset=-(dmin * f["m"]), fields=f)

    def codes(self, w: torch.Tensor, fit: Fit, cols: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 codes of w (N, K), or of the fitted matrix's columns `cols`: round((w - offset) / scale)."""
        x, scale, offset = _per_column(w, fit, self.group, cols)
        return _round_code((x - offset) / scale, 0, self.qmax, scale).to(torch.uint8)

    def pack(self, codes: torch.Tensor, fit: Fit) -> np.ndarray:
        N, K = codes.shape
        q = torch.where(expand(fit.scale, 32) == 0, fit.fields["L"], codes.to(torch.uint8)).view(-1, 4, 2, 32)
        sc, m = fit.fields["sc"].view(-1, 8), fit.fields["m"].view(-1, 8)  # (B, 8)
        scales = torch.cat([sc[:, :4] | (sc[:, 4:] >> 4 << 6), m[:, :4] | (m[:, 4:] >> 4 << 6),
                            (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)], 1)  # (B, 12)
        parts = [fit.fields["d"].reshape(-1, 1).view(torch.uint8), fit.fields["dmin"].reshape(-1, 1).view(torch.uint8),
                 scales]
        if self.qmax == 31:  # Q5_K: bit j of high-bit byte l = fifth bit of code l of group j
            hi = (q.reshape(-1, 8, 32) >> 4) << torch.arange(8, dtype=torch.uint8)[:, None]  # (B, 8, 32)
            parts.append(hi.sum(1, dtype=torch.uint8))
        parts.append(((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128))  # (B, 4 x 32)
        return torch.cat(parts, 1).reshape(N, -1).numpy()


@dataclass(frozen=True)
class _Q6K:
    """Q6_K: symmetric groups of 16 with int8 sub-scales."""

    qtype: GGMLQuantizationType = Q.Q6_K
    qmax: int = 63
    group: int = 16
    block: int = QK

    def fit(self, w: torch.Tensor) -> Fit:
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("d", "sc", "L")}
        for wc in _chunks(w, QK):
            x = wc.reshape(-1, 16).T.contiguous()  # (16, M)
            L, scales = _qx(x, 32)
            s16 = scales.view(-1, 16)  # (B, 16)
            top = s16.gather(1, s16.abs().argmax(1, keepdim=True))  # (B, 1) signed, first largest |scale|
            empty = top.abs() < EPS
            iscale = _f32(-128.0) / top
            sc = torch.clamp(torch.round(iscale * s16), max=127).to(torch.int32).to(torch.int8)
            parts["sc"].append(torch.where(empty, 0, sc).view(wc.shape[0], -1))
            parts["d"].append(torch.where(empty, 0.0, _f32(1.0) / iscale).half().view(wc.shape[0], -1))
            L = torch.where(empty.repeat_interleave(16, 0).view(1, -1), 0.0, L)
            parts["L"].append(L.T.reshape(wc.shape).to(torch.uint8))
        f = {k: torch.cat(v) for k, v in parts.items()}
        scale = expand(f["d"].float(), 16) * f["sc"]  # (N, K / 16)
        return Fit(scale=scale, offset=-32 * scale, fields=f)

    def codes(self, w: torch.Tensor, fit: Fit, cols: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 codes of w (N, K), or of the fitted matrix's columns `cols`: round(w / scale) + 32."""
        x, scale, _ = _per_column(w, fit, self.group, cols)
        return (_round_code(x / scale, -32, 31, scale) + torch.where(scale != 0, 32.0, 0.0)).to(torch.uint8)

    def pack(self, codes: torch.Tensor, fit: Fit) -> np.ndarray:
        N, K = codes.shape
        q = torch.where(expand(fit.scale, 16) == 0, fit.fields["L"], codes.to(torch.uint8)).view(-1, 2, 4, 32)
        ql = (q[:, :, :2] & 0xF) | ((q[:, :, 2:] & 0xF) << 4)  # (B, 2, 2, 32): half, byte pair, byte
        qh = ((q >> 4) << torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]).sum(2, dtype=torch.uint8)
        parts = [ql.reshape(-1, 128), qh.reshape(-1, 64), fit.fields["sc"].reshape(-1, 16).view(torch.uint8),
                 fit.fields["d"].reshape(-1, 1).view(torch.uint8)]
        return torch.cat(parts, 1).reshape(N, -1).numpy()


KQUANT_FORMATS: dict[GGMLQuantizationType, BlockFormat] = {
    Q.Q4_K: _Q45K(Q.Q4_K, qmax=15, rmin=-1.0, rdelta=0.1, nstep=20),
    Q.Q5_K: _Q45K(Q.Q5_K, qmax=31, rmin=-0.5, rdelta=0.1, nstep=15),
    Q.Q6_K: _Q6K(),
}
