"""Prefill / decode speed and peak memory of leanlm vs llama-cpp-python on the same GGUF file.

Usage: python bench/decode.py [--model smollm2-135m|PATH] [--prompt-tokens 256] [--gen-tokens 128]
                              [--threads 2] [--dtype auto] [--batch 1] [--plot FILE.png] [--json]

A thin wrapper over `leanlm bench` (leanlm/bench.py, which documents the method): it compares against
llama.cpp whenever llama-cpp-python is installed, and prints leanlm's numbers alone otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from leanlm.tools.bench import has_llamacpp  # noqa: E402
from leanlm.tools.cli import main as leanlm_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="registry name or path to a .gguf file")
    ap.add_argument("--prompt-tokens", default="256")
    ap.add_argument("--gen-tokens", default="128")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--dtype", default="auto", help="leanlm weights dtype: auto, float32, bfloat16")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,8,32")
    ap.add_argument("--plot", default=None, help="PNG of decode tok/s against batch size")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()
    argv = ["bench", args.model, "--prompt-tokens", args.prompt_tokens, "--gen-tokens", args.gen_tokens,
            "--threads", args.threads, "--dtype", args.dtype, "--batch", args.batch]
    if has_llamacpp():
        argv += ["--compare", "llama.cpp"]
    else:
        print("llama-cpp-python is not installed: leanlm only", file=sys.stderr)
    argv += ["--plot", args.plot] if args.plot else []
    return leanlm_main(argv + (["--json"] if args.json else []))


if __name__ == "__main__":
    sys.exit(main())
