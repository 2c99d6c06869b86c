"""Legacy GGUF block formats: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (blocks of 32 weights, one d or (d, m) per block).

Each format reproduces llama.cpp's reference quantizer (`quantize_row_q4_0_ref`, ...), vectorised over all
blocks with torch. Decoding, with unsigned codes q in 0..qmax:

    Q8_0  w = d * (q - 128)       (stored as int8 q - 128)
    Q4_0  w = d * (q - 8)         Q5_0  w = d * (q - 16)
    Q4_1  w = d * q + m           Q5_1  w = d * q + m

with d, m stored as fp16. `Fit.scale`/`Fit.offset` are those decode values in fp32 (d16, -128 d16 / -8 d16 /
-16 d16 / m16), so `scale * code + offset` is exactly what the packed block decodes to.

Exact rounding: llama.cpp rounds with id = 1/d of the *unrounded* fp32 d (and, for Q4_1/Q5_1, subtracts the
unrounded fp32 min), e.g. Q4_0 `q = min(15, (int)(x * id + 8.5))`. That is not a function of the fp16 scale:
using 1/d16 instead changes ~0.8% of Q8_0 codes and ~0.04% of Q4_0 codes on normal data. So `fit` keeps the
unrounded `inv` and `lo` per block in `Fit.fields` and `codes` rounds with them: `quantize_rtn` equals
`gguf.quants.quantize` bit for bit, and rounding column by column (GPTQ) gives the codes of the whole matrix.

`Fit.fields`: d (fp16), m (fp16, Q4_1/Q5_1), inv and lo (fp32, unrounded 1/d and min).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from leanlm.quant.blocks import Fit

_BLOCK = 32
# roundf(a) for a >= 0 is floor(a + h) with h the float just below 0.5: the fp32 sum reaches the next integer
# exactly when a >= n + 0.5 (with h = 0.5 itself, a = 0.49999997 would round up to 1).
_HALF_DOWN = 0.5 - 2.0**-25


def _row_chunks(n: int, k: int) -> list[slice]:
    """Row slices of about 2^18 elements."""
    step = max(1, (1 << 18) // max(k, 1))
    return [slice(r, r + step) for r in range(0, n, step)]


class LegacyFormat:
    """One legacy block format; see the module docstring."""

    group = _BLOCK
    block = _BLOCK

    def __init__(self, qtype: GGMLQuantizationType, bits: int, with_min: bool) -> None:
        self.qtype = qtype
        self.bits = bits
        self.with_min = with_min  # Q4_1/Q5_1: d and m; else symmetric d only
        self.qmax = (1 << bits) - 1
        self.zero = 0 if with_min else 1 << (bits - 1)  # code of w == 0 for symmetric formats (Q8_0: 128)

    # -- fit ---------------------------------------------------------------------------------------------------

    def _blocks(self, w: torch.Tensor) -> torch.Tensor:
        if w.ndim != 2 or w.shape[1] % _BLOCK:
            raise ValueError(f"{self.qtype.name} needs a 2-D weight with a multiple of {_BLOCK} columns, "
                             f"got shape {tuple(w.shape)}")
        return w.float().reshape(w.shape[0], -1, _BLOCK)  # (N, G, 32)

    def fit(self, w: torch.Tensor) -> Fit:
        """Per-block d (and m) as llama.cpp's reference quantizer chooses them."""
        x = self._blocks(w)
        d, lo = torch.empty(x.shape[:2]), torch.zeros(x.shape[:2])  # (N, G)
        for rows in _row_chunks(w.shape[0], w.shape[1]):
            xc = x[rows]
            if self.with_min:
                mn, mx = xc.aminmax(dim=-1)
                lo[rows] = mn
                torch.div(mx - mn, self.qmax, out=d[rows])
            elif self.bits == 8:
                torch.div(xc.abs().amax(-1), 127, out=d[rows])
            else:  # signed value of largest magnitude (first one on ties), mapped to code 0
                big = xc.gather(-1, xc.abs().argmax(-1, keepdim=True)).squeeze(-1)
                torch.div(big, -self.zero, out=d[rows])
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        d16 = d.half()
        scale = d16.float()
        fields = {"d": d16, "inv": inv, "lo": lo}
        if self.with_min:
            fields["m"] = lo.half()
            offset = fields["m"].float()
        else:
            offset = scale * -self.zero
        return Fit(scale=scale, offset=offset, fields=fields)

    # -- codes -------------------------------------------------------------------------------------------------

    def codes(self, w: torch.Tensor, fit: Fit, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (uint8, 0..qmax) of `w` (N, K), or of the columns `cols` of the fitted matrix when given."""
        inv, lo = fit.fields["inv"], fit.fields["lo"]  # (N, G) unrounded
        if cols is not None:
            if w.ndim != 2 or w.shape != (inv.shape[0], len(cols)):
                raise ValueError(f"{self.qtype.name} codes: w {tuple(w.shape)} does not match {len(cols)} columns")
            g = cols // _BLOCK
            return self._round(w.float(), inv[:, g], lo[:, g]).to(torch.uint8)
        x = self._blocks(w)  # (N, G, 32)
        if x.shape[:2] != inv.shape:
            raise ValueError(f"{self.qtype.name} codes: w {tuple(w.shape)} does not match the fit {tuple(inv.shape)}")
        out = torch.empty(x.shape, dtype=torch.uint8)
        for rows in _row_chunks(*w.shape):  # small temporaries: cache-resident, no page faults
            out[rows] = self._round(x[rows], inv[rows, :, None], lo[rows, :, None])
        return out.view(w.shape)

    def _round(self, w: torch.Tensor, inv: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        """llama.cpp's rounding, fp32 operation by operation (no fused multiply-add), in place after one product."""
        if self.bits == 8:  # roundf(v), half away from zero: see _HALF_DOWN
            v = w * inv
            q = v.abs().add_(_HALF_DOWN).floor_().copysign_(v).add_(self.zero)
        elif self.with_min:
            q = (w - lo).mul_(inv).add_(0.5).trunc_()
        else:
            q = (w * inv).add_(self.zero + 0.5).trunc_()
        return q.clamp_(0, self.qmax)

    # -- pack --------------------------------------------------------------------------------------------------

    def pack(self, codes: torch.Tensor, fit: Fit) -> np.ndarray:
        """(N, K) codes + fit -> (N, K // 32 * block_bytes) uint8 in the GGUF block layout."""
        blocked = codes.ndim == 2 and codes.shape[1] % _BLOCK == 0
        if not blocked or tuple(fit.scale.shape) != (codes.shape[0], codes.shape[1] // _BLOCK):
            raise ValueError(f"{self.qtype.name} pack: codes {tuple(codes.shape)} do not fit scales "
                             f"{tuple(fit.scale.shape)} (K must be a multiple of {_BLOCK})")
        n, g = fit.scale.shape
        q = codes.to(torch.uint8).reshape(n, g, _BLOCK)

        def f16(t: torch.Tensor) -> torch.Tensor:  # (N, G) fp16 -> (N, G, 2) little-endian bytes
            return t.half().contiguous().view(torch.uint8).reshape(n, g, 2)

        parts = [f16(fit.fields["d"])]
        if self.with_min:
            parts.append(f16(fit.fields["m"]))
        if self.bits == 8:
            parts.append(q ^ 0x80)  # int8 (code - 128), two's complement
        else:
            if self.bits == 5:  # bit 4 of element j -> bit j of the little-endian uint32 qh
                hi = ((q >> 4) & 1).reshape(n, g, 4, 8)
                weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
                parts.append((hi * weights).sum(-1, dtype=torch.uint8))  # (N, G, 4)
            nib = q & 0x0F
            parts.append(nib[..., :16] | (nib[..., 16:] << 4))  # elements 0..15 low, 16..31 high
        return torch.cat(parts, -1).reshape(n, -1).numpy()


_Q = GGMLQuantizationType
LEGACY_FORMATS: dict[GGMLQuantizationType, LegacyFormat] = {
    _Q.Q8_0: LegacyFormat(_Q.Q8_0, 8, with_min=False),
    _Q.Q4_0: LegacyFormat(_Q.Q4_0, 4, with_min=False),
    _Q.Q4_1: LegacyFormat(_Q.Q4_1, 4, with_min=True),
    _Q.Q5_0: LegacyFormat(_Q.Q5_0, 5, with_min=False),
    _Q.Q5_1: LegacyFormat(_Q.Q5_1, 5, with_min=True),
}
