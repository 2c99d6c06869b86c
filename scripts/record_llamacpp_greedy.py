"""Record llama.cpp's greedy continuations of a few chat prompts as JSON test fixtures.

Usage: python scripts/record_llamacpp_greedy.py [--smol PATH] [--gemma PATH] [--out DIR] [--steps N]

For every model and prompt, the prompt ids are built by leanlm (`llm.chat_prompt`, chat
template + BOS as the file says) and fed unchanged to llama.cpp, which then decodes greedily
one token at a time (argmax of its logits, `--steps` tokens at most, stopping after an
end-of-generation token). Stored per prompt: the prompt ids, llama.cpp's generated ids, and
at each generated step llama.cpp's top-5 ids with their logits. `tests/test_llamacpp_parity.py`
compares leanlm against these files, so llama-cpp-python is not needed at test time.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS: list[str] = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain why the sky is blue in two sentences.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish and German.",
]
TOP_K = 5


def versions() -> dict[str, str]:
    """llama-cpp-python's version, libllama's version and the ggml version + commit it was built from."""
    import llama_cpp

    out = {"llama_cpp_python": llama_cpp.__version__, "libllama": llama_cpp.llama_version().decode()}
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
        for name in ("ggml_version", "ggml_commit"):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_char_p
            out[name] = fn().decode()
    except (OSError, AttributeError):  # other builds may not ship these symbols
        pass
    return out


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def greedy(lcpp: Any, prompt: list[int], steps: int, eog: set[int]) -> dict[str, Any]:
    """Eval prompt, then argmax-decode one token at a time; record ids and top-5 per step."""
    lcpp.reset()
    lcpp.eval(prompt)
    gen: list[int] = []
    top_ids: list[list[int]] = []
    top_logits: list[list[float]] = []
    for _ in range(steps):
        row = np.asarray(lcpp.scores[lcpp.n_tokens - 1], dtype=np.float32)
        order = np.argsort(-row, kind="stable")[:TOP_K]
        tid = int(np.argmax(row))
        assert tid == int(order[0])
        gen.append(tid)
        top_ids.append([int(i) for i in order])
        top_logits.append([round(float(row[i]), 3) for i in order])
        if tid in eog:
            break
        lcpp.eval([tid])
    return {"gen": gen, "top5": top_ids, "top5_logits": top_logits, "stopped_at_eog": gen[-1] in eog}


def record(path: str, name: str, out_dir: Path, steps: int) -> Path:
    import llama_cpp

    from leanlm.llm import load

    llm = load(path, dtype="float32", threads=2, progress=False)
    lcpp = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=2, logits_all=True, verbose=False)
    vocab = lcpp._model.vocab
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    eog = {t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    cases = []
    for text in PROMPTS:
        messages = [{"role": "user", "content": text}]
        ids = llm.chat_prompt(messages)
        # sanity: does llama.cpp tokenize the rendered template to the same ids? (informational)
        rendered = llm.tokenizer.apply_chat_template(messages)
        theirs = lcpp.tokenize(rendered.encode(), add_bos=bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
                               special=True)
        run = greedy(lcpp, ids, steps, eog)
        cases.append({"prompt": text, "prompt_ids": ids, "llamacpp_tokenize_matches": theirs == ids, **run})
        print(f"{name}: {len(ids)} prompt ids, {len(run['gen'])} generated: "
              f"{lcpp.detokenize(run['gen']).decode(errors='replace')!r}")
    data = {
        "model": os.path.basename(path),
        "model_size": os.path.getsize(path),
        "model_sha256": file_digest(path),
        "versions": versions(),
        "settings": {"n_ctx": 2048, "n_threads": 2, "steps": steps, "decoding": "greedy (argmax), one token per eval"},
        "n_vocab": n_vocab,
        "eog_ids": sorted(eog),
        "cases": cases,
    }
    out = out_dir / f"llamacpp_greedy_{name}.json"
    out.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smol", default=os.environ.get("LEANLM_TEST_SMOL", "/tmp/smol.gguf"))
    ap.add_argument("--gemma", default=os.environ.get("LEANLM_TEST_GEMMA", "/tmp/gemma.gguf"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
    ap.add_argument("--steps", type=int, default=48)
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, path in (("smollm2", args.smol), ("gemma3", args.gemma)):
        print("wrote", record(path, name, out_dir, args.steps))


if __name__ == "__main__":
    main()
