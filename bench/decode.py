"""Prefill / decode speed and peak memory of leanlm vs llama-cpp-python on the same GGUF file.

Usage: python bench/decode.py [--model smollm2-135m|PATH] [--prompt-tokens 256] [--gen-tokens 128]
                              [--threads 2] [--dtype auto] [--json]

Both engines get the same synthetic prompt of exactly --prompt-tokens ids (a paragraph repeated,
tokenized by leanlm, BOS first when the file asks for it), decode greedily and ignore EOS, so each
produces exactly --gen-tokens tokens. Each engine runs in its own subprocess (this script with
--engine), so peak RSS is per engine; "RSS above imports" is the peak minus the RSS right after the
engine's imports (torch for leanlm, llama_cpp for llama.cpp). One short warm-up generation precedes
the timed one in both engines. Decode tok/s counts the gen-tokens - 1 tokens after the first, which
comes from the prefill's logits. Without llama-cpp-python only leanlm's numbers are printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PARAGRAPH = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring "
    "panels and flipping switches; later, stored programs let the same hardware run many tasks. "
    "Assemblers, compilers and operating systems each hid another layer of detail, so that today a "
    "single line of Python can fetch a web page, parse it and summarise it with a language model. "
)
WARMUP_PROMPT, WARMUP_GEN = 16, 4


# --- memory ------------------------------------------------------------------------------------
def rss_mib() -> float:
    """Current resident set size in MiB."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def busy_cpus(interval: float = 1.0) -> float | None:
    """How many CPUs other processes kept busy over `interval` seconds (None when unknown)."""
    try:
        import psutil

        return psutil.cpu_percent(interval=interval) / 100 * (os.cpu_count() or 1)
    except ImportError:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# --- engines (run in a subprocess each) --------------------------------------------------------
def run_leanlm(path: str, ids: list[int], gen: int, threads: int, dtype: str) -> dict[str, Any]:
    import torch

    from leanlm.generate import GenStats, generate_ids
    from leanlm.llm import load

    base = rss_mib()
    t0 = time.perf_counter()
    llm = load(path, dtype=dtype, threads=threads, progress=False)
    load_s = time.perf_counter() - t0
    greedy = lambda logits, hist: logits.float().argmax(-1)
    list(generate_ids(llm.model, ids[:WARMUP_PROMPT], greedy, WARMUP_GEN))
    stats = GenStats()
    out = list(generate_ids(llm.model, ids, greedy, gen, stop_ids=frozenset(), stats=stats))
    return {"engine": "leanlm", "version": _leanlm_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "dtype": str(llm.model.dtype),
            "load_s": load_s, "prompt_tokens": stats.prompt_tokens, "gen_tokens": len(out),
            "prefill_s": stats.prefill_s, "decode_s": stats.decode_s,
            "prefill_tps": stats.prefill_tps, "decode_tps": stats.decode_tps,
            "base_rss_mib": base, "peak_rss_mib": peak_rss_mib(), "ids": out}


def _leanlm_version() -> str:
    import leanlm

    return getattr(leanlm, "__version__", "?")


