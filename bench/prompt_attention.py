"""Prompt attention: our kernel (kernels/flash.cpp) against PyTorch's SDPA on the masks a chunked prompt makes.

Usage: python bench/prompt_attention.py [--threads 2] [--repeat 5] [--json]

Shapes are those of the real models' prompt chunks (Gemma 3: 4 query heads on 1 K/V head of 256; SmolLM2: 9 on
3 of 64): the first 256 tokens (causal), the last 512-token chunk of a 2048-token prompt on a full layer (causal
over 2048 cached keys), and on a sliding layer (window 512 over a 1024-slot rolling buffer, slots out of position
order). Per case: best-of-N milliseconds for each, and each one's largest error against fp32 math.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from leanlm.kernels.plan import KernelPlan  # noqa: E402


class Case(NamedTuple):
    name: str
    H: int  # query heads
    KV: int  # K/V heads
    hd: int  # head dim
    T: int  # queries
    S: int  # keys
    window: int | None
    first: int  # position of the first query


CASES = [Case(*c) for c in [
         ("gemma 256 causal", 4, 1, 256, 256, 256, None, 0),
         ("gemma 2048, last chunk, full layer", 4, 1, 256, 512, 2048, None, 1536),
         ("gemma 2048, last chunk, sliding layer", 4, 1, 256, 512, 1024, 512, 1536),
         ("smollm2 256 causal", 9, 3, 64, 256, 256, None, 0),
         ("smollm2 2048, last chunk", 9, 3, 64, 512, 2048, None, 1536)]]


def inputs(c: Case) -> tuple:
    H, KV, hd, T, S, window, first = c[1:]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, H, hd, generator=g).bfloat16().transpose(1, 2)  # (1, H, T, hd), as model.py has it
    k, v = (torch.randn(1, KV, S, hd, generator=g).bfloat16() for _ in range(2))
    qpos = torch.arange(first, first + T)
    kpos = torch.arange(first + T - S, first + T)
    if window is not None:  # a rolling buffer: slot s holds the position p with p % S == s
        kpos = kpos[torch.argsort(kpos % S)]
    mask = (kpos[None] >= 0) & (kpos[None] <= qpos[:, None])
    if window is not None:
        mask &= qpos[:, None] - kpos[None] < window
    return q, k, v, mask[None, None]


def best_ms(f, repeat: int) -> float:
    f()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def measure(c: Case, repeat: int) -> dict:
    q, k, v, mask = inputs(c)
    scale = c.hd**-0.5

    def ours() -> torch.Tensor:
        return torch.ops.leanlm_native.flash_attend(q, k, v, mask, scale)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    rep = c.H // c.KV
    s = (q.float() @ k.float().repeat_interleave(rep, 1).transpose(-1, -2)) * scale
    ref = torch.softmax(s.masked_fill(~mask, -torch.inf), -1) @ v.float().repeat_interleave(rep, 1)
    return {"case": c.name, "allowed": round(mask.float().mean().item(), 3),
            "sdpa_ms": best_ms(sdpa, repeat), "ours_ms": best_ms(ours, repeat),
            "sdpa_max_err": (sdpa().float() - ref).abs().max().item(),
            "ours_max_err": (ours().float() - ref).abs().max().item()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not KernelPlan.resolve().flash:
        print("our prompt attention kernel is not available here (needs AVX-512 BF16 and a C++ compiler)")
        return 1
    torch.set_num_threads(a.threads)
    rows = [measure(c, a.repeat) for c in CASES]
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'case':40s} {'allowed':>7s} {'SDPA ms':>8s} {'ours ms':>8s} {'speedup':>7s} {'SDPA err':>9s} "
          f"{'our err':>9s}")
    for r in rows:
        print(f"{r['case']:40s} {r['allowed']:7.2f} {r['sdpa_ms']:8.2f} {r['ours_ms']:8.2f} "
              f"{r['sdpa_ms'] / r['ours_ms']:6.2f}x {r['sdpa_max_err']:9.2e} {r['ours_max_err']:9.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
