"""The `leanlm` command: thin subcommands over the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from leanlm.errors import LeanLMError
from leanlm.tools.cli_args import build_parser

__all__ = ["build_parser", "main"]


def _speculate(llm, a: argparse.Namespace) -> None:  # noqa: ANN001
    """Switch on the speculative decoding the flags ask for."""
    from leanlm.llm import load

    draft = None
    if a.draft is not None:
        draft = load(a.draft, dtype=a.draft_dtype, threads=a.threads, prefill_chunk=a.prefill_chunk,
                     compile=a.compile)
    if draft is not None or a.lookup or a.early_exit is not None:
        llm.speculate(a.speculate, draft=draft, lookup=a.lookup, early_exit=a.early_exit)


def _params(a: argparse.Namespace):  # noqa: ANN202
    from leanlm.runtime.sampling import SamplingParams

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
    from leanlm.llm import load

    return load(a.model, dtype=a.dtype, threads=a.threads, prefill_chunk=a.prefill_chunk, compile=a.compile,
                kv_cache=a.kv_cache)


def cmd_pull(a: argparse.Namespace) -> None:
    from leanlm.formats.hub import pull

    print(pull(a.name, force=a.force))


def cmd_list(a: argparse.Namespace) -> None:
    from leanlm.formats.hub import list_cached

    rows = list_cached()
    if not rows:
        print("no models cached (try: leanlm pull smollm2-135m)", file=sys.stderr)
    for name, path, size in rows:
        print(f"{name:<16} {size / 2**20:8.1f} MiB  {path}")


def cmd_run(a: argparse.Namespace) -> None:
    rank = 0
    if a.tensor_parallel:  # one process per rank (torchrun): each holds 1/W of every block (tp.py)
        from leanlm.model.parallel import init_from_env, shared_seed

        rank, world = init_from_env()
        a.seed = shared_seed(a.seed)  # the same draws on every rank
        if rank != 0:
            sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (rank 0 speaks for all)
    params, schema = _params(a), _json_schema(a)
    llm = _load(a)
    if a.tensor_parallel:
        from leanlm.model.parallel import shard

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
    from leanlm.tools.repl import repl

    llm = _load(a)
    _speculate(llm, a)
    repl(llm, _params(a), system=a.system, json_schema=_json_schema(a))


def cmd_tokenize(a: argparse.Namespace) -> None:
    from leanlm.formats import load_tokenizer
    from leanlm.formats.hub import resolve_model

    tok = load_tokenizer(resolve_model(a.model))
    print(json.dumps(tok.encode(a.text, add_bos=False, special=a.special)))


def cmd_perplexity(a: argparse.Namespace) -> None:
    from dataclasses import asdict
    from pathlib import Path

    from leanlm.llm import load
    from leanlm.tools.perplexity import perplexity

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
    from leanlm.tools.quantize import quantize

    r = quantize(a.src, a.dst, a.type, method=a.method, calibration=a.calibration, calib_tokens=a.calib_tokens,
                 progress=True)
    print(r.summary())


def cmd_distill(a: argparse.Namespace) -> None:
    from leanlm.tools.distill import TrainConfig, distill_checkpoint, plot_losses

    try:
        layers = [int(x) for x in a.layers.split(",")] if a.layers else None
    except ValueError:
        raise LeanLMError(f"--layers wants comma-separated block indices such as 0,2,4, not '{a.layers}'") from None
    config = TrainConfig(steps=a.steps, lr=a.lr, temperature=a.temperature, batch=a.batch, seq_len=a.seq_len,
                         eval_fraction=a.eval_fraction)
    r = distill_checkpoint(a.teacher, a.data, a.out, keep=a.keep, layers=layers, config=config, ftype=a.type)
    if a.plot:
        plot_losses(r, a.plot)
    print(r.summary())


def cmd_plan(a: argparse.Namespace) -> None:
    from leanlm.runtime.memory import parse_size, plan

    if (a.batch is None) == (a.memory is None):
        raise LeanLMError("give either --batch or --memory")
    llm = _load(a)
    p = plan(llm.model, a.ctx, batch=a.batch, memory=parse_size(a.memory) if a.memory else None,
             chunk=a.prefill_chunk)
    print(json.dumps({**p.__dict__, "kv": p.kv, "total": p.total}) if a.json else p.summary())


def cmd_bench(a: argparse.Namespace) -> None:
    from leanlm.tools.bench import bench_main

    bench_main(a)


def cmd_serve(a: argparse.Namespace) -> None:
    from leanlm.serve.server import serve

    llm = _load(a)
    _speculate(llm, a)
    if a.memory is not None:  # as many sequences of --ctx positions as the budget holds
        from leanlm.runtime.memory import parse_size, plan

        p = plan(llm.model, a.ctx, memory=parse_size(a.memory), chunk=min(256, a.prefill_chunk))
        print(f"leanlm: {p.summary()}", file=sys.stderr)
        a.max_batch = p.batch
    serve(llm, a.model, host=a.host, port=a.port, api_key=a.api_key, max_batch=a.max_batch, ctx=a.ctx,
          speculate_max_batch=a.speculate_max_batch or None)


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "pull": cmd_pull, "list": cmd_list, "run": cmd_run, "chat": cmd_chat, "tokenize": cmd_tokenize,
    "perplexity": cmd_perplexity, "quantize": cmd_quantize, "distill": cmd_distill, "plan": cmd_plan,
    "bench": cmd_bench, "serve": cmd_serve,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fn: Callable[[argparse.Namespace], None] = COMMANDS[args.command]
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
