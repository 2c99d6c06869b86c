"""Sparse mixture of experts: router -> top-k experts -> weighted sum of the experts' gated-MLP outputs.

Mixtral weights the chosen experts by a softmax over their router logits. DeepSeek-V2 takes the softmax over
all experts first and keeps the top-k scores as they are (times a scale), optionally only among the experts of
the best few groups, and adds shared experts that every token goes through (config.MoeConfig).

Tokens are grouped per expert (one sort of the N*k assignments) so each expert runs one batched
matmul over its tokens; the only Python loop is over experts, never over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.model.config import ModelConfig


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, shared: nn.Module | None = None) -> None:
        super().__init__()
        assert cfg.moe is not None
        self.moe = cfg.moe
        E, D, Hd = cfg.moe.n_experts, cfg.dim, cfg.moe.hidden_dim or cfg.hidden_dim
        self.k, self.act = cfg.moe.n_used, cfg.act
        self.shared = shared  # the shared experts' gated MLP (model.FeedForward), or None
        self.gate = nn.Linear(D, E, bias=False)  # router
        self.w1 = nn.Parameter(torch.empty(E, Hd, D))  # gate projections, stacked (E, hidden, D)
        self.w3 = nn.Parameter(torch.empty(E, Hd, D))  # up projections (E, hidden, D)
        self.w2 = nn.Parameter(torch.empty(E, D, Hd))  # down projections (E, D, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (N, D)
        logits = self.gate(xf)  # (N, E)
        if self.moe.score_first:
            weights, top_e = self._scores_top_k(logits)
        else:
            top_logits, top_e = torch.topk(logits, self.k, dim=-1)  # (N, k)
            weights = torch.softmax(top_logits.float(), dim=-1).to(x.dtype)  # (N, k)
        # Group the N*k (token, expert) assignments by expert. Example, N=3 tokens, k=2:
        #   top_e = [[2, 0], [0, 1], [2, 1]] -> flat [2, 0, 0, 1, 2, 1]
        #   order (stable sort by expert) = [1, 2, 3, 5, 0, 4]; token of each = order // k = [0, 1, 1, 2, 0, 2]
        #   counts per expert = [2, 2, 2]: expert 0 gets tokens [0, 1], expert 1 [1, 2], expert 2 [0, 2]
        flat_e = top_e.flatten()  # (N*k,)
        order = torch.argsort(flat_e, stable=True)
        token_of = order // self.k  # (N*k,)
        counts = torch.bincount(flat_e, minlength=self.moe.n_experts).tolist()
        xs = xf[token_of]  # (N*k, D), grouped by expert
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            h = xs[start:start + n]  # (n, D)
            g = self._expert(1, e, h)
            g = F.silu(g) if self.act == "silu" else F.gelu(g, approximate="tanh")
            ys[start:start + n] = self._expert(2, e, g * self._expert(3, e, h))
            start += n
        ys = ys * weights.flatten()[order, None]
        out = torch.zeros_like(xf).index_add_(0, token_of, ys)  # (N, D)
        if self.shared is not None:
            out = out + self.shared(xf)
        return out.view(shape)

    def _expert(self, which: int, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert e's gate (1), down (2) or up (3) projection of h: from the stacked dense weights, or from the
        quantized experts (ModuleLists q1, q2, q3 of Int4Linear, loaders/gguf.py) that replace them."""
        quantized = self._modules.get(f"q{which}")
        return quantized[e](h) if quantized is not None else F.linear(h, getattr(self, f"w{which}")[e])

    def _scores_top_k(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek's routing: softmax over all E experts, top k of those scores -> (weights, experts) (N, k).

        With groups, only the experts of the `topk_group` groups with the best single score compete. Example,
        E = 8 in G = 4 groups of 2, topk_group 2, scores [.1 .3 | .05 .05 | .2 .1 | .1 .1]: group bests
        [.3 .05 .2 .1] keep groups 0 and 2, so k = 2 picks experts 1 (.3) and 4 (.2)."""
        m = self.moe
        scores = torch.softmax(logits.float(), dim=-1)  # (N, E)
        if m.n_group > 1:
            N, E = scores.shape
            best = scores.view(N, m.n_group, E // m.n_group).amax(dim=-1)  # (N, G)
            keep = torch.zeros_like(best).scatter_(1, torch.topk(best, m.topk_group, dim=-1).indices, 1.0)
            scores = scores.masked_fill(keep.repeat_interleave(E // m.n_group, dim=1) == 0, 0.0)
        weights, top_e = torch.topk(scores, self.k, dim=-1)
        return (weights * m.routed_scale).to(logits.dtype), top_e
