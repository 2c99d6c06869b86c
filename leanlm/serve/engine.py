"""Continuous batching: requests join and leave the running batch between decode steps.

Split as in nano-vllm: a `Sequence` holds one request's state; the `Engine` gives each sequence a row of
one shared KV cache (`ModelCache` with `max_batch` rows) and runs, per iteration, at most one prefill
chunk (so a long prompt delays the others by one chunk, not by its whole prefill) and then one decode
step: a single batched forward over rows 0..hi-1, hi being one past the highest busy row.

Rows inside 0..hi-1 that are not decoding still go through that forward, with a harmless input:
- an idle row is fed position 0; `ModelCache.clear_row` forgets it when a sequence takes the row;
- a row in the middle of its prefill is fed its next prompt position P. That writes junk into slot
  P % size, which the row's next prefill chunk overwrites before anything reads it. Example: row 2 has
  prefilled positions 0..255 of a 600-token prompt; a decode step feeds it position 256, so slot 256 holds
  junk; the next chunk writes positions 256..511 (slot 256 included) and only then attends.
The forward's outputs for those rows are dropped. With speculative decoding (speculation.py) the step
verifies every row's drafts in one forward of T tokens per row, padded by the same rules.

The engine runs in its own thread; `emit` callbacks are called from it (the server hops them onto its
event loop).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from leanlm.errors import LeanLMError
from leanlm.formats.tokenizer import StreamDecoder
from leanlm.llm import LLM, Speculation
from leanlm.model.cache import ModelCache
from leanlm.runtime.sampling import SamplingParams, sample
from leanlm.runtime.speculative import Proposer, recent
from leanlm.runtime.stops import StopStrings
from leanlm.runtime.structured import Constraint
from leanlm.serve.speculation import RowSpeculation


@dataclass
class Output:
    """One event of a sequence: a piece of text (with its token), or the end (finish_reason set)."""

    text: str = ""
    token: int | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprob: float | None = None  # of `token` under the model (when the request asked for logprobs)
    top_logprobs: list[tuple[int, float]] | None = None  # the `logprobs` most likely tokens and theirs


Emit = Callable[[Output], None]


class Sequence:
    def __init__(self, prompt: Seq[int], params: SamplingParams, emit: Emit, llm: LLM, max_len: int,
                 logprobs: int | None = None, constraint: Constraint | None = None) -> None:
        self.prompt, self.params, self.emit, self.logprobs = list(prompt), params, emit, logprobs
        self.constraint = constraint  # structured output: masks the logits, advanced by each token
        n = len(self.prompt)
        self.max_tokens = min(params.max_tokens, max_len - n)
        self.row = -1
        self.prefilled = 0  # prompt tokens already in the cache
        self.next_token: int | None = None  # sampled, not yet fed back
        self.generated: list[int] = []
        self.tokens = list(prompt)  # the prompt and every generated token (for proposers, repetition penalty)
        self.proposer: Proposer | None = None  # speculative decoding's drafts for this sequence, if any
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.detok, self.stops = StreamDecoder(llm.tokenizer), StopStrings(params.stop)
        self.stop_ids = frozenset() if params.ignore_eos else llm.tokenizer.eos_ids
        self.cancelled = self.finished = False
        self.last_logprobs: tuple[float | None, list[tuple[int, float]] | None] = (None, None)
        self.arrived = time.perf_counter()

    @property
    def decoding(self) -> bool:
        return self.next_token is not None

    @property
    def position(self) -> int:
        """Position of the token fed next (next_token while decoding, else the next prompt token)."""
        return len(self.prompt) + len(self.generated) - 1 if self.decoding else self.prefilled

    def cancel(self) -> None:
        """Stop this sequence at the next engine iteration (a client went away)."""
        self.cancelled = True


class Engine:
    def __init__(self, llm: LLM, max_batch: int = 8, max_len: int | None = None, chunk: int = 256,
                 speculation: Speculation | None = None, speculate_max_batch: int | None = None) -> None:
        """speculation: verify drafts for each sequence (LLM.speculation, set by `llm.speculate`), or None;
        speculate_max_batch: draft only while at most this many sequences decode (None: always)."""
        cfg = llm.model.cfg
        self.llm, self.max_batch, self.chunk = llm, max_batch, chunk
        self.threads = torch.get_num_threads()
        self.max_len = min(max_len or cfg.context_length, cfg.context_length)
        self.spec = RowSpeculation(llm, speculation, speculate_max_batch) if speculation is not None else None
        extra = 0
        if speculation is not None:
            if not 1 <= speculation.k < chunk:
                raise LeanLMError(f"speculate must be in [1, {chunk - 1}] (the prefill chunk bounds a verified "
                                  "block)")
            extra = speculation.k  # slots for the padding of a block that starts at the context's last position
        self.cache = ModelCache.for_model(llm.model, max_batch, self.max_len + extra, chunk)
        self.rows: list[Sequence | None] = [None] * max_batch
        self.waiting: deque[Sequence] = deque()
        self.jobs: deque[tuple[Callable[[], Any], Future]] = deque()  # run on the engine thread (run_job)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.steps = 0  # decode steps run
        self.last_batch = 0  # sequences decoded in the last step

    # --- requests ----------------------------------------------------------------------------
    def submit(self, prompt: Seq[int], params: SamplingParams, emit: Emit, logprobs: int | None = None,
               constraint: Constraint | None = None) -> Sequence:
        """Queue a sequence; `emit` gets its Outputs (with the top `logprobs` alternatives if not None);
        a constraint (structured.Constraint, one per sequence) restricts the tokens it may sample."""
        if not prompt:
            raise LeanLMError("the prompt is empty")
        if len(prompt) >= self.max_len:
            raise LeanLMError(f"the prompt is {len(prompt)} tokens, which does not fit the context of "
                              f"{self.max_len} tokens")
        seq = Sequence(prompt, params, emit, self.llm, self.max_len, logprobs, constraint)
        with self._wake:
            self.waiting.append(seq)
            self._wake.notify()
        return seq

    def run_job(self, fn: Callable[[], Any]) -> Future:
        """Run fn on the engine's thread between steps (model work outside generation, e.g. prompt
        logprobs): one thread does all model work, see `start`."""
        fut: Future = Future()
        with self._wake:
            self.jobs.append((fn, fut))
            self._wake.notify()
        return fut

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.rows)

    # --- the loop ----------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop in a background thread (tests, notebooks). `leanlm serve` runs it on the main thread
        instead (`run_forever`): a second thread starting OpenMP parallel regions gets its own OpenMP thread
        team, and on a 2-core machine the two teams' spinning workers halve decode speed (measured 9.9 ms
        per step on the main thread, 21 ms on another)."""
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="leanlm-engine", daemon=True)
        self._thread.start()

    def run_forever(self) -> None:
        """Run the loop on the calling thread until `shutdown` is called from another one."""
        self._running = True
        self._loop()

    def shutdown_nowait(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()

    def shutdown(self) -> None:
        self.shutdown_nowait()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        # OpenMP's thread count is per calling thread: give this one what the loader set for the process
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                with self._wake:
                    while self._running and not self.waiting and not self.active and not self.jobs:
                        self._wake.wait()
                    if not self._running:
                        return
                try:
                    self.step()
                except Exception:  # a bug must not take the server down: end what was running, keep serving
                    traceback.print_exc(file=sys.stderr)
                    for seq in self.rows:
                        if seq is not None:
                            self._finish(seq, "abort", "", flush=False)

    def step(self) -> None:
        """One iteration: jobs, retire cancelled sequences, admit waiting ones, one prefill chunk, one decode step."""
        while self.jobs:
            fn, fut = self.jobs.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:  # reported to the caller, the engine goes on
                    fut.set_exception(e)
        for seq in self.rows:
            if seq is not None and seq.cancelled:
                self._finish(seq, "abort", "")
        with self._wake:
            for r in range(self.max_batch):
                if self.rows[r] is None and self.waiting:
                    seq = self.waiting.popleft()
                    if seq.cancelled:
                        continue
                    seq.row, self.rows[r] = r, seq
                    self.cache.clear_row(r)
                    if self.spec is not None:
                        self.spec.attach(seq)
        prefilling = [s for s in self.rows if s is not None and not s.decoding]
        if prefilling:
            self._prefill_chunk(min(prefilling, key=lambda s: s.arrived))
        if any(s is not None and s.decoding for s in self.rows):
            self._decode()

    def _prefill_chunk(self, seq: Sequence) -> None:
        s, n = seq.prefilled, len(seq.prompt)
        e = min(n, s + self.chunk)
        model = self.llm.model
        ids = torch.tensor([seq.prompt[s:e]], device=model.device)
        pos = torch.arange(s, e, device=model.device)[None]
        logits = model(ids, pos, self.cache.rows(seq.row, seq.row + 1), last_only=True, kv_len=e)
        seq.prefilled = e
        if e == n:
            if seq.max_tokens <= 0:
                self._finish(seq, "length", "")
            else:
                self._accept(seq, logits[:, -1])

    def _decode(self) -> None:
        hi = max(r for r, s in enumerate(self.rows) if s is not None) + 1
        live = [s for s in self.rows[:hi] if s is not None and s.decoding]
        drafts = self.spec.drafts(live) if self.spec is not None else {}
        T = 1 + max((len(d) for d, _ in drafts.values()), default=0)  # tokens per row in this forward
        tokens = torch.zeros(hi, T, dtype=torch.long)
        positions = torch.arange(T).repeat(hi, 1)  # idle rows: 0..T-1 (the module docstring)
        for r, seq in enumerate(self.rows[:hi]):
            if seq is not None:
                positions[r] += seq.position
        for seq in live:
            block = [seq.next_token, *drafts.get(seq.row, ([], None))[0]]
            tokens[seq.row, :len(block)] = torch.tensor(block)
        kv_len = int(positions.max()) + 1
        step = self.llm.decode_step(hi, tokens=T)
        logits = step(self.llm.model, self.cache.rows(0, hi), tokens, positions, kv_len)
        if T == 1:
            logits = logits[:, None]  # (hi, T, V)
        self.steps, self.last_batch = self.steps + 1, len(live)
        for seq in live:
            d, q = drafts.get(seq.row, ([], None))
            if d:
                assert self.spec is not None
                self.spec.settle(seq, logits[seq.row, :len(d) + 1], d, q, self._commit)
            else:
                self._accept(seq, logits[seq.row, :1])

    # --- tokens out --------------------------------------------------------------------------
    def _accept(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Sample the next token from logits (1, V), stream it, and stop the sequence where it ends."""
        p = seq.params
        raw = logits
        if seq.generated and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(seq.generated), minlength=logits.shape[-1]).float()
            logits = logits.float() - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        if seq.constraint is not None:
            logits = seq.constraint.apply(logits)
        tid = int(sample(logits, p, recent(seq.tokens, p, logits.device)[None], seq.generator)[0])
        self._commit(seq, tid, raw)

    def _commit(self, seq: Sequence, tid: int, raw: torch.Tensor) -> bool:
        """Append token tid (raw: the model's logits (1, V) it was drawn from), stream it, end the sequence
        where it ends; False once it has ended."""
        lp = top = None
        if seq.logprobs is not None:  # under the model's own distribution (before any sampling settings)
            logp = torch.log_softmax(raw[0].float(), -1)
            lp = float(logp[tid])
            if seq.logprobs > 0:
                v, i = logp.topk(seq.logprobs)
                top = list(zip(i.tolist(), v.tolist()))
        seq.generated.append(tid)
        seq.tokens.append(tid)
        seq.last_logprobs = (lp, top)
        if tid in seq.stop_ids:
            return self._finish(seq, "stop", "")
        if seq.constraint is not None:
            seq.constraint.advance(tid)
        text = seq.stops.push(seq.detok.push(tid))
        if seq.stops.stopped:
            return self._finish(seq, "stop", text, flush=False)
        if seq.constraint is not None and seq.constraint.done:  # the JSON value is complete: no step for EOS
            return self._finish(seq, "stop", text)
        if len(seq.generated) >= seq.max_tokens:
            return self._finish(seq, "length", text)
        seq.next_token = tid
        seq.emit(Output(text, tid, None, len(seq.prompt), len(seq.generated), lp, top))
        return True

    def _finish(self, seq: Sequence, reason: str, text: str, flush: bool = True) -> bool:
        if flush and reason != "abort":
            tail = seq.stops.push(seq.detok.flush())
            text += tail if seq.stops.stopped else tail + seq.stops.flush()
        seq.finished, seq.next_token, seq.proposer = True, None, None  # (a draft model's cache goes with it)
        if seq.row >= 0:
            self.rows[seq.row] = None
        lp, top = seq.last_logprobs if reason != "abort" else (None, None)
        seq.emit(Output(text, seq.generated[-1] if seq.generated else None, reason, len(seq.prompt),
                        len(seq.generated), lp, top))
        return False
