"""The small layers of the family: RMSNorm and the gated MLP (bf16 rows on our operators where they run)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.kernels.plan import KernelPlan
from leanlm.model.config import ModelConfig


class RMSNorm(nn.Module):
    native = False  # bf16 rows on kernels/rowops.cpp (`use_plan`)

    def __init__(self, dim: int, eps: float, add_one: bool = False) -> None:
        super().__init__()
        self.eps, self.add_one = eps, add_one
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() + 1.0 if self.add_one else self.weight.float()
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and self.native:  # the same math, one pass
            return torch.ops.leanlm_native.rms_norm(x, w, self.eps)  # (kernels/rowops.cpp)
        return F.rms_norm(x.float(), w.shape, w, self.eps).to(x.dtype)  # normalise in fp32

    def use_plan(self, plan: KernelPlan) -> None:
        self.native = plan.row_ops


class FeedForward(nn.Module):
    """Gated MLP: w2(act(w1 x) * w3 x)  (w1 = gate, w3 = up, w2 = down)."""

    native = False  # the gated activation of bf16 rows on kernels/rowops.cpp (`use_plan`)

    def __init__(self, cfg: ModelConfig, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden = hidden_dim or cfg.hidden_dim
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.act = cfg.act
        self.w13: nn.Module | None = None  # gate and up fused into one matmul (quant/fuse.py), else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            g, u = self.w13(x).chunk(2, dim=-1)
        else:
            g, u = self.w1(x), self.w3(x)
        if g.dtype == torch.bfloat16 and g.device.type == "cpu" and self.native:  # the same math, one pass
            return self.w2(torch.ops.leanlm_native.gated(g, u, int(self.act != "silu")))  # (kernels/rowops.cpp)
        g = F.silu(g) if self.act == "silu" else F.gelu(g, approximate="tanh")
        return self.w2(g * u)

    def use_plan(self, plan: KernelPlan) -> None:
        self.native = plan.row_ops
