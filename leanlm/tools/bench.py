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
The engines themselves (what runs in the subprocesses) live in `bench_engines.py`, the report (derived numbers,
table, plot) in `bench_report.py`.
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
from leanlm.tools.bench_engines import BenchSpec
from leanlm.tools.bench_report import build_report, plot, print_table

if TYPE_CHECKING:
    import argparse

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
