"""The `leanlm` command line: every subcommand's arguments (cli.py runs them)."""

from __future__ import annotations

import argparse
from typing import Any


def _add_model(p: argparse.ArgumentParser, optional: bool = False) -> None:
    from leanlm.formats.catalog import DEFAULT_MODEL

    help_ = "registry name, .gguf file or checkpoint folder"
    if optional:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"{help_} (default {DEFAULT_MODEL})")
    else:
        p.add_argument("model", help=help_)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype; float32 is the exact reference path")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per forward pass")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="compiled decode step, about 2x faster: auto = use it once built, on = build it if missing "
                        "(a minute or two, once per model), off = eager (default auto)")
    p.add_argument("--kv-cache", default="auto", choices=["auto", "int8"],
                   help="K/V cache: auto = the compute dtype, int8 = 8 bits a value (half the memory, faster batches)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.05, help="0 = off")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    p.add_argument("--json", action="store_true", help="answer with a JSON object (constrained decoding)")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="answer with JSON valid under this JSON Schema file (constrained decoding)")


def _add_speculation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (greedy output unchanged; sampled output keeps its distribution)")
    g.add_argument("--draft", default=None, metavar="MODEL", help="draft model with the same tokenizer "
                   "(the same file at --draft-dtype auto drafts for a float32 target: low-precision self-speculation)")
    g.add_argument("--draft-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    g.add_argument("--lookup", action="store_true",
                   help="draft by prompt lookup (n-grams of the prompt and the text so far)")
    g.add_argument("--early-exit", type=int, default=None, metavar="N",
                   help="draft with the model's own first N layers (self-speculation)")
    g.add_argument("--speculate", type=int, default=4, metavar="K", help="draft tokens per round (default 4)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leanlm", description="A lean, fast LLM runtime.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_pull_command, _list_command, _run_command, _chat_command, _tokenize_command, _perplexity_command,
                _quantize_command, _distill_command, _plan_command, _bench_command, _serve_command):  # help order
        add(sub)
    return p


def _pull_command(sub: Any) -> None:
    s = sub.add_parser("pull", help="download a registry model into the cache")
    s.add_argument("name")
    s.add_argument("--force", action="store_true", help="download again even if cached")


def _list_command(sub: Any) -> None:
    sub.add_parser("list", help="show cached models")


def _run_command(sub: Any) -> None:
    s = sub.add_parser("run", help="answer one prompt, streaming to stdout")
    _add_model(s, optional=True)
    s.add_argument("prompt", nargs="?", default="Write a haiku about a small fast language model.")
    s.add_argument("--raw", action="store_true", help="no chat template: complete the prompt as text")
    s.add_argument("--tensor-parallel", action="store_true",
                   help="split every block over the processes torchrun started (dense --dtype float32 or bfloat16)")
    _add_sampling(s)
    _add_speculation(s)


def _chat_command(sub: Any) -> None:
    s = sub.add_parser("chat", help="interactive chat (/reset, /exit; Ctrl-C stops a reply)")
    _add_model(s, optional=True)
    s.add_argument("--system", default=None, help="system prompt")
    _add_sampling(s)
    _add_speculation(s)


def _tokenize_command(sub: Any) -> None:
    s = sub.add_parser("tokenize", help="print token ids as JSON (no BOS)")
    s.add_argument("model")
    s.add_argument("text")
    s.add_argument("--special", action="store_true", help="parse special tokens in the text")


def _perplexity_command(sub: Any) -> None:
    s = sub.add_parser("perplexity", help="perplexity of a text file, computed as llama.cpp's tool does")
    _add_model(s)
    s.add_argument("--file", required=True, help="UTF-8 text file")
    s.add_argument("--ctx", type=int, default=512, help="window size; the second half of each is scored")
    s.add_argument("--chunks", type=int, default=None, help="score only the first N windows")
    s.add_argument("--reference", default=None, help="also report KL divergence and top-1 agreement vs this model")
    s.add_argument("--json", action="store_true", help="print one JSON object")


def _quantize_command(sub: Any) -> None:
    from leanlm.tools.quantize import METHODS, TYPES
    s = sub.add_parser("quantize", help="write a GGUF file (llama.cpp reads it too) in a quantized type")
    s.add_argument("src", help="registry name, .gguf file (any type) or checkpoint folder")
    s.add_argument("dst", help="output .gguf path")
    s.add_argument("--type", default="q4_0", choices=list(TYPES), help="type of the weight matrices (default q4_0)")
    s.add_argument("--method", default="rtn", choices=METHODS, help="round-to-nearest, GPTQ or AWQ (default rtn)")
    s.add_argument("--calibration", default=None, help="UTF-8 text file for gptq/awq")
    s.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens to use (default 8192)")


def _distill_command(sub: Any) -> None:
    s = sub.add_parser("distill", help="train a smaller student (some of the teacher's blocks) to match the teacher")
    s.add_argument("teacher", help="registry name, .gguf file or checkpoint folder")
    s.add_argument("--data", required=True, help="UTF-8 text file to train on (its last part is held out)")
    s.add_argument("--out", required=True, help="student .gguf path")
    s.add_argument("--keep", type=int, default=None, help="blocks the student keeps, spread evenly (default half)")
    s.add_argument("--layers", default=None, help="or exactly these teacher blocks, e.g. 0,2,4,29")
    s.add_argument("--steps", type=int, default=200)
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--temperature", type=float, default=2.0, help="softening of both distributions (default 2)")
    s.add_argument("--seq-len", type=int, default=256, help="tokens per training window (default 256)")
    s.add_argument("--batch", type=int, default=1, help="windows per step (default 1)")
    s.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of the text (default 0.1)")
    s.add_argument("--type", default="f16", choices=["f16", "f32"], help="student weights' type (default f16)")
    s.add_argument("--plot", default=None, metavar="FILE.png", help="plot the training loss")


def _plan_command(sub: Any) -> None:
    s = sub.add_parser("plan", help="memory for B sequences of C positions, or the most sequences a budget holds")
    _add_model(s, optional=True)
    s.add_argument("--ctx", type=int, default=2048, help="positions per sequence (default 2048)")
    s.add_argument("--batch", type=int, default=None, help="sequences decoded together")
    s.add_argument("--memory", default=None, help="or a budget such as 4GiB: the most sequences that fit")
    s.add_argument("--json", action="store_true", help="print one JSON object")


def _bench_command(sub: Any) -> None:
    s = sub.add_parser("bench", help="prefill/decode speed, time to first token, memory, bandwidth (vs llama.cpp)")
    _add_model(s, optional=True)
    s.add_argument("--prompt-tokens", type=int, default=256, help="synthetic prompt length (default 256)")
    s.add_argument("--gen-tokens", type=int, default=128, help="greedy tokens per sequence, EOS ignored (default 128)")
    s.add_argument("--batch", default="1", help="batch sizes to decode, comma-separated, e.g. 1,8,32 (default 1)")
    s.add_argument("--compare", default=None, metavar="llama.cpp", help="also run llama-cpp-python on the same GGUF")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    s.add_argument("--plot", default=None, metavar="FILE.png", help="plot decode tok/s against batch size")
    s.add_argument("--price-per-hour", type=float, default=None, metavar="USD",
                   help="machine price: report USD per million generated tokens")
    s.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run each engine N times, alternating, and report medians (default 1)")
    s.set_defaults(compile="on")


def _serve_command(sub: Any) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _add_model(s, optional=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on API routes")
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    s.add_argument("--ctx", type=int, default=2048, help="context per sequence in tokens (default 2048)")
    s.add_argument("--memory", default=None, metavar="SIZE",
                   help="set --max-batch to the most sequences of --ctx positions a budget such as 2GiB holds")
    _add_speculation(s)
    s.add_argument("--speculate-max-batch", type=int, default=2, metavar="N",
                   help="draft only while at most N sequences decode (default 2; 0 = always)")
