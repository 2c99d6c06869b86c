"""Record llama.cpp's perplexity of tests/fixtures/ppl_text.txt as a JSON test fixture.

Usage: python scripts/record_llamacpp_perplexity.py [--smol PATH] [--gemma PATH] [--text FILE]
                                                    [--max-chunks N] [--out FILE]

The quantity is the one llama.cpp's perplexity tool (tools/perplexity) prints, recomputed here from
llama-cpp-python's logits: the text is tokenized once by llama.cpp (BOS first when the vocab adds
one, special tokens not parsed), cut into n_tokens // ctx non-overlapping windows, and in each window
(first token replaced by BOS when the vocab adds one, evaluated from an empty KV cache) the logits at
positions ctx//2 .. ctx-2 score the tokens ctx//2+1 .. ctx-1 by log-softmax (fp32 logits, fp64 sums,
as the tool's log_softmax does). perplexity = exp(mean nll). `tests/test_perplexity.py` compares
`leanlm.tools.perplexity.perplexity` against the stored numbers, so llama-cpp-python is not needed at test time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_llamacpp_greedy import file_digest, versions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# (name, model option, ctx): gemma at 1024 runs its 512-token sliding-window layers past the window
RUNS: list[tuple[str, str, int]] = [("smollm2", "smol", 512), ("smollm2", "smol", 1024), ("gemma3", "gemma", 1024)]


def log_softmax_at(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """logits (n, V) fp32, target (n,) -> log p(target) (n,) in fp64, max-subtracted like llama.cpp."""
    mx = logits.max(axis=1, keepdims=True)  # (n, 1)
    shifted = (logits - mx).astype(np.float64)  # (n, V)
    lse = np.log(np.exp(shifted).sum(axis=1))  # (n,)
    return shifted[np.arange(len(target)), target] - lse


def llamacpp_perplexity(path: str, text: str, ctx: int, max_chunks: int | None) -> dict[str, Any]:
    import llama_cpp

    lcpp = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=ctx, logits_all=True, n_threads=2, verbose=False)
    vocab = lcpp._model.vocab
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    bos = int(llama_cpp.llama_vocab_bos(vocab))
    tokens = lcpp.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
    n_chunks = len(tokens) // ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    first = ctx // 2
    nll, count = 0.0, 0
    per_chunk: list[float] = []
    t0 = time.perf_counter()
    for i in range(n_chunks):
        window = list(tokens[i * ctx:(i + 1) * ctx])
        if add_bos:
            window[0] = bos
        lcpp.reset()
        lcpp.eval(window)
        logits = np.asarray(lcpp.scores[first:ctx - 1], dtype=np.float32)  # (ctx-1-first, V)
        target = np.asarray(window[first + 1:ctx])  # (ctx-1-first,)
        nll -= float(log_softmax_at(logits, target).sum())
        count += len(target)
        per_chunk.append(math.exp(nll / count))
        print(f"  [{i + 1}/{n_chunks}] ppl {per_chunk[-1]:.4f}", flush=True)
    digest = hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()
    return {
        "model": os.path.basename(path), "model_size": os.path.getsize(path), "model_sha256": file_digest(path),
        "ctx": ctx, "add_bos": add_bos, "n_tokens": len(tokens), "tokens_sha256_int64": digest,
        "n_chunks": n_chunks, "max_chunks": max_chunks, "n_scored": count, "nll": nll / count,
        "ppl": math.exp(nll / count), "per_chunk": per_chunk, "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smol", default=os.environ.get("LEANLM_TEST_SMOL", "/tmp/smol.gguf"))
    ap.add_argument("--gemma", default=os.environ.get("LEANLM_TEST_GEMMA", "/tmp/gemma.gguf"))
    ap.add_argument("--text", default=str(ROOT / "tests" / "fixtures" / "ppl_text.txt"))
    ap.add_argument("--max-chunks", type=int, default=None, help="score only the first N windows (--chunks)")
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "llamacpp_perplexity.json"))
    args = ap.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    runs = []
    for name, opt, ctx in RUNS:
        path = getattr(args, opt)
        print(f"{name} ({path}) ctx={ctx}", flush=True)
        runs.append({"name": name, **llamacpp_perplexity(path, text, ctx, args.max_chunks)})
        print(f"{name} ctx={ctx}: ppl {runs[-1]['ppl']:.4f} over {runs[-1]['n_chunks']} chunks", flush=True)
    data = {
        "text": Path(args.text).name,
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "versions": versions(),
        "settings": {"n_batch": "ctx", "n_threads": 2, "logits_all": True,
                     "scoring": "llama.cpp tools/perplexity: BOS per window, second half scored"},
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
