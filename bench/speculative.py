"""Speculative decoding on the real models: speedup and acceptance per proposer and task (not a test).

    python bench/speculative.py [MODEL ...] [--max-tokens 128] [--k 4] [--json OUT.json]

For each model (default smollm2-135m and gemma3-270m) and each task (chat, summarising a given text,
editing given code), greedy decoding with the compiled steps (`compile="on"`; the first run builds the
decode and verify steps), for each proposer:
  plain        no speculation (the baseline)
  lookup       prompt lookup (n-grams of the prompt and the text so far)
  early-exit   the model's own first half of its layers
  lowprec      target at float32 (eager), the same file at its shipped quantization (compiled) as draft;
               baseline: plain float32 (eager)
Reported: decode tokens/s, speedup over the baseline, draft acceptance, tokens per target forward, and
whether the text equals the baseline's (it must, in float32; in bf16 a verified block may round
differently from a single step and flip a near-tie).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import leanlm

ROOT = Path(__file__).resolve().parent.parent
CODE = '''def mean(values):
    total = 0
    for v in values:
        total = total + v
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for v in values:
        total = total + (v - m) ** 2
    return total / len(values)
'''
TEXT = (ROOT / "README.md").read_text()[:1600]
TASKS = {
    "chat": "Explain in a few sentences why the sky is blue.",
    "summarise": f"Summarise the following text in a few sentences, reusing its wording:\n\n{TEXT}",
    "edit code": f"Rename the variable `total` to `acc` in this Python code and show the whole code:\n\n{CODE}",
}


def run(llm: leanlm.LLM, prompt: str, max_tokens: int) -> tuple[str, float, float, float]:
    msgs = [{"role": "user", "content": prompt}]
    text = "".join(llm.chat(msgs, temperature=0, max_tokens=max_tokens, ignore_eos=False))
    sp = llm.last_spec if llm.speculation is not None else None
    return text, llm.last_stats.decode_tps, sp.acceptance if sp else 0.0, sp.tokens_per_forward if sp else 1.0


def bench_model(name: str, max_tokens: int, k: int) -> list[dict]:
    rows = []
    llm = leanlm.load(name, compile="on", progress=False)
    half = llm.config.n_layers // 2
    fp32 = leanlm.load(name, dtype="float32", compile="off", progress=False)  # eager both ways (compile time)
    for task, prompt in TASKS.items():
        quantized = [("plain", {}), ("lookup", {"lookup": True}), ("early-exit", {"early_exit": half})]
        for target, setups in ((llm, quantized), (fp32, [("plain fp32", {}), ("lowprec", {"draft": llm})])):
            base = None
            for label, kw in setups:
                target.speculate(k, **kw) if kw else target.speculate()
                run(target, prompt, 16)  # warm-up: loads the compiled steps
                text, tps, acc, tpf = run(target, prompt, max_tokens)
                base = base or (text, tps)
                rows.append({"model": name, "task": task, "proposer": label, "k": k if kw else 0,
                             "decode_tok_s": round(tps, 1), "speedup": round(tps / base[1], 2),
                             "acceptance": round(acc, 3), "tokens_per_forward": round(tpf, 2),
                             "same_text": text == base[0]})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            target.speculate()
    return rows


def table(rows: list[dict]) -> str:
    head = "| model | task | proposer | decode tok/s | speedup | acceptance | tok/forward | same text |\n" \
           "|---|---|---|---:|---:|---:|---:|---|\n"
    return head + "".join(
        f"| {r['model']} | {r['task']} | {r['proposer']} | {r['decode_tok_s']} | {r['speedup']}x | "
        f"{r['acceptance']:.0%} | {r['tokens_per_forward']} | {'yes' if r['same_text'] else 'no'} |\n"
        for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = [r for m in a.models for r in bench_model(m, a.max_tokens, a.k)]
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
