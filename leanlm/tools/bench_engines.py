"""What runs inside the engine subprocesses of `leanlm bench`: leanlm, and llama.cpp through llama-cpp-python.

Each engine reports its load time, RSS, and per batch size B: time to first token (prefill of the B prompts
plus the first greedy pick), decode seconds for the remaining gen - 1 steps, and the greedy ids. Only the
standard library is imported at module level, so an engine's RSS "above imports" is its own.

llama.cpp uses its low-level API: batch B is one context with `n_seq_max = B` and a KV cache of B x (prompt +
gen) cells (rounded up to llama.cpp's 256-cell padding per sequence), sequence s under seq_id s. Prefill sends
the B prompts in `llama_batch`es of up to N_BATCH tokens (logits only for each sequence's last prompt token);
each decode step sends one token per sequence. The context keeps llama.cpp's defaults (flash attention auto,
F16 KV cache).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from leanlm.errors import LeanLMError

if TYPE_CHECKING:
    from leanlm.model.transformer import Transformer
    from leanlm.runtime.steps.eager import DecodeStep

WARMUP_PROMPT, WARMUP_GEN = 16, 4
N_BATCH = 512  # llama.cpp tokens per llama_decode call during prefill
_silent_log: Any = None  # keeps llama.cpp's no-op log callback alive


@dataclass
class BenchSpec:
    """What to measure; travels as JSON to the engine subprocesses."""

    model: str  # resolved path
    prompt_tokens: int = 256
    gen_tokens: int = 128
    batches: tuple[int, ...] = (1,)
    threads: int = 1
    dtype: str = "auto"
    chunk: int = 512
    compile: str = "on"  # the decode step: compiled (built once and cached) or eager ("off")
    kv_cache: str = "auto"  # our K/V cache type (llama.cpp keeps its default, f16)


# --- measurements ------------------------------------------------------------------------------
def rss_mib() -> float:
    """Current resident set size in MiB."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def run_row(batch: int, prompt: int, ids: list[list[int]], ttft_s: float, decode_s: float) -> dict[str, Any]:
    """One timed run: per-sequence token counts, aggregate rates, peak RSS so far, the greedy ids."""
    gen = len(ids[0])
    return {"batch": batch, "prompt_tokens": prompt, "gen_tokens": gen, "total_gen_tokens": sum(map(len, ids)),
            "ttft_s": ttft_s, "prefill_tps": batch * prompt / ttft_s if ttft_s else 0.0, "decode_s": decode_s,
            "decode_tps": batch * (gen - 1) / decode_s if decode_s else 0.0, "peak_rss_mib": peak_rss_mib(),
            "ids": ids}


