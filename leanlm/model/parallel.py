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
sampling with the same seed) picks the same tokens everywhere without further communication.
Mixtures of experts: every expert (and the shared experts) keeps its slice of the hidden width, the router
stays whole, and one all-reduce sums the layer's output. Latent attention (mla.py): heads split as above
(their query rows, their rows of wkv_b, their columns of wo), while the latents and their cache, shared by
all heads, are computed and kept on every rank. Dense weights only (`--dtype float32` or `bfloat16`). Launch
one process per rank, e.g. `torchrun --nproc-per-node 2 -m leanlm run MODEL "prompt" --dtype float32
--tensor-parallel`.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from leanlm.errors import LeanLMError, UnsupportedError
from leanlm.model.layers import FeedForward
from leanlm.model.mla import MLAttention
from leanlm.model.moe import MoE
from leanlm.model.transformer import Transformer


class AllReduce(nn.Module):
    """A module whose output is a partial sum on each rank (a row-parallel Linear: this rank's columns of the
    weight; an MoE of split experts), summed over the ranks."""

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
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


def _split(n: int, world: int, what: str) -> int:
    if n % world:
        raise LeanLMError(f"{world} ranks must divide the {what} ({n})")
    return n // world


def _dense(*mods: nn.Module) -> None:
    if not all(isinstance(m, nn.Linear) for m in mods):
        raise UnsupportedError("tensor parallelism needs dense weights: load with --dtype float32 or bfloat16")


def _shard_mlp(f: FeedForward, rank: int, world: int, reduce: bool, group: dist.ProcessGroup | None) -> None:
    """Rows of gate and up, columns of down (summed over ranks here when `reduce`)."""
    if f.w13 is not None:
        raise UnsupportedError("tensor parallelism needs dense weights: load with --dtype float32 or bfloat16")
    _dense(f.w1, f.w2, f.w3)
    F = _split(f.w1.out_features, world, "MLP width")
    f.w1, f.w3 = _rows(f.w1, rank * F, (rank + 1) * F), _rows(f.w3, rank * F, (rank + 1) * F)
    w2 = _cols(f.w2, rank * F, (rank + 1) * F, rank)
    f.w2 = AllReduce(w2, group) if reduce else w2


def _shard_moe(moe: MoE, rank: int, world: int) -> None:
    """Every expert keeps its slice of the hidden width (as a dense MLP does); the router stays whole."""
    if any(k in moe._modules for k in ("q1", "q2", "q3")):
        raise UnsupportedError("tensor parallelism needs dense weights: load with --dtype float32 or bfloat16")
    F = _split(moe.w1.shape[1], world, "experts' width")
    sl = slice(rank * F, (rank + 1) * F)
    moe.w1 = nn.Parameter(moe.w1.detach()[:, sl].clone(), requires_grad=False)  # (E, F / W, D)
    moe.w3 = nn.Parameter(moe.w3.detach()[:, sl].clone(), requires_grad=False)
    moe.w2 = nn.Parameter(moe.w2.detach()[:, :, sl].clone(), requires_grad=False)  # (E, D, F / W)
    if moe.shared is not None:
        _shard_mlp(moe.shared, rank, world, False, None)  # summed with the routed experts' partial output


def _shard_mla(a: MLAttention, H: int, rank: int, group: dist.ProcessGroup | None) -> None:
    """Each rank's H heads: their query rows, their rows of wkv_b, their columns of wo. The latents (and the
    latent cache) are the same on every rank."""
    m = a.cfg.mla
    qd, kvd = m.nope_dim + m.rope_dim, m.nope_dim + m.v_dim
    if a.wq is not None:
        _dense(a.wq)
        a.wq = _rows(a.wq, rank * H * qd, (rank + 1) * H * qd)
    else:
        _dense(a.wq_b)
        a.wq_b = _rows(a.wq_b, rank * H * qd, (rank + 1) * H * qd)
    _dense(a.wkv_b, a.wo)
    a.wkv_b = _rows(a.wkv_b, rank * H * kvd, (rank + 1) * H * kvd)
    a.wo = AllReduce(_cols(a.wo, rank * H * m.v_dim, (rank + 1) * H * m.v_dim, rank), group)


def shard(model: Transformer, rank: int, world: int, group: dist.ProcessGroup | None = None) -> Transformer:
    """Keep rank `rank`'s share of `model`'s blocks (in place) and return it; the config becomes the local one
    (heads, KV heads and MLP widths / W), so caches built from it hold this rank's K/V heads."""
    cfg = model.cfg
    H, KV = _split(cfg.n_heads, world, "heads"), _split(cfg.n_kv_heads, world, "KV heads")
    hd = cfg.head_dim
    for layer in model.layers:
        a, f = layer.attn, layer.ffn
        if isinstance(a, MLAttention):
            _shard_mla(a, H, rank, group)
        else:
            if a.wqkv is not None:
                raise UnsupportedError("tensor parallelism needs dense weights: load with --dtype float32 or bfloat16")
            _dense(a.wq, a.wk, a.wv, a.wo)
            a.wq = _rows(a.wq, rank * H * hd, (rank + 1) * H * hd)
            a.wk = _rows(a.wk, rank * KV * hd, (rank + 1) * KV * hd)
            a.wv = _rows(a.wv, rank * KV * hd, (rank + 1) * KV * hd)
            a.wo = AllReduce(_cols(a.wo, rank * H * hd, (rank + 1) * H * hd, rank), group)
        if isinstance(f, MoE):
            _shard_moe(f, rank, world)
            layer.ffn = AllReduce(f, group)
        else:
            _shard_mlp(f, rank, world, True, group)
    moe = cfg.moe and replace(cfg.moe, hidden_dim=(cfg.moe.hidden_dim or cfg.hidden_dim) // world)
    local = replace(cfg, n_heads=H, n_kv_heads=KV, hidden_dim=cfg.hidden_dim // world, moe=moe)
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
