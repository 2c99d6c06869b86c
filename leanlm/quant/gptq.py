"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the columns
not yet quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

With H = 2 X^T X the layer's output error ||X (W - Q)^T||^2 is a quadratic in the weights; after
rounding column i the optimal update of the remaining columns is

    W[:, i+1:] -= (w_i - q_i) / Hinv[i, i] * Hinv[i, i+1:]

where Hinv is taken from the upper Cholesky factor of H^-1 (so the updates for later columns need no
re-inversion). Columns are processed in blocks of 128 with a lazy update of the rest. The group
scales/offsets are fitted on the original weights first ("static groups"), so any block format of
blocks.py works, including k-quants whose sub-block scales are shared across a super-block; columns
are visited in order of decreasing H diagonal ("act order"), which that makes safe.
"""

from __future__ import annotations

import torch

from leanlm.quant.blocks import BlockFormat, Fit, expand


def gptq(w: torch.Tensor, H: torch.Tensor, fmt: BlockFormat, damp: float = 0.01, block: int = 128,
         act_order: bool = True) -> tuple[torch.Tensor, Fit]:
    """(codes (N, K), fit) for weight w (N, K) given the input Hessian H (K, K)."""
    W = w.float().clone()
    N, K = W.shape
    fit = fmt.fit(W)
    scale, offset = expand(fit.scale, fmt.group), expand(fit.offset, fmt.group)  # (N, K)
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    W, H, scale, offset = W[:, perm], H[perm][:, perm], scale[:, perm], offset[:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(N, K, dtype=torch.int32)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            q = fmt.codes(W1[:, i:i + 1], fit, perm[j:j + 1])[:, 0]  # (N,) codes of original column perm[j]
            codes[:, j] = q
            err = (W1[:, i] - (q.float() * scale[:, j] + offset[:, j])) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return codes[:, inv], fit
