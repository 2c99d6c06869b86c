"""AWQ: scale the input channels that carry large activations up before rounding, and fold the
inverse scale into the operation that produces those inputs (Lin et al., 2023).

For a Linear y = x W^T and per-channel s > 0, y = (x / s) (W * s)^T exactly; rounding W * s
instead of W shrinks the relative error of the columns that matter most (large |x|). s is searched
as s = mean|x|^alpha for alpha in [0, 1), keeping the alpha whose quantized output is closest to the
float output on calibration inputs. 1 / s goes into the previous op, so the file stays a plain
GGUF: the RMSNorm weight before q/k/v and gate/up, v's rows before o (shared by the query heads of
a GQA group, so s is averaged over them), up's rows before down.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from leanlm.model.layers import FeedForward, RMSNorm
from leanlm.model.transformer import Transformer
from leanlm.quant.blocks import BlockFormat, dequant


def fake_quant(w: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    """w rounded through `fmt` and decoded back (fp32)."""
    fit = fmt.fit(w)
    return dequant(fmt.codes(w, fit), fit, fmt.group)


def search_scale(x: torch.Tensor, ws: list[torch.Tensor], fmts: list[BlockFormat], tie: _Same | _Gqa,
                 grid: int = 20) -> torch.Tensor:
    """Best per-channel scale (K_prev,) for inputs x (n, K) of the weights ws [(N_i, K)].

    tie maps a (K_prev,) scale of the producing op to the (K,) input channels (identity except GQA)."""
    ref = torch.cat([x @ w.t() for w in ws], 1)  # (n, sum N_i)
    stat = x.abs().mean(0)  # (K,)
    best, best_s = float("inf"), None
    for a in range(grid):
        s = tie.reduce(stat).pow(a / grid).clamp(min=1e-4)  # (K_prev,)
        s = s / (s.max() * s.min()).sqrt()
        full = tie(s)
        out = torch.cat([(x / full) @ fake_quant(w * full, f).t() for w, f in zip(ws, fmts)], 1)
        loss = (ref - out).pow(2).mean().item()
        if loss < best:
            best, best_s = loss, s
    assert best_s is not None
    return best_s


class _Same:
    """Input channels are the producing op's channels."""

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        return s

    def reduce(self, stat: torch.Tensor) -> torch.Tensor:
        return stat


class _Gqa:
    """o's input channel (head h, dim j) comes from v's channel (kv head h // rep, dim j).

    Example: 4 query heads, 2 kv heads, head_dim 1: o's inputs [h0, h1, h2, h3] come from v's [k0, k0, k1, k1],
    so s_v = (mean(s_h0, s_h1), mean(s_h2, s_h3)) and o's columns get [s_k0, s_k0, s_k1, s_k1]."""

    def __init__(self, n_kv: int, rep: int, hd: int) -> None:
        self.n_kv, self.rep, self.hd = n_kv, rep, hd

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        return s.view(self.n_kv, 1, self.hd).expand(self.n_kv, self.rep, self.hd).reshape(-1)

    def reduce(self, stat: torch.Tensor) -> torch.Tensor:
        return stat.view(self.n_kv, self.rep, self.hd).mean(1).reshape(-1)


def _divide_producer(prev: nn.Module, s: torch.Tensor) -> None:
    if isinstance(prev, RMSNorm):
        if prev.add_one:  # weight is used as 1 + w
            prev.weight.copy_((1 + prev.weight) / s - 1)
        else:
            prev.weight.div_(s)
    else:  # a Linear whose output rows feed the scaled inputs
        prev.weight.div_(s[:, None])
        if prev.bias is not None:
            prev.bias.div_(s)


@torch.no_grad()
def apply_awq(model: Transformer, inputs: dict[str, torch.Tensor], fmt_of: Callable[[str], BlockFormat | None],
              grid: int = 20, progress: bool = False) -> dict[str, float]:
    """Rescale `model` in place (float, exact); returns the chosen mean log-scale per group for reporting.

    inputs: calibration inputs per Linear name (calibrate.collect); fmt_of(name) is the format that Linear
    will be written in (None: not quantized, then its group is left alone)."""
    from tqdm import tqdm

    cfg = model.cfg
    rep = cfg.n_heads // cfg.n_kv_heads
    report: dict[str, float] = {}
    for i in tqdm(range(cfg.n_layers), desc="AWQ", unit="layer", disable=not progress):
        p = f"layers.{i}"
        groups = [(f"{p}.attn_norm", [f"{p}.attn.wq", f"{p}.attn.wk", f"{p}.attn.wv"], _Same()),
                  (f"{p}.attn.wv", [f"{p}.attn.wo"], _Gqa(cfg.n_kv_heads, rep, cfg.head_dim))]
        if isinstance(model.layers[i].ffn, FeedForward):
            groups += [(f"{p}.ffn_norm", [f"{p}.ffn.w1", f"{p}.ffn.w3"], _Same()),
                       (f"{p}.ffn.w3", [f"{p}.ffn.w2"], _Same())]
        for prev_name, names, tie in groups:
            fmts = [fmt_of(n) for n in names]
            if any(f is None for f in fmts) or names[0] not in inputs:
                continue
            mods = [model.get_submodule(n) for n in names]
            s = search_scale(inputs[names[0]], [m.weight.float() for m in mods], fmts, tie, grid)
            _divide_producer(model.get_submodule(prev_name), s)
            full = tie(s)
            for m in mods:
                m.weight.mul_(full[None, :])
            report[prev_name] = s.log().abs().mean().item()
    return report
