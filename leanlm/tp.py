"""Tensor parallelism over torch.distributed: each of W ranks holds 1/W of every block's heads and MLP width.

Megatron-LM's split of a transformer block, for W ranks (rank r):
- q, k, v projections: the rows of heads r H/W .. (r+1) H/W - 1 (and of KV heads r KV/W ..): each rank
  computes attention for its own heads, with its own slice of the K/V cache;
- output projection: the matching columns; each rank's product is a partial sum over its heads, and one
  all-reduce (sum) gives every rank the full result before the residual add;
- gate and up projections: the rows r F/W .. (r+1) F/W - 1; down projection: those columns, then one
  all-reduce. Norms, embeddings and the head are replicated.
So a block costs two all-reduces of (tokens x dim) numbers, and every rank ends it with the same hidden
state. Worked example, H = 4 heads of 8 dims, KV = 2, W = 2: rank 1 keeps rows 16..31 of wq (heads 2 and 3),
rows 8..15 of wk and wv (KV head 1, which serves query heads 2 and 3), and columns 16..31 of wo.

Every rank runs the same forward on the same tokens and gets the same logits, so greedy decoding (and
sampling with the same seed) picks the same tokens everywhere without further communication. Dense weights
only (`--dtype float32` or `bfloat16`); no mixture of experts or latent attention yet. Launch one process per
rank, e.g. `torchrun --nproc-per-node 2 -m leanlm run MODEL "prompt" --dtype float32 --tensor-parallel`.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from .errors import LeanLMError, UnsupportedError
from .model import Attention, FeedForward, Transformer


class AllReduceLinear(nn.Module):
    """A row-parallel Linear: this rank's columns of the weight, then the sum over ranks."""

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.linear, self.group = linear, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        dist.all_reduce(y, group=self.group)
        return y


def _rows(lin: nn.Linear, lo: int, hi: int) -> nn.Linear:
    out = nn.Linear(lin.in_features, hi - lo, bias=lin.bias is not None, device=lin.weight.device,
                    dtype=lin.weight.dtype)
    out.weight = nn.Parameter(lin.weight.detach()[lo:hi].clone(), requires_grad=False)
    if lin.bias is not None:
        out.bias = nn.Parameter(lin.bias.detach()[lo:hi].clone(), requires_grad=False)
    return out


def _cols(lin: nn.Linear, lo: int, hi: int, rank: int) -> nn.Linear:
    out = nn.Linear(hi - lo, lin.out_features, bias=lin.bias is not None, device=lin.weight.device,
                    dtype=lin.weight.dtype)
    out.weight = nn.Parameter(lin.weight.detach()[:, lo:hi].clone(), requires_grad=False)
    if lin.bias is not None:  # added once: on rank 0
        out.bias = nn.Parameter(lin.bias.detach().clone() * (rank == 0), requires_grad=False)
    return out


def shard(model: Transformer, rank: int, world: int, group: dist.ProcessGroup | None = None) -> Transformer:
    """Keep rank `rank`'s share of `model`'s blocks (in place) and return it; the config becomes the local one
    (n_heads / W, n_kv_heads / W, hidden_dim / W), so caches built from it hold this rank's K/V heads."""
    cfg = model.cfg
    if cfg.moe is not None or cfg.mla is not None:
        raise UnsupportedError("tensor parallelism does not split experts or latent attention yet")
    if cfg.n_heads % world or cfg.n_kv_heads % world or cfg.hidden_dim % world:
        raise LeanLMError(f"{world} ranks must divide the heads ({cfg.n_heads}), KV heads ({cfg.n_kv_heads}) "
                          f"and MLP width ({cfg.hidden_dim})")
    H, KV, hd, F = cfg.n_heads // world, cfg.n_kv_heads // world, cfg.head_dim, cfg.hidden_dim // world
    for layer in model.layers:
        a, f = layer.attn, layer.ffn
        if not isinstance(a, Attention) or not isinstance(f, FeedForward) or a.wqkv is not None or \
                f.w13 is not None or not all(isinstance(m, nn.Linear) for m in (a.wq, a.wk, a.wv, a.wo, f.w1, f.w2)):
            raise UnsupportedError("tensor parallelism needs dense weights: load with --dtype float32 or bfloat16")
        a.wq = _rows(a.wq, rank * H * hd, (rank + 1) * H * hd)
        a.wk = _rows(a.wk, rank * KV * hd, (rank + 1) * KV * hd)
        a.wv = _rows(a.wv, rank * KV * hd, (rank + 1) * KV * hd)
        a.wo = AllReduceLinear(_cols(a.wo, rank * H * hd, (rank + 1) * H * hd, rank), group)
        f.w1, f.w3 = _rows(f.w1, rank * F, (rank + 1) * F), _rows(f.w3, rank * F, (rank + 1) * F)
        f.w2 = AllReduceLinear(_cols(f.w2, rank * F, (rank + 1) * F, rank), group)
    local = replace(cfg, n_heads=H, n_kv_heads=KV, hidden_dim=F)
    model.cfg = local
    for layer in model.layers:
        layer.attn.cfg = local
    return model


def init_from_env() -> tuple[int, int]:
    """(rank, world size) of a process started by torchrun (gloo on CPU, NCCL on CUDA)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise LeanLMError("--tensor-parallel runs one process per rank: start it with torchrun --nproc-per-node N")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shared_seed(seed: int | None) -> int:
    """`seed`, or rank 0's random pick sent to every rank: sampling then draws the same tokens everywhere."""
    t = torch.tensor([seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()))], dtype=torch.long)
    dist.broadcast(t, src=0)
    return int(t.item())
