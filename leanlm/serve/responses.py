"""From a validated request to the engine and back: launch its sequences, wait on their events, answer.

Each request becomes `n` engine sequences whose events are hopped from the engine thread onto the event
loop through one asyncio queue. A client that disconnects (mid-stream, or while a non-streamed answer is
being generated) has its sequences cancelled, which frees their batch rows at the next engine step.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from leanlm.errors import LeanLMError
from leanlm.runtime.structured import Constraint, Grammar
from leanlm.serve.logprobs import TokenLogprob
from leanlm.serve.protocol import APIError, SamplingFields, new_id, now, usage
from leanlm.serve.sequence import Output, Sequence
from leanlm.serve.state import ServerState, server_state

Echo = list[tuple[str, dict[str, Any] | None]]  # per choice: the prompt's text and its legacy logprobs


def launch(state: ServerState, prompts: list[list[int]], req: SamplingFields, max_tokens: int,
           grammar: Grammar | None) -> tuple[asyncio.Queue, list[Sequence]]:
    """Submit one sequence per prompt; their events land on the returned queue as (choice index, Output)."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    seqs: list[Sequence] = []
    for i, ids in enumerate(prompts):
        def emit(o: Output, i: int = i) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (i, o))
        try:
            constraint = Constraint(grammar) if grammar is not None else None
            seqs.append(state.engine.submit(ids, req.params(max_tokens, i), emit, req.n_logprobs(), constraint))
        except LeanLMError as e:
            for s in seqs:
                s.cancel()
            raise APIError(400, str(e), "prompt") from e
    return queue, seqs


async def events(request: Request, queue: asyncio.Queue, seqs: list[Sequence]) -> AsyncIterator[tuple[int, Output]]:
    """(choice index, event) until every sequence finished; cancels them all if the caller stops early."""
    metrics = server_state(request).metrics
    left, t0, last = len(seqs), time.perf_counter(), {}
    try:
        while left:
            try:
                i, o = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            t = time.perf_counter()
            if o.token is not None:
                (metrics.itl.observe(t - last[i]) if i in last else metrics.ttft.observe(t - t0))
                last[i] = t
            if o.finish_reason is not None:
                left -= 1
                metrics.prompt_tokens.inc(o.prompt_tokens)
                metrics.generated_tokens.inc(o.completion_tokens)
            yield i, o
    finally:
        for s in seqs:
            s.cancel()


@dataclass
class Reply:
    """One request in flight: its sequences and what every body (or chunk) of its answer repeats."""

    request: Request
    req: SamplingFields
    chat: bool
    n_prompt: int
    echo: Echo | None
    queue: asyncio.Queue
    seqs: list[Sequence]
    state: ServerState = field(init=False)
    rid: str = field(init=False)
    created: int = field(default_factory=now)

    def __post_init__(self) -> None:
        self.state = server_state(self.request)
        self.rid = new_id("chatcmpl" if self.chat else "cmpl")

    @property
    def n(self) -> int:
        return len(self.seqs)

    @property
    def want_lp(self) -> bool:
        return self.req.n_logprobs() is not None

    @property
    def obj(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def body(self, choices: list[dict[str, Any]], obj: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"id": self.rid, "object": obj or self.obj, "created": self.created, "model": self.state.model_name,
                "choices": choices, **extra}


async def respond(request: Request, req: SamplingFields, prompts: list[list[int]], max_tokens: int, *,
                  chat: bool, n_prompt: int, echo: Echo | None = None, grammar: Grammar | None = None) -> Any:
    """Generate for every prompt and answer in one body, or as server-sent events when `req.stream`."""
    if echo is not None and max_tokens == 0:
        return score_only(server_state(request), echo, n_prompt)
    queue, seqs = launch(server_state(request), prompts, req, max_tokens, grammar)
    reply = Reply(request, req, chat, n_prompt, echo, queue, seqs)
    if req.stream:
        return StreamingResponse(stream(reply), media_type="text/event-stream")
    return await collect(reply)


def score_only(state: ServerState, echo: Echo, n_prompt: int) -> dict[str, Any]:
    """max_tokens = 0 with echo: the prompts and their logprobs, nothing generated."""
    choices = [{"index": i, "text": text, "finish_reason": "length", "logprobs": lp}
               for i, (text, lp) in enumerate(echo)]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": state.model_name,
            "choices": choices, "usage": usage(n_prompt, 0)}


