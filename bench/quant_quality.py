"""What each quantization scheme costs: size, perplexity, KL and top-1 agreement against the float model,
decode speed, beside llama.cpp on the same files.

Usage: python bench/quant_quality.py [--model smollm2-135m] [--text tests/fixtures/ppl_text.txt]
                                     [--calibration tests/fixtures/calibration.txt] [--ctx 512] [--chunks N]
                                     [--workdir DIR] [--no-speed] [--out docs/quantization]

The float reference is made by dequantizing the shipped file to F32 (`leanlm quantize MODEL f32.gguf
--type f32`); every scheme is quantized from that reference with `leanlm.tools.quantize.quantize`. Quality is
measured on the fp32 path (exact dequantized weights) with `leanlm.tools.perplexity.perplexity(..., reference=
float model)`; llama.cpp's perplexity of the same file (when llama-cpp-python is installed) checks that it
reads our files as we do. Speed uses `leanlm bench`'s subprocess runs (256-token prompt, 128 greedy tokens,
2 threads, leanlm's default auto dtype). Prints the markdown table; writes OUT.json and OUT.png (perplexity
vs size).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))

# (label, type, method)
SCHEMES = [("float (F32)", "f32", "rtn"), ("q8_0", "q8_0", "rtn"), ("q4_0 RTN", "q4_0", "rtn"),
           ("q4_0 GPTQ", "q4_0", "gptq"), ("q4_0 AWQ", "q4_0", "awq"), ("q4_1 RTN", "q4_1", "rtn"),
           ("q4_1 GPTQ", "q4_1", "gptq")]


def measure_quality(path: Path, ref_llm: Any, text: str, ctx: int, chunks: int | None) -> dict[str, Any]:
    from leanlm.llm import load
    from leanlm.tools.perplexity import perplexity

    llm = load(path, dtype="float32", progress=False)
    r = perplexity(llm, text, ctx, reference=ref_llm, max_chunks=chunks, progress=False)
    return {"ppl": r.perplexity, "kl": r.kl_mean, "top1": r.top1_agree}


def measure_speed(path: Path, threads: int) -> dict[str, Any]:
    from leanlm.tools.bench import has_llamacpp, run_bench
    from leanlm.tools.bench_engines import BenchSpec

    out = run_bench(BenchSpec(model=str(path), threads=threads), "llama.cpp" if has_llamacpp() else None)
    return {k: {"decode_tps": out[k]["runs"][0]["decode_tps"], "prefill_tps": out[k]["runs"][0]["prefill_tps"],
                "peak_rss_mib": out[k]["peak_rss_mib"], "rss_above_imports_mib": out[k]["rss_above_imports_mib"]}
            for k in ("leanlm", "llamacpp") if k in out}


def write_outputs(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    has_lcpp = any("ppl_llamacpp" in r for r in rows)
    has_speed = any("speed" in r for r in rows)
    head = ["scheme", "size (MiB)", "perplexity", "KL vs float", "top-1 vs float"]
    head += ["llama.cpp ppl", "ours/llama.cpp"] if has_lcpp else []
    head += ["decode tok/s", "llama.cpp decode", "peak RSS MiB"] if has_speed else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], f"{r['size_mib']:.1f}", f"{r['ppl']:.3f}", f"{r['kl']:.4f}", f"{100 * r['top1']:.1f}%"]
        if has_lcpp:
            lc = r.get("ppl_llamacpp")
            cells += [f"{lc:.3f}" if lc else "-", f"{r['ppl'] / lc:.4f}" if lc else "-"]
        if has_speed:
            s = r.get("speed", {})
            cells += [f"{s['leanlm']['decode_tps']:.1f}" if "leanlm" in s else "-",
                      f"{s['llamacpp']['decode_tps']:.1f}" if "llamacpp" in s else "-",
                      f"{s['leanlm']['peak_rss_mib']:.0f}" if "leanlm" in s else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["size_mib"], r["ppl"], s=40)
        ax.annotate(r["label"], (r["size_mib"], r["ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("file size (MiB, log scale)")
    ax.set_ylabel(f"perplexity (ctx {meta['ctx']}, lower is better)")
    ax.set_title(f"{meta['model']}: quantization cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default=str(ROOT / "tests/fixtures/ppl_text.txt"))
    ap.add_argument("--calibration", default=str(ROOT / "tests/fixtures/calibration.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/leanlm-quant-quality")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--speed-only", action="store_true", help="add speed to the rows of an existing OUT.json")
    ap.add_argument("--schemes", default=None, help="comma-separated labels to run (default all)")
    ap.add_argument("--out", default=str(ROOT / "docs/quantization"))
    args = ap.parse_args()

    import torch

    from leanlm.formats.hub import resolve_model
    from leanlm.llm import load
    from leanlm.tools.quantize import quantize

    torch.set_num_threads(args.threads)
    if args.speed_only:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        for row in saved["rows"]:
            row["speed"] = measure_speed(Path(row["file"]), args.threads)
            print(json.dumps(row), flush=True)
        write_outputs(saved["rows"], saved["meta"], Path(args.out))
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = resolve_model(args.model)
    text = Path(args.text).read_text(encoding="utf-8")
    ref = work / "float-f32.gguf"
    if not ref.exists():
        quantize(src, ref, "f32")
    ref_llm = load(ref, dtype="float32", progress=False)
    lcpp = importlib.util.find_spec("llama_cpp") is not None
    rows = []
    wanted = set(args.schemes.split(",")) if args.schemes else None
    for label, qtype, method in SCHEMES:
        if wanted is not None and label not in wanted:
            continue
        path = ref if qtype == "f32" else work / f"{qtype}-{method}.gguf"
        t0 = time.perf_counter()
        if not path.exists():
            quantize(ref, path, qtype, method=method, calibration=args.calibration)
        row: dict[str, Any] = {"label": label, "type": qtype, "method": method, "file": str(path),
                               "size_mib": path.stat().st_size / 2**20, "quantize_s": time.perf_counter() - t0}
        row.update(measure_quality(path, ref_llm, text, args.ctx, args.chunks))
        if lcpp:
            from record_llamacpp_perplexity import llamacpp_perplexity

            row["ppl_llamacpp"] = llamacpp_perplexity(str(path), text, args.ctx, args.chunks)["ppl"]
        if not args.no_speed:
            row["speed"] = measure_speed(path, args.threads)
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = {"model": args.model, "source": str(src), "ctx": args.ctx, "chunks": args.chunks,
            "text": Path(args.text).name, "calibration": Path(args.calibration).name, "threads": args.threads,
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    write_outputs(rows, meta, Path(args.out))


if __name__ == "__main__":
    main()
