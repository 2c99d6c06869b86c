"""Calibration: run the float model over a text and record what GPTQ and AWQ need per Linear.

GPTQ needs each Linear's input second moment H = 2/n * X^T X (K, K); AWQ needs a sample of the
inputs themselves. Both are gathered with forward pre-hooks in one pass over the text, cut into
windows of `seq_len` tokens (each starting with BOS when the tokenizer adds one).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from leanlm.model.transformer import Transformer


def windows(ids: list[int], seq_len: int, n_tokens: int, bos: int | None) -> list[torch.Tensor]:
    """Consecutive (1, T) windows covering up to n_tokens of `ids`."""
    body = seq_len - (bos is not None)
    out = []
    for start in range(0, min(len(ids), n_tokens), body):
        chunk = ids[start:start + body]
        if len(chunk) < 16:
            break
        out.append(torch.tensor([([bos] if bos is not None else []) + chunk]))
    return out


def linears(model: Transformer) -> dict[str, nn.Linear]:
    """Every dense Linear of the transformer blocks (not the head), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")}


# Linears that read the same input as another: their statistics are gathered once, under that one's name
SAME_INPUT = {".attn.wk": ".attn.wq", ".attn.wv": ".attn.wq", ".ffn.w3": ".ffn.w1"}


def input_owner(name: str) -> str:
    """The module whose recorded input `name` reads (itself, or q for k/v, gate for up)."""
    for suffix, owner in SAME_INPUT.items():
        if name.endswith(suffix):
            return name[: -len(suffix)] + owner
    return name


@torch.no_grad()
def collect(model: Transformer, batches: Iterable[torch.Tensor], names: Iterable[str], hessians: bool = True,
            max_inputs: int = 0, progress: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One pass over `batches`: ({name: H (K, K)}, {name: X sample (<= max_inputs, K)}) per module name."""
    mods = dict(model.named_modules())
    hs: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    xs: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def hook(name: str):
        def pre(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # (tokens, K)
            if hessians:
                if name not in hs:
                    hs[name] = torch.zeros(x.shape[1], x.shape[1])
                    counts[name] = 0
                hs[name] += x.t() @ x
                counts[name] += x.shape[0]
            if max_inputs:
                have = sum(len(t) for t in xs.setdefault(name, []))
                if have < max_inputs:
                    xs[name].append(x[: max_inputs - have].clone())
        return pre

    for n in names:
        hooks.append(mods[n].register_forward_pre_hook(hook(n)))
    batches = list(batches)
    try:
        from tqdm import tqdm

        it = tqdm(batches, desc="calibrating", unit="window", disable=not progress)
        for b in it:
            model(b, torch.arange(b.shape[1])[None])
    finally:
        for h in hooks:
            h.remove()
    H = {n: 2 * h / counts[n] for n, h in hs.items()}
    return H, {n: torch.cat(v) for n, v in xs.items()}
