"""`leanlm bench`'s report: numbers derived from the engines' raw results (weight bandwidth, cost, agreement of
greedy tokens, leanlm / llama.cpp ratios), the table and the plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from leanlm.errors import LeanLMError
from leanlm.tools.bench_engines import BenchSpec

ENGINE_ROWS = [("load (s)", "load_s", "{:.2f}"), ("decode step load (s)", "step_load_s", "{:.2f}"),
               ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
               ("RSS above imports (MiB)", "rss_above_imports_mib", "{:.0f}"),
               ("weights read/step (MiB)", "weight_bytes_per_step", "{:.1f}")]
RUN_ROWS = [("time to first token (s)", "ttft_s", "{:.3f}"), ("prefill tok/s", "prefill_tps", "{:.1f}"),
            ("decode tok/s", "decode_tps", "{:.1f}"), ("weight bandwidth (GB/s)", "weight_gbps", "{:.2f}"),
            ("USD per M tokens", "usd_per_mtok", "{:.3f}")]
LABELS = {"leanlm": "leanlm", "llamacpp": "llama.cpp"}


def leading_same(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def build_report(spec: BenchSpec, results: dict[str, dict[str, Any]], busy: float | None,
                 price_per_hour: float | None) -> dict[str, Any]:
    """Derived numbers (bandwidth, cost, agreement, ratios) added to the engines' raw results."""
    firsts = {}
    for r in results.values():
        r["rss_above_imports_mib"] = r["peak_rss_mib"] - r["base_rss_mib"]
        r["weight_bytes_per_step_mib"] = r["weight_bytes_per_step"] / 2**20
        firsts[r["engine"]] = first = r["runs"][0]["ids"][0]
        for run in r["runs"]:
            run["weight_gbps"] = run["decode_tps"] / run["batch"] * r["weight_bytes_per_step"] / 1e9
            if price_per_hour is not None:
                run["usd_per_mtok"] = price_per_hour / (run["decode_tps"] * 3600) * 1e6 if run["decode_tps"] else None
            run["same_tokens_as_smallest_batch"] = min(leading_same(first, seq) for seq in run.pop("ids"))
    out: dict[str, Any] = {"model": spec.model, "prompt_tokens": spec.prompt_tokens, "gen_tokens": spec.gen_tokens,
                           "batches": list(spec.batches), "threads": spec.threads, "dtype": spec.dtype,
                           "prefill_chunk": spec.chunk, "cpus": os.cpu_count(), "busy_cpus_before": busy,
                           "price_per_hour": price_per_hour, **results}
    if "llamacpp" in results:
        a, b = results["leanlm"], results["llamacpp"]
        out["ratios_leanlm_over_llamacpp"] = {
            **{k: _ratio(a.get(k), b.get(k)) for _, k, _ in ENGINE_ROWS},
            "by_batch": {str(ra["batch"]): {k: _ratio(ra.get(k), rb.get(k)) for _, k, _ in RUN_ROWS if k in ra}
                         for ra, rb in zip(a["runs"], b["runs"])}}
        out["identical_leading_tokens"] = leading_same(firsts["leanlm"], firsts["llama.cpp"])
    return out


def print_table(out: dict[str, Any]) -> None:
    engines = [k for k in LABELS if k in out]
    ratios = out.get("ratios_leanlm_over_llamacpp")
    print(f"model {out['model']}: prompt {out['prompt_tokens']} tokens, {out['gen_tokens']} generated per sequence, "
          f"{out['threads']} threads, dtype {out['dtype']} (leanlm: {out['leanlm']['dtype']}, decode step "
          f"{out['leanlm'].get('decode_step', '?')}, compile={out['leanlm']['compile']})")
    print(f"{'':32}" + "".join(f"{LABELS[e]:>12}" for e in engines) + (f"{'leanlm/llama.cpp':>18}" if ratios else ""))

    def row(label: str, fmt: str, values: list[float | None], ratio: float | None) -> None:
        cells = "".join(f"{'-' if v is None else fmt.format(v):>12}" for v in values)
        print(f"{label:32}{cells}" + (f"{'-' if ratio is None else f'{ratio:.2f}x':>18}" if ratios else ""))

    for label, key, fmt in ENGINE_ROWS:
        scale = 2**20 if key == "weight_bytes_per_step" else 1
        row(label, fmt, [None if out[e].get(key) is None else out[e][key] / scale for e in engines],
            ratios and ratios[key])
    for i, b in enumerate(out["batches"]):
        for label, key, fmt in RUN_ROWS:
            if key in out["leanlm"]["runs"][i]:
                row(f"batch {b:<3} {label}", fmt, [out[e]["runs"][i][key] for e in engines],
                    ratios and ratios["by_batch"][str(b)].get(key))
    for e in engines:
        same = [r["same_tokens_as_smallest_batch"] for r in out[e]["runs"][1:]]
        if same:
            print(f"{LABELS[e]}: each batched sequence repeats the smallest batch's greedy tokens for "
                  f"{min(same)} of {out['gen_tokens']}")
    if ratios:
        print(f"greedy outputs of the two engines agree on the first {out['identical_leading_tokens']} of "
              f"{out['gen_tokens']} tokens ({out['llamacpp']['version']})")
    busy = out["busy_cpus_before"]
    if busy is not None and busy > 0.3:
        print(f"note: {busy:.1f} of {out['cpus']} CPUs were busy just before the run: other processes compete "
              "for the cores, so these numbers are pessimistic")


def plot(out: dict[str, Any], file: str) -> None:
    """Aggregate decode tok/s against batch size, one line per engine (Agg backend, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for e in (k for k in LABELS if k in out):
        runs = out[e]["runs"]
        ax.plot([r["batch"] for r in runs], [r["decode_tps"] for r in runs], marker="o", label=LABELS[e])
    ax.set_xscale("log", base=2)
    ax.set_xticks(out["batches"], [str(b) for b in out["batches"]])
    ax.set_xlabel("batch size (sequences decoded together)")
    ax.set_ylabel("decode tok/s (all sequences)")
    ax.set_title(f"{Path(out['model']).name}: {out['prompt_tokens']} + {out['gen_tokens']} tokens, "
                 f"{out['threads']} threads", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    try:
        fig.savefig(file, dpi=120)
    except OSError as e:
        raise LeanLMError(f"cannot write the plot {file}: {e}") from None
