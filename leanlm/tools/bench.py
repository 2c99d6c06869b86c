"""`leanlm bench`: prefill/decode speed, time to first token, memory and weight bandwidth, optionally vs llama.cpp.

Every engine gets the same synthetic prompt of exactly `prompt_tokens` ids (a paragraph repeated, BOS first
when the tokenizer asks for it) and decodes greedily ignoring EOS, so each sequence yields exactly `gen_tokens`
tokens. Each engine runs in its own subprocess, so peak RSS is per engine; "RSS above imports" is the peak
minus the RSS right after the engine's imports. A short warm-up precedes every timed run.

With `--repeat N` each engine runs N times, alternating with the other, and the report gives medians: this
machine's own speed moves by 10-20% from minute to minute (bench/NOTES.md).

Batch B decodes B copies of the prompt together (prefill included). Time to first token (TTFT) is the prefill
plus the first greedy pick; prefill tok/s = B x prompt / TTFT; decode tok/s = B x (gen - 1) / decode seconds
(the first token comes from the prefill). Weights are read once per decode step whatever B is, so weight GB/s
= decode tok/s / B x weight bytes read per step. Batch 1 of leanlm is the library's own `generate_ids` loop.
The engines themselves (what runs in the subprocesses) live in `bench_engines.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leanlm.errors import LeanLMError
from leanlm.tools.bench_engines import BenchSpec, greedy_batch, weight_bytes

if TYPE_CHECKING:
    import argparse

__all__ = ["BenchSpec", "bench_main", "greedy_batch", "parse_batches", "run_bench", "weight_bytes"]

PARAGRAPH = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring "
    "panels and flipping switches; later, stored programs let the same hardware run many tasks. "
    "Assemblers, compilers and operating systems each hid another layer of detail, so that today a "
    "single line of Python can fetch a web page, parse it and summarise it with a language model. "
)
ENGINES = ("llama.cpp", "llamacpp")  # --compare spellings; results go under "llamacpp"


def busy_cpus(interval: float = 0.5) -> float | None:
    """How many CPUs other processes kept busy over `interval` seconds (None when unknown)."""
    try:
        import psutil

        return psutil.cpu_percent(interval=interval) / 100 * (os.cpu_count() or 1)
    except ImportError:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prompt_ids(path: Path, n: int) -> list[int]:
    """Exactly n ids: BOS (when the tokenizer asks for one) + the paragraph repeated, truncated."""
    from leanlm.formats import load_tokenizer

    tok = load_tokenizer(path)
    para = tok.encode(PARAGRAPH, special=False)
    ids = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    while len(ids) < n:
        ids += para
    return ids[:n]


# --- driver ------------------------------------------------------------------------------------
def spawn(engine: str, spec: BenchSpec, ids: list[int]) -> dict[str, Any]:
    root = str(Path(__file__).resolve().parents[2])  # the checkout holding leanlm/
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-c", "from leanlm.tools.bench_engines import child_main; child_main()"]
    req = json.dumps({"engine": engine, "spec": asdict(spec), "ids": ids})
    proc = subprocess.run(cmd, input=req, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    res = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    if res is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        hint = _crash_hint(engine, proc.returncode)
        raise LeanLMError(f"the {engine} benchmark failed (exit {proc.returncode}): {tail}{hint}")
    if "error" in res:
        raise LeanLMError(res["error"])
    return res


def _crash_hint(engine: str, code: int) -> str:
    """Why a llama.cpp run may have died: on CPUs with AMX, llama-cpp-python 0.3.36 built with its defaults
    segfaults in its AMX matmul on any multi-token batch (seen on a 2-core Xeon; bench/NOTES.md)."""
    try:
        amx = " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        amx = False
    if engine != "llamacpp" or code >= 0 or not amx:
        return ""
    return ("; llama.cpp's AMX kernels crash on this CPU: rebuild it without them, e.g. CMAKE_ARGS='-DGGML_NATIVE=OFF "
            "-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_INT8=OFF' pip install "
            "--no-cache-dir --force-reinstall --no-deps llama-cpp-python (bench/NOTES.md)")


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def has_llamacpp() -> bool:
    return has_module("llama_cpp")


def parse_batches(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32), sorted, duplicates dropped."""
    try:
        sizes = {int(x) for x in text.split(",")}
    except ValueError:
        raise LeanLMError(f"--batch wants comma-separated positive integers such as 1,8,32, not '{text}'") from None
    if min(sizes) < 1:
        raise LeanLMError(f"--batch sizes must be >= 1 (got '{text}')")
    return tuple(sorted(sizes))