async def collect(reply: Reply) -> Any:
    """The non-streamed answer: every choice's text, finish reason and logprobs once all sequences finished."""
    scored = reply.state.logprobs.scored
    texts, reasons, done = [""] * reply.n, [None] * reply.n, [0] * reply.n
    lps: list[list[TokenLogprob]] = [[] for _ in range(reply.n)]
    async for i, o in events(reply.request, reply.queue, reply.seqs):
        texts[i] += o.text
        if scored(o):
            lps[i].append((o.token, o.logprob, o.top_logprobs))
        if o.finish_reason:
            reasons[i], done[i] = o.finish_reason, o.completion_tokens
    if any(r is None for r in reasons):
        return JSONResponse({}, status_code=499)  # the client went away
    choices = chat_choices(reply, texts, reasons, lps) if reply.chat else completion_choices(reply, texts, reasons,
                                                                                             lps)
    return reply.body(choices, usage=usage(reply.n_prompt, sum(done)))


def chat_choices(reply: Reply, texts: list[str], reasons: list[str | None],
                 lps: list[list[TokenLogprob]]) -> list[dict[str, Any]]:
    entry = reply.state.logprobs.chat_entry
    return [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
             "logprobs": {"content": [entry(*x) for x in lps[i]]} if reply.want_lp else None}
            for i, (t, r) in enumerate(zip(texts, reasons))]


def completion_choices(reply: Reply, texts: list[str], reasons: list[str | None],
                       lps: list[list[TokenLogprob]]) -> list[dict[str, Any]]:
    """Legacy completions; with echo, the prompt's text (and logprobs) come before the generated ones."""
    choices = []
    for i, (t, r) in enumerate(zip(texts, reasons)):
        head, head_lp = reply.echo[i] if reply.echo is not None else ("", None)
        lp = None
        if reply.want_lp:
            lp = reply.state.logprobs.text(lps[i], len(head))
            if head_lp is not None:
                lp = {k: head_lp[k] + lp[k] for k in lp}
        choices.append({"index": i, "text": head + t, "finish_reason": r, "logprobs": lp})
    return choices


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def chunk_logprobs(reply: Reply, o: Output | None) -> dict[str, Any] | None:
    fmt = reply.state.logprobs
    if not reply.want_lp or o is None or not fmt.scored(o):
        return None
    if reply.chat:
        return {"content": [fmt.chat_entry(o.token, o.logprob, o.top_logprobs)]}
    return fmt.text([(o.token, o.logprob, o.top_logprobs)])


def chunk(reply: Reply, i: int, text: str | None, reason: str | None, first: bool = False,
          o: Output | None = None) -> dict[str, Any]:
    """One streamed event for choice i; a chat stream opens each choice with an empty assistant delta."""
    lp = chunk_logprobs(reply, o)
    if reply.chat:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        choice = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": lp}
    else:
        choice = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": lp}
    extra = {"usage": None} if include_usage(reply) else {}
    return reply.body([choice], obj=f"{reply.obj}.chunk" if reply.chat else reply.obj, **extra)


def include_usage(reply: Reply) -> bool:
    return bool(reply.req.stream_options and reply.req.stream_options.include_usage)


async def stream(reply: Reply) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text (or scored token), one per finish, usage, [DONE]."""
    scored = reply.state.logprobs.scored
    done = [0] * reply.n
    if reply.chat:
        for i in range(reply.n):
            yield sse(chunk(reply, i, None, None, first=True))
    async for i, o in events(reply.request, reply.queue, reply.seqs):
        if o.text or (reply.want_lp and scored(o)):
            yield sse(chunk(reply, i, o.text, None, o=o))
        if o.finish_reason:
            done[i] = o.completion_tokens
            yield sse(chunk(reply, i, None, o.finish_reason))
    if include_usage(reply):
        yield sse(reply.body([], obj=f"{reply.obj}.chunk" if reply.chat else reply.obj,
                             usage=usage(reply.n_prompt, sum(done))))
    yield "data: [DONE]\n\n"
