"""What both loaders share: name maps compiled from data, and placing a tensor into a state dict.

A name map is a dict from checkpoint names to ours, with `{i}` for a layer and `{e}` for an expert.
A target may name several tensors joined by `+` (a fused tensor split by rows, e.g. Phi-3's qkv),
or one expert of a stacked tensor as `name[{e}]` (Mixtral's per-expert HF tensors).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from ..errors import LeanLMError

NameMapper = Callable[[str], "list[str] | None"]


def compile_names(names: dict[str, str]) -> NameMapper:
    pats = [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
                        + "$"), v) for k, v in names.items()]

    def mapper(name: str) -> list[str] | None:
        for pat, target in pats:
            m = pat.match(name)
            if m:
                return target.format(**m.groupdict()).split("+")
        return None

    return mapper


def place(t: torch.Tensor, targets: list[str], expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
          dtype: torch.dtype, device: str | torch.device) -> None:
    """Convert one checkpoint tensor and put it (or its row-split parts, or one expert) in `state`."""
    if len(targets) == 1 and targets[0].endswith("]"):  # one expert of a stacked tensor
        name, e = targets[0][:-1].split("[")
        if name not in state:
            state[name] = torch.empty(expected[name].shape, dtype=dtype, device=device)
        state[name][int(e)].copy_(t)
        return
    for n in targets:
        if n not in expected:
            raise LeanLMError(f"checkpoint tensor maps to '{n}', which this model does not have")
    sizes = [expected[n].shape[0] for n in targets]
    if sum(sizes) != t.shape[0]:
        raise LeanLMError(f"tensor for {targets[0]} has {t.shape[0]} rows, expected {sum(sizes)}")
    for n, part in zip(targets, torch.split(t, sizes, dim=0)):
        if tuple(part.shape) != tuple(expected[n].shape):
            raise LeanLMError(f"tensor {n} has shape {tuple(part.shape)}, expected {tuple(expected[n].shape)}")
        state[n] = part.to(device=device, dtype=dtype)  # no copy when dtype and device already match


def finish(model: torch.nn.Module, state: dict[str, torch.Tensor], tie: bool) -> None:
    """Check completeness, tie the head to the embeddings if asked, and assign the weights."""
    if tie and "output.weight" not in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise LeanLMError(f"checkpoint lacks tensors: {', '.join(sorted(missing)[:5])}")
    model.load_state_dict(state, assign=True, strict=True)
    if tie:
        model.output.weight = model.tok_embeddings.weight
