"""Load benchmark of `leanlm serve` beside llama-cpp-python's server on the same GGUF (not a test).

    python bench/serve.py [MODEL.gguf] [--clients 1,4,16] [--requests-per-client 3] [--max-tokens 64]
                          [--compare llama.cpp] [--json OUT.json]

Each server runs in its own subprocess with 2 threads. For each concurrency C, C client threads send
streamed /v1/completions requests back to back (prompts from a fixed list, temperature 0); reported:
aggregate generated tokens/s over the wall time, p50/p95 time to first token and inter-token latency
(between streamed chunks). llama-cpp-python's server needs `pip install 'llama-cpp-python[server]'`.
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

PROMPTS = ["The history of the printing press begins", "Once upon a time, in a small village by the sea,",
           "Here is a simple recipe for bread:", "The three laws of motion state that",
           "A short guide to planting tomatoes:", "The most important thing about writing code is"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine: str, model: str, port: int, max_batch: int, ctx: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    if engine == "leanlm":
        cmd = [sys.executable, "-m", "leanlm", "serve", model, "--port", str(port), "--threads", "2",
               "--max-batch", str(max_batch), "--ctx", str(ctx), "--compile", "auto"]
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


def load(base: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    ttft, itl, tokens = [], [], []
    lock = threading.Lock()

    errors = [0]

    def worker(c: int) -> None:
        for j in range(per_client):
            try:
                t, gaps, n = one_request(base, model, PROMPTS[(c + j) % len(PROMPTS)], max_tokens)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=str(Path.home() / ".cache/leanlm/models/smollm2-135m.gguf"))
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--compare", default=None, metavar="llama.cpp")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    engines = ["leanlm"] + (["llama.cpp"] if a.compare else [])
    out = {"model": a.model, "max_tokens": a.max_tokens, "runs": {}}
    for engine in engines:
        port = free_port()
        proc = start(engine, a.model, port, a.max_batch, a.ctx)
        base, name = f"http://127.0.0.1:{port}", httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
        try:
            one_request(base, name, PROMPTS[0], 4)  # warm-up
            out["runs"][engine] = [load(base, name, int(c), a.requests_per_client, a.max_tokens)
                                   for c in a.clients.split(",")]
        finally:
            proc.terminate()
            proc.wait()
    print(f"{'engine':10} {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} "
          f"{'ITL p95':>8} {'errors':>7}")
    for engine, rows in out["runs"].items():
        for r in rows:
            print(f"{engine:10} {r['clients']:>7} {r['tokens_per_s']:>8.1f} {r['ttft_p50_s']:>8.2f}s "
                  f"{r['ttft_p95_s']:>8.2f}s {r['itl_p50_ms']:>6.1f}ms {r['itl_p95_ms']:>6.1f}ms {r['errors']:>7}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
