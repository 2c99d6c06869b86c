"""Sparse mixture of experts (Mixtral): router -> top-k experts -> softmax over the selected
logits -> weighted sum of the experts' gated-MLP outputs.

Tokens are grouped per expert (one sort of the N*k assignments) so each expert runs one batched
matmul over its tokens; the only Python loop is over experts, never over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.moe is not None
        E, D, Hd = cfg.moe.n_experts, cfg.dim, cfg.hidden_dim
        self.k, self.act = cfg.moe.n_used, cfg.act
        self.gate = nn.Linear(D, E, bias=False)  # router
        self.w1 = nn.Parameter(torch.empty(E, Hd, D))  # gate projections, stacked (E, hidden, D)
        self.w3 = nn.Parameter(torch.empty(E, Hd, D))  # up projections (E, hidden, D)
        self.w2 = nn.Parameter(torch.empty(E, D, Hd))  # down projections (E, D, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (N, D)
        logits = self.gate(xf)  # (N, E)
        top_logits, top_e = torch.topk(logits, self.k, dim=-1)  # (N, k)
        weights = torch.softmax(top_logits.float(), dim=-1).to(x.dtype)  # (N, k)
        # Group the N*k (token, expert) assignments by expert. Example, N=3 tokens, k=2:
        #   top_e = [[2, 0], [0, 1], [2, 1]] -> flat [2, 0, 0, 1, 2, 1]
        #   order (stable sort by expert) = [1, 2, 3, 5, 0, 4]; token of each = order // k = [0, 1, 1, 2, 0, 2]
        #   counts per expert = [2, 2, 2]: expert 0 gets tokens [0, 1], expert 1 [1, 2], expert 2 [0, 2]
        flat_e = top_e.flatten()  # (N*k,)
        order = torch.argsort(flat_e, stable=True)
        token_of = order // self.k  # (N*k,)
        counts = torch.bincount(flat_e, minlength=self.w1.shape[0]).tolist()
        xs = xf[token_of]  # (N*k, D), grouped by expert
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            h = xs[start:start + n]  # (n, D)
            g = F.linear(h, self.w1[e])
            g = F.silu(g) if self.act == "silu" else F.gelu(g, approximate="tanh")
            ys[start:start + n] = F.linear(g * F.linear(h, self.w3[e]), self.w2[e])
            start += n
        ys = ys * weights.flatten()[order, None]
        out = torch.zeros_like(xf).index_add_(0, token_of, ys)  # (N, D)
        return out.view(shape)
