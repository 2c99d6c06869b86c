"""KV-cache bytes against sequence length: full multi-head attention, GQA and GQA + sliding window.

Usage: python bench/kv_memory.py [--lengths 1024,4096,8192,16384,32768] [--chunk 512] [--batch 1]
                                 [--json] [--plot FILE.png]

The model is Mistral 7B's shape (32 layers, 32 query heads, head_dim 128, window 4096) in fp16, with
32 KV heads (MHA, what the model would need without GQA), 8 KV heads (GQA, full attention in every
layer) or 8 KV heads and the 4096-token window in every layer (GQA+SWA, Mistral 7B as published).
Nothing is estimated: each number is what `leanlm.model.cache.ModelCache` allocates for a cache of that many
positions (K, V and the int64 slot-position index of every layer), built on the meta device so no
memory is actually taken. A sliding layer's rolling buffer holds W + chunk slots (the prefill chunk is
written before attention reads the buffer, see leanlm/cache.py), so at 32k tokens SWA saves
32768 / (4096 + chunk): 7.1x with chunk 512, not quite the 8x (32768 / 4096) of the paper, which counts
the window alone; chunk 1 (token-by-token prefill) comes within 0.03% of it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from leanlm.model.cache import ModelCache
from leanlm.model.config import ModelConfig

LAYERS, HEADS, HEAD_DIM, WINDOW = 32, 32, 128, 4096
VARIANTS: dict[str, tuple[int, int | None]] = {  # name -> (KV heads, window)
    "MHA (32 KV heads)": (32, None),
    "GQA (8 KV heads)": (8, None),
    "GQA+SWA (W=4096)": (8, WINDOW),
}


def mistral_config(n_kv_heads: int, window: int | None) -> ModelConfig:
    return ModelConfig(arch="mistral", vocab_size=32000, dim=4096, n_layers=LAYERS, n_heads=HEADS,
                       n_kv_heads=n_kv_heads, head_dim=HEAD_DIM, hidden_dim=14336, context_length=32768,
                       rope_base=10000.0, layer_windows=(window,) * LAYERS)


def cache_bytes(n_kv_heads: int, window: int | None, length: int, chunk: int, batch: int) -> int:
    """Bytes ModelCache allocates for `length` positions (on the meta device: nothing is allocated)."""
    cache = ModelCache(mistral_config(n_kv_heads, window), batch, length, chunk, torch.float16, device="meta")
    return cache.nbytes()


@dataclass
class Row:
    length: int
    bytes: dict[str, int]
    swa_saving: float  # GQA full / GQA+SWA
    swa_saving_chunk1: float  # the same with a prefill chunk of 1 (the rolling buffer is W + 1 slots)


def measure(lengths: list[int], chunk: int, batch: int) -> list[Row]:
    rows = []
    for n in lengths:
        b = {name: cache_bytes(kv, w, n, chunk, batch) for name, (kv, w) in VARIANTS.items()}
        gqa = b["GQA (8 KV heads)"]
        rows.append(Row(n, b, gqa / b["GQA+SWA (W=4096)"], gqa / cache_bytes(8, WINDOW, n, 1, batch)))
    return rows


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    raise AssertionError


def print_table(rows: list[Row], chunk: int, batch: int) -> None:
    names = list(VARIANTS)
    print(f"KV cache of Mistral 7B's shape, fp16, batch {batch}, prefill chunk {chunk} "
          f"(sliding buffer = {WINDOW} + {chunk} slots), measured from ModelCache on the meta device")
    head = f"{'tokens':>7} | " + " | ".join(f"{n:>18}" for n in names)
    head += f" | {'SWA saving':>10} | {'(chunk 1)':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = " | ".join(f"{human(r.bytes[n]):>18}" for n in names)
        print(f"{r.length:>7} | {cells} | {r.swa_saving:>9.3f}x | {r.swa_saving_chunk1:>8.3f}x")
    last = rows[-1]
    print(f"\nat {last.length} tokens, GQA+SWA saves {last.swa_saving:.3f}x over GQA "
          f"({last.length} / ({WINDOW} + {chunk}) slots = {last.length / (WINDOW + chunk):.3f}); the paper's "
          f"{last.length / WINDOW:.0f}x counts the window alone ({last.length} / {WINDOW}); with chunk 1: "
          f"{last.swa_saving_chunk1:.3f}x")
    print(f"GQA alone saves {last.bytes[names[0]] / last.bytes[names[1]]:.3f}x over MHA "
          f"(32 / 8 KV heads; the int64 slot-position index is the same in both)")


def plot(rows: list[Row], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot ({path})")
        return
    xs = [r.length for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in VARIANTS:
        ax.plot(xs, [r.bytes[name] / 2**30 for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("KV cache (GiB)")
    ax.set_title("KV cache, Mistral 7B shape, fp16")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("wrote", path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096,8192,16384,32768", help="comma-separated token counts")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk: sliding buffers hold W + chunk slots")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--plot", metavar="FILE.png", help="draw bytes vs length (needs matplotlib)")
    args = ap.parse_args()
    if args.chunk < 1:
        ap.error("--chunk must be at least 1 (ModelCache writes a chunk before attention reads it)")
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    rows = measure(lengths, args.chunk, args.batch)
    if args.json:
        out = {"config": {"n_layers": LAYERS, "n_heads": HEADS, "head_dim": HEAD_DIM, "window": WINDOW,
                          "dtype": "float16", "chunk": args.chunk, "batch": args.batch},
               "rows": [{"length": r.length, "bytes": r.bytes, "swa_saving": r.swa_saving,
                         "swa_saving_chunk1": r.swa_saving_chunk1} for r in rows]}
        print(json.dumps(out, indent=1))
    else:
        print_table(rows, args.chunk, args.batch)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
