"""Load benchmark of `leanlm serve` beside llama-cpp-python's server on the same GGUF (not a test).

    python bench/serve.py [MODEL.gguf] [--clients 1,4,16] [--requests-per-client 3] [--max-tokens 64]
                          [--compare llama.cpp] [--speculative "--lookup --speculate 4"] [--prompts edit]
                          [--json OUT.json]

Each server runs in its own subprocess with 2 threads. For each concurrency C, C client threads send
streamed /v1/completions requests back to back (prompts from a fixed list, temperature 0); reported:
aggregate generated tokens/s over the wall time, p50/p95 time to first token and inter-token latency
(between streamed chunks). llama-cpp-python's server needs `pip install 'llama-cpp-python[server]'`.
--speculative adds a leanlm server with those speculative-decoding flags, and reports its acceptance rate and
tokens per verifying forward from /metrics. --prompts edit asks for texts to be repeated with small changes
(what prompt lookup is for) instead of open-ended continuations.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from leanlm.formats.hub import resolve_model

PROMPTS = ["The history of the printing press begins", "Once upon a time, in a small village by the sea,",
           "Here is a simple recipe for bread:", "The three laws of motion state that",
           "A short guide to planting tomatoes:", "The most important thing about writing code is"]
EDIT_TEXTS = ["The printing press was invented by Johannes Gutenberg around 1440 in Mainz. It made books cheaper, "
              "spread literacy across Europe and helped start the Reformation.",
              "def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)\n",
              "Tomatoes need six hours of sun a day, deep watering twice a week and a stake or cage to climb. "
              "Plant them after the last frost, two feet apart.",
              "Newton's first law: a body stays at rest or in uniform motion unless a force acts on it. The second: "
              "force equals mass times acceleration. The third: every action has an equal and opposite reaction."]
EDIT_PROMPTS = [f"Original text:\n{t}\n\nThe same text, copied exactly:\n" for t in EDIT_TEXTS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine: str, model: str, port: int, max_batch: int, ctx: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    if engine.startswith("leanlm"):
        cmd = [sys.executable, "-m", "leanlm", "serve", model, "--port", str(port), "--threads", "2",
               "--max-batch", str(max_batch), "--ctx", str(ctx), "--compile", "auto", *extra]
    else:  # one slot per client, as many as leanlm's batch rows; ctx per slot equal to leanlm's
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--port", str(port), "--n_threads", "2",
               "--n_ctx", str(ctx * max_batch), "--model_alias", "model"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{engine} server did not start")


def one_request(base: str, model: str, prompt: str, max_tokens: int) -> tuple[float, list[float], int]:
    """(time to first token, gaps between later chunks, tokens) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps = []
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                chunk = json.loads(line[5:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    if not stamps:
        return float("nan"), [], 0
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])], len(stamps)


def load(base: str, model: str, clients: int, per_client: int, max_tokens: int, prompts: list[str]) -> dict:
    ttft, itl, tokens = [], [], []
    lock = threading.Lock()

    errors = [0]

    def worker(c: int) -> None:
        for j in range(per_client):
            try:
                t, gaps, n = one_request(base, model, prompts[(c + j) % len(prompts)], max_tokens)
            except httpx.HTTPError:  # counted, not fatal: some servers drop streams under load
                with lock:
                    errors[0] += 1
                continue
            with lock:
                ttft.append(t)
                itl.extend(gaps)
                tokens.append(n)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    def pct(xs: list[float], q: float) -> float:
        return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))

    return {"clients": clients, "requests": len(tokens), "errors": errors[0], "tokens": sum(tokens), "wall_s": wall,
            "tokens_per_s": sum(tokens) / wall, "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
            "itl_p50_ms": pct(itl, 50) * 1e3, "itl_p95_ms": pct(itl, 95) * 1e3}


def speculation_metrics(base: str) -> dict:
    """The server's leanlm_speculative_* gauges (totals over the whole run, warm-up included)."""
    text = httpx.get(base + "/metrics").text
    return {line.split()[0].removeprefix("leanlm_speculative_"): float(line.split()[1])
            for line in text.splitlines() if line.startswith("leanlm_speculative_")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="smollm2-135m", help="registry name or .gguf file")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--compare", default=None, metavar="llama.cpp")
    p.add_argument("--speculative", default=None, metavar="FLAGS",
                   help='also run leanlm with these flags, e.g. "--lookup --speculate 4"')
    p.add_argument("--prompts", choices=["open", "edit"], default="open")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    a.model = str(resolve_model(a.model, progress=True))  # llama.cpp needs the file itself
    prompts = PROMPTS if a.prompts == "open" else EDIT_PROMPTS
    engines = {"leanlm": []}
    if a.speculative:
        engines["leanlm " + a.speculative] = a.speculative.split()
    if a.compare:
        engines["llama.cpp"] = []
    out = {"model": a.model, "max_tokens": a.max_tokens, "prompts": a.prompts, "runs": {}, "speculation": {}}
    for engine, extra in engines.items():
        port = free_port()
        proc = start(engine, a.model, port, a.max_batch, a.ctx, extra)
        base, name = f"http://127.0.0.1:{port}", httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
        try:
            one_request(base, name, prompts[0], 4)  # warm-up
            out["runs"][engine] = [load(base, name, int(c), a.requests_per_client, a.max_tokens, prompts)
                                   for c in a.clients.split(",")]
            if extra:
                out["speculation"][engine] = speculation_metrics(base)
        finally:
            proc.terminate()
            proc.wait()
    w = max(10, *map(len, out["runs"]))
    print(f"{'engine':{w}} {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} "
          f"{'ITL p95':>8} {'errors':>7}")
    for engine, rows in out["runs"].items():
        for r in rows:
            print(f"{engine:{w}} {r['clients']:>7} {r['tokens_per_s']:>8.1f} {r['ttft_p50_s']:>8.2f}s "
                  f"{r['ttft_p95_s']:>8.2f}s {r['itl_p50_ms']:>6.1f}ms {r['itl_p95_ms']:>6.1f}ms {r['errors']:>7}")
    for engine, m in out["speculation"].items():
        print(f"{engine}: {m['acceptance_rate']:.0%} of {m['draft_tokens']:.0f} drafts accepted, "
              f"{m['tokens_per_forward']:.2f} tokens per verifying forward")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