def run_llamacpp(path: str, ids: list[int], gen: int, threads: int) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    base = rss_mib()
    t0 = time.perf_counter()
    lcpp = llama_cpp.Llama(model_path=path, n_ctx=len(ids) + gen + 16, n_batch=512, n_threads=threads,
                           n_threads_batch=threads, logits_all=False, verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = lcpp.n_vocab()

    def argmax_last() -> int:
        ptr = llama_cpp.llama_get_logits_ith(lcpp.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    def generate(prompt: list[int], n: int) -> tuple[list[int], float, float]:
        lcpp.reset()
        t0 = time.perf_counter()
        lcpp.eval(prompt)
        out = [argmax_last()]
        t1 = time.perf_counter()
        while len(out) < n:
            lcpp.eval([out[-1]])
            out.append(argmax_last())
        return out, t1 - t0, time.perf_counter() - t1

    generate(ids[:WARMUP_PROMPT], WARMUP_GEN)
    out, prefill_s, decode_s = generate(ids, gen)
    return {"engine": "llama.cpp", "version": f"llama-cpp-python {llama_cpp.__version__}",
            "threads": threads, "dtype": "gguf quant (q8 activations)", "load_s": load_s,
            "prompt_tokens": len(ids), "gen_tokens": len(out), "prefill_s": prefill_s, "decode_s": decode_s,
            "prefill_tps": len(ids) / prefill_s, "decode_tps": (len(out) - 1) / decode_s if decode_s else 0.0,
            "base_rss_mib": base, "peak_rss_mib": peak_rss_mib(), "ids": out}


# --- driver ------------------------------------------------------------------------------------
def resolve(spec: str) -> Path:
    try:
        from leanlm.hub import resolve_model
    except ImportError:
        return Path(spec)
    return resolve_model(spec, progress=True)


def prompt_ids(path: Path, n: int) -> list[int]:
    """Exactly n ids: BOS (when the file asks for one) + the paragraph repeated, truncated."""
    from leanlm.gguf_file import GGUFFile
    from leanlm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(GGUFFile(path).metadata)
    para = tok.encode(PARAGRAPH, special=False)
    ids = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    while len(ids) < n:
        ids += para
    return ids[:n]


def spawn(engine: str, args: argparse.Namespace, path: Path, ids: list[int]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--engine", engine, "--model", str(path),
           "--gen-tokens", str(args.gen_tokens), "--threads", str(args.threads), "--dtype", args.dtype]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, input=json.dumps(ids), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def leading_same(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


ROWS = [("load_s", "load (s)", "{:.2f}"), ("prefill_tps", "prefill tok/s", "{:.1f}"),
        ("decode_tps", "decode tok/s", "{:.1f}"), ("peak_rss_mib", "peak RSS (MiB)", "{:.0f}"),
        ("rss_above_imports_mib", "RSS above imports (MiB)", "{:.0f}")]


def report(path: Path, args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    for r in results.values():
        r["rss_above_imports_mib"] = r["peak_rss_mib"] - r["base_rss_mib"]
    out: dict[str, Any] = {"model": str(path), "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
                           "threads": args.threads, "dtype": args.dtype, "cpus": os.cpu_count(),
                           "busy_cpus_before": args.busy,
                           **{k: {f: v for f, v in r.items() if f != "ids"} for k, r in results.items()}}
    if "llamacpp" in results:
        a, b = results["leanlm"], results["llamacpp"]
        out["ratios_leanlm_over_llamacpp"] = {k: a[k] / b[k] if b[k] else None for k, _, _ in ROWS}
        out["identical_leading_tokens"] = leading_same(a["ids"], b["ids"])
    return out


def print_table(out: dict[str, Any]) -> None:
    print(f"model {out['model']}: prompt {out['prompt_tokens']} tokens, {out['gen_tokens']} generated, "
          f"{out['threads']} threads, dtype {out['dtype']} (leanlm: {out['leanlm']['dtype']})")
    has_ref = "llamacpp" in out
    head = f"{'':26}{'leanlm':>10}" + (f"{'llama.cpp':>11}{'leanlm/llama.cpp':>18}" if has_ref else "")
    print(head)
    for key, label, fmt in ROWS:
        line = f"{label:26}{fmt.format(out['leanlm'][key]):>10}"
        if has_ref:
            ratio = out["ratios_leanlm_over_llamacpp"][key]
            line += f"{fmt.format(out['llamacpp'][key]):>11}{'-' if ratio is None else f'{ratio:.2f}x':>18}"
        print(line)
    if has_ref:
        print(f"greedy outputs agree on the first {out['identical_leading_tokens']} of {out['gen_tokens']} tokens "
              f"({out['llamacpp']['version']})")
    else:
        print("llama-cpp-python is not installed: leanlm only")
    busy = out["busy_cpus_before"]
    if busy is not None and busy > 0.3:
        print(f"note: {busy:.1f} of {out['cpus']} CPUs were busy just before the run: other processes compete "
              "for the cores, so these numbers are pessimistic (multi-thread OpenMP suffers most)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="registry name or path to a .gguf file")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="leanlm weights dtype: auto, float32, bfloat16")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--engine", choices=["leanlm", "llamacpp"], help=argparse.SUPPRESS)  # internal
    args = ap.parse_args()
    if args.gen_tokens < 1 or args.prompt_tokens < WARMUP_PROMPT:
        ap.error(f"need --gen-tokens >= 1 and --prompt-tokens >= {WARMUP_PROMPT}")

    if args.engine:  # child: ids on stdin, one JSON line on stdout
        ids = json.loads(sys.stdin.read())
        if args.engine == "leanlm":
            res = run_leanlm(args.model, ids, args.gen_tokens, args.threads, args.dtype)
        else:
            res = run_llamacpp(args.model, ids, args.gen_tokens, args.threads)
        print(json.dumps(res))
        return

    args.busy = busy_cpus()
    path = resolve(args.model)
    ids = prompt_ids(path, args.prompt_tokens)
    results = {"leanlm": spawn("leanlm", args, path, ids)}
    if importlib.util.find_spec("llama_cpp") is not None:
        try:
            results["llamacpp"] = spawn("llamacpp", args, path, ids)
        except RuntimeError as exc:
            print(f"warning: {exc}", file=sys.stderr)
    out = report(path, args, results)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print_table(out)


if __name__ == "__main__":
    main()