def run_bench(spec: BenchSpec, compare: str | None = None, price_per_hour: float | None = None,
              repeat: int = 1) -> dict[str, Any]:
    """Run leanlm (and the compared engine) in subprocesses, `repeat` times each, alternating so that both see
    the machine's slow and fast moments alike; the report (medians over the repetitions) as one dict."""
    busy = busy_cpus()
    ids = prompt_ids(Path(spec.model), spec.prompt_tokens)
    engines = ["leanlm"] + (["llamacpp"] if compare else [])
    reps: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    for _ in range(repeat):
        for e in engines:
            reps[e].append(spawn(e, spec, ids))
    results = {e: merge_repeats(r) for e, r in reps.items()}
    if compare:
        from leanlm.tools.bench_engines import gguf_weight_bytes

        results["llamacpp"].update(gguf_weight_bytes(spec.model))
    return build_report(spec, results, busy, price_per_hour)


def merge_repeats(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine's repeated results as one. Per batch size, the run with the median decode speed (so its
    numbers stay consistent with each other), with every run's decode tok/s in `decode_tps_reps`; load times
    and memory: the median of each."""
    def middle(values: list[Any]) -> Any:
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        return sorted(values)[len(values) // 2] if numbers else values[0]

    out = {k: middle([r.get(k) for r in reps]) for k in reps[0] if k != "runs"}
    out["repeats"] = len(reps)
    out["runs"] = []
    for runs in zip(*(r["runs"] for r in reps)):
        run = dict(sorted(runs, key=lambda r: r["decode_tps"])[len(runs) // 2])
        run["decode_tps_reps"] = [r["decode_tps"] for r in runs]
        out["runs"].append(run)
    return out


# --- report ------------------------------------------------------------------------------------
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


def bench_main(a: argparse.Namespace) -> None:
    """`leanlm bench`: validate the arguments (one-line errors), run, print a table or JSON, plot."""
    from leanlm.formats.hub import resolve_model

    batches = parse_batches(a.batch)
    if a.prompt_tokens < 1 or a.gen_tokens < 1:
        raise LeanLMError("--prompt-tokens and --gen-tokens must be >= 1")
    if a.threads is not None and a.threads < 1 or a.prefill_chunk < 1:
        raise LeanLMError("--threads and --prefill-chunk must be >= 1")
    if a.price_per_hour is not None and a.price_per_hour <= 0:
        raise LeanLMError("--price-per-hour must be a positive number of USD")
    if a.compare is not None and a.compare not in ENGINES:
        raise LeanLMError(f"--compare supports llama.cpp only, not '{a.compare}'")
    if a.compare and not has_llamacpp():
        raise LeanLMError("--compare llama.cpp needs llama-cpp-python (pip install llama-cpp-python)")
    if a.plot and not has_module("matplotlib"):
        raise LeanLMError("--plot needs matplotlib (pip install matplotlib)")
    if a.plot and not Path(a.plot).expanduser().resolve().parent.is_dir():
        raise LeanLMError(f"cannot write the plot {a.plot}: its folder does not exist")
    path = resolve_model(a.model, progress=not a.json)
    if a.compare and (path.is_dir() or path.suffix.lower() != ".gguf"):
        raise LeanLMError(f"--compare llama.cpp needs a .gguf model, and {path} is not one")
    spec = BenchSpec(str(path), a.prompt_tokens, a.gen_tokens, batches, a.threads or default_threads(),
                     a.dtype, a.prefill_chunk, a.compile, a.kv_cache)
    if a.repeat < 1:
        raise LeanLMError("--repeat must be >= 1")
    out = run_bench(spec, a.compare, a.price_per_hour, a.repeat)
    if a.plot:
        plot(out, str(Path(a.plot).expanduser()))
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        print_table(out)
        if a.plot:
            print(f"plot written to {a.plot}")
