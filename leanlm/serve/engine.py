"""Continuous batching: requests join and leave the running batch between decode steps.

A `Sequence` is one request's state (runtime/sequence.py's, plus its row, prefill progress and `emit`);
the `Scheduler` (scheduler.py) gives each sequence a row of one shared KV cache and decides, per iteration,
at most one prefill chunk (so a long prompt delays the others by one chunk, not by its whole prefill) and
then one decode step: a single batched forward over rows 0..hi-1, hi being one past the highest busy row;
the `Runner` (runner.py) runs them; the `Engine` here owns the thread, turns logits into tokens through
each sequence's chain and streams what each sequence's `commit` gives.

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
import traceback
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from typing import Any

import torch

from leanlm.errors import LeanLMError
from leanlm.llm import LLM, Speculation
from leanlm.model.cache import ModelCache
from leanlm.runtime.sampling import SamplingParams
from leanlm.runtime.structured import Constraint
from leanlm.serve.runner import Runner
from leanlm.serve.scheduler import Scheduler
from leanlm.serve.sequence import Emit, Output, Sequence
from leanlm.serve.speculation import RowSpeculation


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
        self.runner = Runner(llm, max_batch, self.max_len + extra, chunk)
        self.scheduler = Scheduler(max_batch, chunk, self.spec)
        self.jobs: deque[tuple[Callable[[], Any], Future]] = deque()  # run on the engine thread (run_job)
        self._wake = self.scheduler.lock
        self._thread: threading.Thread | None = None
        self._running = False
        self.steps = 0  # decode steps run
        self.last_batch = 0  # sequences decoded in the last step

    # --- requests ----------------------------------------------------------------------------
    def submit(self, prompt: Seq[int], params: SamplingParams, emit: Emit, logprobs: int | None = None,
               constraint: Constraint | None = None) -> Sequence:
        """Queue a sequence; `emit` gets its Outputs (with the top `logprobs` alternatives if not None);
        a constraint (structured.Constraint, one per sequence) restricts the tokens it may sample."""
        # refuses bad prompts
        seq = Sequence(prompt, params, emit, self.llm, self.max_len, logprobs=logprobs, constraint=constraint)
        with self._wake:
            self.scheduler.waiting.append(seq)
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
    def rows(self) -> list[Sequence | None]:
        return self.scheduler.rows

    @property
    def waiting(self) -> deque[Sequence]:
        return self.scheduler.waiting

    @property
    def cache(self) -> ModelCache:
        return self.runner.cache

    @property
    def queued(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def active(self) -> int:
        return self.scheduler.active

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
                            self._end(seq, "abort")

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
                self._end(seq, "abort")
        self.scheduler.admit(self.runner.clear_row)
        work = self.scheduler.prefill_chunk()
        if work is not None:
            seq, s, e = work
            logits = self.runner.prefill(seq.row, seq.prompt[s:e], s)
            seq.prefilled = e
            if e == len(seq.prompt):
                if seq.max_tokens <= 0:
                    self._end(seq, "length")
                else:
                    self._accept(seq, logits)
        batch = self.scheduler.batch()
        if batch is None:
            return
        logits = self.runner.step(batch.blocks, batch.starts)  # (hi, T, V)
        self.steps, self.last_batch = self.steps + 1, len(batch.live)
        for seq in batch.live:
            d, q = batch.drafts.get(seq.row, ([], None))
            if d:
                assert self.spec is not None
                self.spec.settle(seq, logits[seq.row, :len(d) + 1], d, q, self._commit)
            else:
                self._accept(seq, logits[seq.row, :1])

    # --- tokens out --------------------------------------------------------------------------
    def _accept(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Sample the next token from logits (1, V) through the sequence's chain, and commit it."""
        self._commit(seq, int(seq.pick(logits)[0]), logits)

    def _commit(self, seq: Sequence, tid: int, raw: torch.Tensor) -> bool:
        """Append token tid (raw: the model's logits (1, V) it was drawn from), stream it, end the sequence
        where it ends; False once it has ended."""
        text = seq.commit(tid, raw)
        if seq.finish_reason is not None:
            return self._end(seq, seq.finish_reason, text)
        seq.next_token = tid
        lp, top = seq.last_logprobs
        seq.emit(Output(text, tid, None, len(seq.prompt), len(seq.generated), lp, top))
        return True

    def _end(self, seq: Sequence, reason: str, text: str | None = None) -> bool:
        """Retire a sequence: free its row and emit its last event (text: what its commit gave, else the
        held-back tail)."""
        if text is None:
            text = seq.finish(reason)
        seq.finished, seq.next_token, seq.proposer = True, None, None  # (a draft model's cache goes with it)
        self.scheduler.release(seq)
        lp, top = seq.last_logprobs if reason != "abort" else (None, None)
        seq.emit(Output(text, seq.generated[-1] if seq.generated else None, reason, len(seq.prompt),
                        len(seq.generated), lp, top))
        return False
