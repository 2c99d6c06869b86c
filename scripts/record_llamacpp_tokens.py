"""Record llama.cpp's tokenization of a fixed set of strings as JSON test fixtures.

Usage: python scripts/record_llamacpp_tokens.py [--smol PATH] [--gemma PATH] [--out DIR]

For every model and string this stores the ids llama.cpp produces with
`tokenize(text, add_bos=False, special=False/True)`, plus a few `add_bos=True` runs,
the raw piece bytes of a sample of token ids (`llama_token_to_piece(..., special=True)`),
the end-of-generation ids and the BOS/EOS settings. `tests/test_tokenizer.py` compares
leanlm's tokenizer against these files, so llama-cpp-python is not needed at test time.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
from pathlib import Path

CODE = '''def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    a, b = 0, 1
    for _ in range(n - 1):
        a, b = b, a + b  # tuple swap
    return b


class Foo:
\tdef bar(self):\t# tab-indented
\t\treturn {"x": [1, 2, 3], 'y': None}
'''

FIXED: list[str] = [
    "", "Hello world", "Hello, world!", " leading space", "trailing space ", "  two leading",
    "multiple   spaces   here", " ", "  ", "   ", "\n", "\n\n", "\n\n\n", " \n", "\n ", "a\n\n\nb",
    "tabs\tand\t\ttabs", "\t\tindented", "line1\r\nline2\r\n", " " * 40, "x" + " " * 40 + "y",
    "\n" * 40, "a" + " " * 33 + "b", " \t \n \t\n  ", "end with newlines\n\n", CODE,
    "emoji 😀👍🏽 🎉 family 👨\u200d👩\u200d👧\u200d👦", "Café naïve résumé façade Ångström",
    "你好，世界！这是一个测试。", "こんにちは世界", "안녕하세요", "12345 3.14159",
    "1234567890 0.001 -42 1e10 100,000", "mixed: Hello 世界 123 😀 café\n\tend",
    "I'm don't you'll we've they're it's he'd", "CAPS 'S 'T 'LL", "!!! ??? ... ,,, ;;; :::",
    "email@example.com https://example.com/path?q=1&x=2", "<html><body><p>hi</p></body></html>",
    "$100 + 200 = 300 ^ ~ | `code`", "non-breaking\u00a0space and\u3000ideographic",
    "Ω≈ç√∫˜µ≤≥÷", "e\u0301 a\u0308 combining", "مرحبا שלום", "Русский текст", "Ελληνικά",
    "नमस्ते दुनिया", "สวัสดีครับ", "<0x0A> literal", "[multimodal]", "<unused0> <pad><eos><bos>",
    "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>", "<start_of_turn>user",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n  spaced  <|im_end|>\n",
    "<b> </b> and > </ and x> </y", "literal ▁ char ▁▁ and ▁x", "\u2581leading block",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "    indented four\n        eight\n\t\ttwo tabs\n", "a  b   c    d     e      f",
    "!\x04! a\x00b \x7f", "\U0001f843\U000bdfb0 \u0380 x\U00076bf4y",  # bytes some vocabularies lack
]

_ALPHABET = list("abcXYZ019 .,'!?-_/<>|") + [
    " ", "  ", "\n", "\n\n", "\t", "é", "ñ", "世", "界", "😀", "▁", "\u00a0", "'s", "123",
    "<|im_end|>", "<end_of_turn>", "<start_of_turn>", "<|im_start|>", "<bos>", "</s>",
]


def fuzz_strings(n: int = 150, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def _piece(llama_cpp, vocab, tid: int) -> bytes:
    buf = ctypes.create_string_buffer(512)
    n = llama_cpp.llama_token_to_piece(vocab, tid, buf, 512, 0, True)
    assert 0 <= n <= 512, (tid, n)
    return buf.raw[:n]


def record(path: str, name: str, out_dir: Path) -> Path:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    vocab = llm._model.vocab
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    cases = []
    used: set[int] = set()
    for text in FIXED + fuzz_strings():
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        ids_special = llm.tokenize(text.encode(), add_bos=False, special=True)
        used.update(ids, ids_special)
        cases.append({"text": text, "ids": ids, "ids_special": ids_special})
    with_bos = [{"text": t, "ids": llm.tokenize(t.encode(), add_bos=True, special=True)}
                for t in ["", "Hello world", "<start_of_turn>user\nhi", "<|im_start|>user\nhi"]]
    rng = random.Random(7)
    sample = sorted(used | set(range(min(n_vocab, 600))) | {rng.randrange(n_vocab) for _ in range(1500)})
    pieces = {str(t): _piece(llama_cpp, vocab, t).hex() for t in sample}
    eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    data = {
        "model": os.path.basename(path),
        "llama_cpp_python": llama_cpp.__version__,
        "n_vocab": n_vocab,
        "bos_id": llama_cpp.llama_vocab_bos(vocab),
        "eos_id": llama_cpp.llama_vocab_eos(vocab),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "eog_ids": eog,
        "cases": cases,
        "with_bos": with_bos,
        "pieces": pieces,
    }
    out = out_dir / f"tokens_{name}.json"
    out.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smol", default=os.environ.get("LEANLM_TEST_SMOL", "/tmp/smol.gguf"))
    ap.add_argument("--gemma", default=os.environ.get("LEANLM_TEST_GEMMA", "/tmp/gemma.gguf"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, path in (("smol", args.smol), ("gemma", args.gemma)):
        print("wrote", record(path, name, out_dir))


if __name__ == "__main__":
    main()