# --- leanlm engine -----------------------------------------------------------------------------
def weight_bytes(model: Transformer) -> tuple[int, int]:
    """(bytes of all parameters and buffers, bytes read per decode step): the embedding table is only
    gathered from, so it does not count unless it shares storage with the output head."""

    def storages(mod: Any) -> dict[int, int]:
        out: dict[int, int] = {}
        for t in [*mod.parameters(), *mod.buffers()]:
            if t is not None and t.numel():
                out[t.data_ptr()] = max(out.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return out

    every, embed, head = storages(model), storages(model.tok_embeddings), storages(model.output)
    total = sum(every.values())
    return total, total - sum(n for ptr, n in embed.items() if ptr not in head)


def greedy_batch(model: Transformer, prompt: list[int], batch: int, gen: int, chunk: int = 512,
                 step: DecodeStep | None = None) -> tuple[list[list[int]], float, float]:
    """Decode `batch` copies of `prompt` together, greedily: (ids per sequence, TTFT s, decode s). The prompts
    go through the model `chunk` rows per forward at most (chunk // batch positions of every sequence), as
    llama.cpp's n_batch bounds its own: the activations' memory stays that of one chunk."""
    import torch

    from leanlm.model.cache import ModelCache
    from leanlm.runtime.sampling import argmax
    from leanlm.runtime.steps.eager import decode_step

    step = step or decode_step
    n, device = len(prompt), model.device
    with torch.inference_mode():
        cache = ModelCache.for_model(model, batch, n + gen, chunk)
        ids = torch.tensor([prompt], device=device).expand(batch, n)
        out = torch.empty(batch, gen, dtype=torch.long, device=device)
        t0 = time.perf_counter()
        step_len = max(1, chunk // batch)
        for s in range(0, n, step_len):
            piece = ids[:, s:s + step_len]
            pos = torch.arange(s, s + piece.shape[1], device=device).expand(batch, -1)
            cache.kv_len = s + piece.shape[1]
            logits = model(piece, pos, cache, last_only=True)[:, -1]
        out[:, 0] = tok = argmax(logits)
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for i in range(1, gen):
            pos = torch.full((batch, 1), n + i - 1, device=device)
            cache.kv_len = n + i
            out[:, i] = tok = argmax(step(model, cache, tok.view(batch, 1), pos, n + i))
        decode_s = time.perf_counter() - t1
    return out.tolist(), ttft, decode_s


def run_leanlm(spec: BenchSpec, ids: list[int]) -> dict[str, Any]:
    import torch

    from leanlm import __version__
    from leanlm.llm import load
    from leanlm.runtime.generate import GenStats, generate_ids
    from leanlm.runtime.sampling import argmax

    base = rss_mib()
    t0 = time.perf_counter()
    llm = load(spec.model, dtype=spec.dtype, threads=spec.threads, progress=False, prefill_chunk=spec.chunk,
               kv_cache=spec.kv_cache)
    load_s = time.perf_counter() - t0
    model = llm.model
    if len(ids) + spec.gen_tokens > model.cfg.context_length:
        raise LeanLMError(f"prompt + generated tokens ({len(ids) + spec.gen_tokens}) exceed the model's context "
                          f"of {model.cfg.context_length}")
    greedy = lambda logits, hist: argmax(logits.float())
    t0 = time.perf_counter()
    steps = {b: llm.decode_step(b, spec.compile) for b in spec.batches}  # compiled steps load (or build) here
    step_load_s = time.perf_counter() - t0
    runs = []
    for b in spec.batches:
        if b == 1:
            list(generate_ids(model, ids[:WARMUP_PROMPT], greedy, WARMUP_GEN, chunk=spec.chunk, step=steps[1]))
            stats = GenStats()
            out = list(generate_ids(model, ids, greedy, spec.gen_tokens, chunk=spec.chunk, stats=stats, step=steps[1]))
            runs.append(run_row(1, len(ids), [out], stats.prefill_s, stats.decode_s))
        else:
            greedy_batch(model, ids[:WARMUP_PROMPT], b, 2, spec.chunk, steps[b])
            runs.append(run_row(b, len(ids), *greedy_batch(model, ids, b, spec.gen_tokens, spec.chunk, steps[b])))
    total, per_step = weight_bytes(model)
    return {"engine": "leanlm", "version": f"leanlm {__version__}, torch {torch.__version__}",
            "threads": torch.get_num_threads(), "dtype": str(model.dtype).removeprefix("torch."),
            "load_s": load_s, "step_load_s": step_load_s, "compile": spec.compile, "decode_step": llm.decode_kind(),
            "weight_bytes": total, "weight_bytes_per_step": per_step,
            "base_rss_mib": base, "peak_rss_mib": peak_rss_mib(), "runs": runs}


# --- llama.cpp engine --------------------------------------------------------------------------
def gguf_weight_bytes(path: str) -> dict[str, int]:
    """Bytes of the GGUF's tensors, and those read per decode step: all but `token_embd.weight` when the
    file has a separate `output.weight` (the embedding is then only gathered from)."""
    from leanlm.formats.gguf_file import GGUFFile

    tensors = GGUFFile(path).tensors
    total = sum(t.nbytes for t in tensors.values())
    skip = tensors["token_embd.weight"].nbytes if "output.weight" in tensors and "token_embd.weight" in tensors else 0
    return {"weight_bytes": total, "weight_bytes_per_step": total - skip}


class _Session:
    """A loaded model and one context sized for a batch of sequences."""

    def __init__(self, path: str, threads: int) -> None:
        global _silent_log
        import llama_cpp

        self.lc, self.threads, self.ctx, self.batch = llama_cpp, threads, None, None
        if _silent_log is None:
            _silent_log = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_silent_log, None)
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise LeanLMError(f"llama.cpp could not load {path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def open(self, n_seq: int, per_seq: int) -> None:
        lc = self.lc
        self.close_context()
        if n_seq > lc.llama_max_parallel_sequences():
            raise LeanLMError(f"llama.cpp decodes at most {lc.llama_max_parallel_sequences()} sequences at once")
        p = lc.llama_context_default_params()
        p.n_seq_max, p.n_ctx = n_seq, n_seq * -(-per_seq // 256) * 256
        p.n_batch = p.n_ubatch = N_BATCH
        p.n_threads = p.n_threads_batch = self.threads
        self.ctx = lc.llama_init_from_model(self.model, p)
        if not self.ctx or lc.llama_n_ctx_seq(self.ctx) < per_seq:
            raise LeanLMError(f"llama.cpp could not make a context for {n_seq} sequences of {per_seq} tokens")
        self.batch = lc.llama_batch_init(max(N_BATCH, n_seq), 0, 1)

    def close_context(self) -> None:
        if self.batch is not None:
            self.lc.llama_batch_free(self.batch)
        if self.ctx:
            self.lc.llama_free(self.ctx)
        self.ctx = self.batch = None

    def close(self) -> None:
        self.close_context()
        self.lc.llama_model_free(self.model)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """Decode (seq, pos, token, want_logits) items in one batch; the greedy pick of each item wanting logits."""
        import numpy as np

        b = self.batch
        for i, (seq, pos, tok, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise LeanLMError("llama_decode failed")
        return [int(np.argmax(np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))))
                for i, item in enumerate(items) if item[3]]

    def greedy(self, prompt: list[int], n_seq: int, gen: int) -> tuple[list[list[int]], float, float]:
        """Decode n_seq copies of prompt together: (ids per sequence, TTFT s, decode s)."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        n = len(prompt)
        items = [(s, p, t, p == n - 1) for s in range(n_seq) for p, t in enumerate(prompt)]
        t0 = time.perf_counter()
        first = []
        for c in range(0, len(items), N_BATCH):
            first += self._decode(items[c:c + N_BATCH])
        ttft = time.perf_counter() - t0
        out = [[t] for t in first]
        t1 = time.perf_counter()
        for i in range(1, gen):
            picks = self._decode([(s, n + i - 1, out[s][-1], True) for s in range(n_seq)])
            for s, t in enumerate(picks):
                out[s].append(t)
        return out, ttft, time.perf_counter() - t1


def run_llamacpp(spec: BenchSpec, ids: list[int]) -> dict[str, Any]:
    import llama_cpp

    base = rss_mib()
    t0 = time.perf_counter()
    sess = _Session(spec.model, spec.threads)
    per_seq = len(ids) + spec.gen_tokens
    sess.open(spec.batches[0], per_seq)
    load_s = time.perf_counter() - t0
    runs = []
    try:
        for i, b in enumerate(spec.batches):
            if i:
                sess.open(b, per_seq)
            sess.greedy(ids[:WARMUP_PROMPT], b, WARMUP_GEN)
            runs.append(run_row(b, len(ids), *sess.greedy(ids, b, spec.gen_tokens)))
    finally:
        sess.close()
    return {"engine": "llama.cpp", "version": f"llama-cpp-python {llama_cpp.__version__}", "threads": spec.threads,
            "dtype": "GGUF types (q8 activations)", "load_s": load_s, "base_rss_mib": base,
            "peak_rss_mib": peak_rss_mib(), "runs": runs}


def child_main() -> None:
    """Engine subprocess: {"engine", "spec", "ids"} on stdin, one JSON line on stdout ({"error"} on a user error)."""
    req = json.loads(sys.stdin.read())
    spec = BenchSpec(**{**req["spec"], "batches": tuple(req["spec"]["batches"])})
    try:
        if req["engine"] == "leanlm":
            res = run_leanlm(spec, req["ids"])
        else:
            res = run_llamacpp(spec, req["ids"])
    except LeanLMError as e:
        res = {"error": str(e)}
    print(json.dumps(res))
