"""The `leanlm` command: thin subcommands over the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import LeanLMError


def _add_model(p: argparse.ArgumentParser, optional: bool = False) -> None:
    from .hub import DEFAULT_MODEL

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


def _speculate(llm, a: argparse.Namespace) -> None:  # noqa: ANN001
    """Switch on the speculative decoding the flags ask for."""
    from .llm import load

    draft = None
    if a.draft is not None:
        draft = load(a.draft, dtype=a.draft_dtype, threads=a.threads, prefill_chunk=a.prefill_chunk,
                     compile=a.compile)
    if draft is not None or a.lookup or a.early_exit is not None:
        llm.speculate(a.speculate, draft=draft, lookup=a.lookup, early_exit=a.early_exit)


def _params(a: argparse.Namespace):  # noqa: ANN202
    from .sampling import SamplingParams

    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                          min_p=a.min_p, repeat_penalty=a.repeat_penalty, seed=a.seed, stop=tuple(a.stop),
                          ignore_eos=a.ignore_eos)


def _json_schema(a: argparse.Namespace) -> dict | bool | None:
    """What --json / --json-schema ask for, as LLM.constraint takes it."""
    if a.json_schema is None:
        return True if a.json else None
    try:
        return json.loads(Path(a.json_schema).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LeanLMError(f"cannot read the JSON Schema {a.json_schema}: {e}") from e


def _load(a: argparse.Namespace):  # noqa: ANN202
    from .llm import load

    return load(a.model, dtype=a.dtype, threads=a.threads, prefill_chunk=a.prefill_chunk, compile=a.compile,
                kv_cache=a.kv_cache)


def cmd_pull(a: argparse.Namespace) -> None:
    from .hub import pull

    print(pull(a.name, force=a.force))


def cmd_list(a: argparse.Namespace) -> None:
    from .hub import list_cached

    rows = list_cached()
    if not rows:
        print("no models cached (try: leanlm pull smollm2-135m)", file=sys.stderr)
    for name, path, size in rows:
        print(f"{name:<16} {size / 2**20:8.1f} MiB  {path}")


def cmd_run(a: argparse.Namespace) -> None:
    rank = 0
    if a.tensor_parallel:  # one process per rank (torchrun): each holds 1/W of every block (tp.py)
        from .tp import init_from_env, shared_seed

        rank, world = init_from_env()
        a.seed = shared_seed(a.seed)  # the same draws on every rank
        if rank != 0:
            sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (rank 0 speaks for all)
    params, schema = _params(a), _json_schema(a)
    llm = _load(a)
    if a.tensor_parallel:
        from .tp import shard

        shard(llm.model, rank, world)
    _speculate(llm, a)
    llm.constraint(schema)  # an unenforceable schema fails here, before any output
    pieces = llm.generate(a.prompt, params, json_schema=schema) if a.raw else \
        llm.chat([{"role": "user", "content": a.prompt}], params, json_schema=schema)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = llm.last_stats
    spec = ""
    if llm.speculation is not None and llm.last_spec is not None:
        sp = llm.last_spec
        spec = (f" | {llm.speculation.kind} k={llm.speculation.k}: {sp.acceptance:.0%} of drafts accepted, "
                f"{sp.tokens_per_forward:.2f} tok per target forward")
    print(f"[prompt {s.prompt_tokens} tok, {s.prefill_tps:.1f} tok/s | generated {s.gen_tokens} tok, "
          f"{s.decode_tps:.1f} tok/s ({llm.decode_kind()}){spec} | "
          f"{s.finish_reason}]", file=sys.stderr)


def cmd_chat(a: argparse.Namespace) -> None:
    from .repl import repl

    llm = _load(a)
    _speculate(llm, a)
    repl(llm, _params(a), system=a.system, json_schema=_json_schema(a))


def cmd_tokenize(a: argparse.Namespace) -> None:
    from .hub import resolve_model
    from .loaders import load_tokenizer

    tok = load_tokenizer(resolve_model(a.model))
    print(json.dumps(tok.encode(a.text, add_bos=False, special=a.special)))


def cmd_perplexity(a: argparse.Namespace) -> None:
    from dataclasses import asdict
    from pathlib import Path

    from .llm import load
    from .perplexity import perplexity

    try:
        text = Path(a.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LeanLMError(f"cannot read text file {a.file}: {e}") from None
    llm = _load(a)
    ref = load(a.reference, dtype=a.dtype, threads=a.threads) if a.reference else None
    r = perplexity(llm, text, a.ctx, reference=ref, max_chunks=a.chunks, batch_chunk=a.prefill_chunk,
                   progress=not a.json)
    if a.json:
        print(json.dumps(asdict(r)))
        return
    print(f"perplexity {r.perplexity:.4f} over {r.n_tokens_scored} tokens ({r.n_chunks} windows of {r.ctx})")
    if r.kl_mean is not None:
        print(f"mean KL vs reference {r.kl_mean:.6f}, top-1 agreement {100 * (r.top1_agree or 0):.2f}%")


def cmd_quantize(a: argparse.Namespace) -> None:
    from .quantize import quantize

    r = quantize(a.src, a.dst, a.type, method=a.method, calibration=a.calibration, calib_tokens=a.calib_tokens,
                 progress=True)
    print(r.summary())


def cmd_distill(a: argparse.Namespace) -> None:
    from .distill import distill_checkpoint, plot_losses

    try:
        layers = [int(x) for x in a.layers.split(",")] if a.layers else None
    except ValueError:
        raise LeanLMError(f"--layers wants comma-separated block indices such as 0,2,4, not '{a.layers}'") from None
    r = distill_checkpoint(a.teacher, a.data, a.out, keep=a.keep, layers=layers, steps=a.steps, lr=a.lr,
                           temperature=a.temperature, seq_len=a.seq_len, batch=a.batch,
                           eval_fraction=a.eval_fraction, ftype=a.type)
    if a.plot:
        plot_losses(r, a.plot)
    print(r.summary())


def cmd_plan(a: argparse.Namespace) -> None:
    from .memory import parse_size, plan

    if (a.batch is None) == (a.memory is None):
        raise LeanLMError("give either --batch or --memory")
    llm = _load(a)
    p = plan(llm.model, a.ctx, batch=a.batch, memory=parse_size(a.memory) if a.memory else None,
             chunk=a.prefill_chunk)
    print(json.dumps({**p.__dict__, "kv": p.kv, "total": p.total}) if a.json else p.summary())


def cmd_bench(a: argparse.Namespace) -> None:
    from .bench import bench_main

    bench_main(a)


def cmd_serve(a: argparse.Namespace) -> None:
    from .serve.server import serve

    llm = _load(a)
    _speculate(llm, a)
    if a.memory is not None:  # as many sequences of --ctx positions as the budget holds
        from .memory import parse_size, plan

        p = plan(llm.model, a.ctx, memory=parse_size(a.memory), chunk=min(256, a.prefill_chunk))
        print(f"leanlm: {p.summary()}", file=sys.stderr)
        a.max_batch = p.batch
    serve(llm, a.model, host=a.host, port=a.port, api_key=a.api_key, max_batch=a.max_batch, ctx=a.ctx,
          speculate_max_batch=a.speculate_max_batch or None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leanlm", description="A lean, fast LLM runtime.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("pull", help="download a registry model into the cache")
    s.add_argument("name")
    s.add_argument("--force", action="store_true", help="download again even if cached")
    s.set_defaults(fn=cmd_pull)
    sub.add_parser("list", help="show cached models").set_defaults(fn=cmd_list)
    s = sub.add_parser("run", help="answer one prompt, streaming to stdout")
    _add_model(s, optional=True)
    s.add_argument("prompt", nargs="?", default="Write a haiku about a small fast language model.")
    s.add_argument("--raw", action="store_true", help="no chat template: complete the prompt as text")
    s.add_argument("--tensor-parallel", action="store_true",
                   help="split every block over the processes torchrun started (dense --dtype float32 or bfloat16)")
    _add_sampling(s)
    _add_speculation(s)
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("chat", help="interactive chat (/reset, /exit; Ctrl-C stops a reply)")
    _add_model(s, optional=True)
    s.add_argument("--system", default=None, help="system prompt")
    _add_sampling(s)
    _add_speculation(s)
    s.set_defaults(fn=cmd_chat)
    s = sub.add_parser("tokenize", help="print token ids as JSON (no BOS)")
    s.add_argument("model")
    s.add_argument("text")
    s.add_argument("--special", action="store_true", help="parse special tokens in the text")
    s.set_defaults(fn=cmd_tokenize)
    s = sub.add_parser("perplexity", help="perplexity of a text file, computed as llama.cpp's tool does")
    _add_model(s)
    s.add_argument("--file", required=True, help="UTF-8 text file")
    s.add_argument("--ctx", type=int, default=512, help="window size; the second half of each is scored")
    s.add_argument("--chunks", type=int, default=None, help="score only the first N windows")
    s.add_argument("--reference", default=None, help="also report KL divergence and top-1 agreement vs this model")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(fn=cmd_perplexity)
    from .quantize import METHODS, TYPES

    s = sub.add_parser("quantize", help="write a GGUF file (llama.cpp reads it too) in a quantized type")
    s.add_argument("src", help="registry name, .gguf file (any type) or checkpoint folder")
    s.add_argument("dst", help="output .gguf path")
    s.add_argument("--type", default="q4_0", choices=list(TYPES), help="type of the weight matrices (default q4_0)")
    s.add_argument("--method", default="rtn", choices=METHODS, help="round-to-nearest, GPTQ or AWQ (default rtn)")
    s.add_argument("--calibration", default=None, help="UTF-8 text file for gptq/awq")
    s.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens to use (default 8192)")
    s.set_defaults(fn=cmd_quantize)
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
    s.set_defaults(fn=cmd_distill)
    s = sub.add_parser("plan", help="memory for B sequences of C positions, or the most sequences a budget holds")
    _add_model(s, optional=True)
    s.add_argument("--ctx", type=int, default=2048, help="positions per sequence (default 2048)")
    s.add_argument("--batch", type=int, default=None, help="sequences decoded together")
    s.add_argument("--memory", default=None, help="or a budget such as 4GiB: the most sequences that fit")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(fn=cmd_plan)
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
    s.set_defaults(fn=cmd_bench, compile="on")
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
    s.set_defaults(fn=cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fn: Callable[[argparse.Namespace], None] = args.fn
    try:
        fn(args)
    except LeanLMError as e:
        print(f"leanlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
