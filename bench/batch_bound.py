"""What bounds batched decode: the parts of one decode step of B sequences, timed alone, against the step.

Usage: python bench/batch_bound.py [MODEL] [--batch 8,32] [--kv-cache auto|int8] [--threads 2]
                                   [--prompt-tokens 256] [--gen-tokens 128] [--plot FILE.png] [--json]

Issue 5 asks batched decode to reach 4x our own batch-1 tokens/s. This measures, in one process:
- batch 1's decode tok/s (the same greedy loop `leanlm bench` times, median of 3), hence the time a step of
  B sequences may take for 4x: B / (4 x batch-1 tok/s);
- the weight products of one step at B rows (every projection of every layer, in layer order, so the weights
  come from memory as in a real step), and the head at B rows;
- decode attention of B single-token queries over a real cache filled to the mean context of the run
  (prompt + gen / 2 positions), every layer in turn;
- the same products with each matrix's weights already in cache (each timed on its own, repeated): the
  kernels' arithmetic without waiting on memory;
- the whole step, from the same greedy loop at batch B.
products + head + attention is a floor under the step (norms, rotary embedding, cache writes, activation,
residuals and thread hand-offs come on top); B / floor is the most tokens/s the batch could reach with those
kernels as they are, and its ratio to batch 1 says whether 4x is reachable at all. The last column redoes
it with the products as fast as with their weights in cache: the kernels' arithmetic alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402


def timed(f, reps: int = 5) -> float:
    """Median seconds of f() over reps calls, after one warm-up call."""
    f()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def parts(model, lins: list, ids: list[int], b: int, ctx: int) -> tuple[float, float, float, float, float]:
    """Seconds for one step's weight products (from memory, and in cache), head and attention at batch b over
    `ctx` cached positions (each part alone, every layer in order), and the K/V megabytes attention reads."""
    from leanlm.model.cache import ModelCache

    cfg = model.cfg
    xs = {n: torch.randn(b, n, dtype=torch.bfloat16) for n in {m.in_features for m in lins}}
    def product(m) -> None:
        torch.ops.leanlm_native.int4_mm(xs[m.in_features], m.w4, m.scales, m.mins)

    products = timed(lambda: [product(m) for m in lins])
    in_cache = sum(timed(lambda m=m: product(m)) for m in lins)
    hx = torch.randn(b, cfg.dim, dtype=torch.bfloat16)
    head = timed(lambda: model.output(hx))
    cache = ModelCache.for_model(model, b, ctx + 1, 512)
    toks = (ids * (ctx // len(ids) + 1))[:ctx]
    for s in range(0, ctx, 512 // b):  # fill the cache to `ctx` positions, the batch's prompts at once
        piece = torch.tensor(toks[s:s + 512 // b]).expand(b, -1)
        cache.kv_len = s + piece.shape[1]
        model(piece, torch.arange(s, cache.kv_len).expand(b, -1), cache, last_only=True)
    q = torch.randn(b, cfg.n_heads, 1, cfg.head_dim, dtype=torch.bfloat16)
    layers = cache.prepare(torch.full((b, 1), ctx), ctx + 1)

    def attend() -> None:
        for buf, (_, mask), layer in zip(cache.layers, layers, model.layers):
            if buf.quantized:
                torch.ops.leanlm_native.attend_int8(q, *buf.codes(ctx + 1), mask, layer.attn.scale)
            else:
                torch.ops.leanlm_native.attend(q, *buf.view(ctx + 1), mask, layer.attn.scale)

    kv_mb = sum(t.numel() * t.element_size() for buf in cache.layers for t in buf.tensors()) / 1e6
    return products, in_cache, head, timed(attend), kv_mb * ctx / cache.layers[0].size


def measure(model_name: str, batches: list[int], kv: str, threads: int, prompt: int, gen: int) -> dict:
    from leanlm.formats.hub import resolve_model
    from leanlm.llm import load
    from leanlm.quant.int4 import Int4Linear
    from leanlm.tools.bench_engines import greedy_batch

    torch.set_num_threads(threads)
    llm = load(str(resolve_model(model_name)), threads=threads, progress=False, kv_cache=kv)
    model = llm.model
    ids = (llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * (prompt // 8 + 8)))[:prompt]

    def decode_tps(b: int) -> float:
        step = llm.decode_step(b, False)
        greedy_batch(model, ids[:32], b, 4, step=step)  # warm-up
        runs = []
        for _ in range(3):
            _, _, s = greedy_batch(model, ids, b, gen, step=step)
            runs.append(b * (gen - 1) / s)
        return statistics.median(runs)

    b1 = decode_tps(1)
    lins = [m for layer in model.layers for m in layer.modules() if isinstance(m, Int4Linear)]
    macs = sum(m.in_features * m.out_features for m in lins)
    head_macs = model.output.in_features * model.output.out_features
    ctx = prompt + gen // 2  # the mean context over the decode
    out = {"model": model_name, "kv_cache": kv, "threads": threads, "batch1_tps": b1, "context": ctx,
           "batches": []}
    for b in batches:
        with torch.inference_mode():
            products, in_cache, head, attention, kv_mb = parts(model, lins, ids, b, ctx)
        step = b / decode_tps(b)
        floor = products + head + attention
        row = {"batch": b, "budget_4x_ms": b / (4 * b1) * 1e3, "step_ms": step * 1e3, "products_ms": products * 1e3,
               "products_gmacs": b * macs / products / 1e9, "head_ms": head * 1e3,
               "head_gmacs": b * head_macs / head / 1e9, "attention_ms": attention * 1e3, "kv_mb": kv_mb,
               "floor_ms": floor * 1e3, "tps": b / step, "ratio": b / step / b1, "ceiling_ratio": b / floor / b1}
        hot = in_cache + head + attention  # the same floor with the products' weights in cache
        row.update(in_cache_ms=in_cache * 1e3, hot_floor_ms=hot * 1e3, hot_ceiling_ratio=b / hot / b1)
        out["batches"].append(row)
    return out


def report(r: dict) -> None:
    print(f"{r['model']}, K/V cache {r['kv_cache']}, {r['threads']} threads, mean context {r['context']}: "
          f"batch 1 {r['batch1_tps']:.1f} tok/s")
    print("| batch | 4x budget | whole step | products (G MAC/s) | head | attention | floor | tok/s (x batch 1) "
          "| ceiling (x batch 1) | products in cache: time, floor, ceiling |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for b in r["batches"]:
        print(f"| {b['batch']} | {b['budget_4x_ms']:.2f} ms | {b['step_ms']:.2f} ms | {b['products_ms']:.2f} ms "
              f"({b['products_gmacs']:.0f}) | {b['head_ms']:.2f} ms | {b['attention_ms']:.2f} ms | "
              f"{b['floor_ms']:.2f} ms | {b['tps']:.0f} ({b['ratio']:.2f}x) | {b['ceiling_ratio']:.2f}x | " +
              f"{b['in_cache_ms']:.2f} ms, {b['hot_floor_ms']:.2f} ms, {b['hot_ceiling_ratio']:.2f}x |")


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["batches"]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.9 * len(rows)))
    parts = [("products_ms", "weight products"), ("head_ms", "head"), ("attention_ms", "attention")]
    for i, b in enumerate(rows):
        left = 0.0
        for j, (key, label) in enumerate(parts):
            ax.barh(i, b[key], left=left, color=f"C{j}", label=label if i == 0 else None)
            left += b[key]
        ax.barh(i, max(0.0, b["step_ms"] - left), left=left, color="0.8", label="rest of the step" if i == 0 else None)
        ax.plot([b["budget_4x_ms"]] * 2, [i - 0.45, i + 0.45], color="k", lw=2,
                label="4x batch 1's tok/s" if i == 0 else None)
    ax.set_yticks(range(len(rows)), [f"batch {b['batch']}" for b in rows])
    ax.set_xlabel("ms per decode step")
    ax.set_title(f"{r['model']} ({r['kv_cache']} K/V cache): where a batched decode step goes")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--batch", default="8,32")
    ap.add_argument("--kv-cache", default="auto", choices=["auto", "int8"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--plot", default=None, help="PNG: each batch's step as its parts, against the 4x budget")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = measure(a.model, [int(b) for b in a.batch.split(",")], a.kv_cache, a.threads, a.prompt_tokens,
                a.gen_tokens)
    print(json.dumps(r, indent=1)) if a.json else report(r)
    if a.plot:
        plot(r, a.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
