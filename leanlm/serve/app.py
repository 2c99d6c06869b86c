"""The OpenAI-compatible HTTP routes (FastAPI). The protocol lives in protocol.py, batching in engine.py.

Each request becomes `n` engine sequences whose events are hopped from the engine thread onto the event
loop through one asyncio queue. A client that disconnects (mid-stream, or while a non-streamed answer is
being generated) has its sequences cancelled, which frees their batch rows at the next engine step.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from leanlm.errors import LeanLMError
from leanlm.llm import LLM
from leanlm.runtime.structured import Constraint, Grammar, SchemaError
from leanlm.serve.engine import Engine, Output, Sequence
from leanlm.serve.logprobs import Logprobs
from leanlm.serve.metrics import Metrics
from leanlm.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    error_body,
    new_id,
    now,
    usage,
)

CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"
KNOWN_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
                "/metrics", "/")
OPEN_PATHS = ("/health", "/metrics", "/", "/docs", "/openapi.json")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def create_app(llm: LLM, engine: Engine, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="leanlm", docs_url="/docs")
    metrics = Metrics(engine)

    # --- errors and auth ---------------------------------------------------------------------
    def err(status: int, message: str, param: str | None = None, code: str | None = None,
            type_: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse(error_body(message, type_, param, code), status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return err(e.status, e.message, e.param, e.code, e.type)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return err(400, "the request body is not valid JSON", None, "invalid_json")
        return err(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}",
                   ".".join(loc) or None, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return err(e.status_code, str(e.detail), None, None, "not_found_error" if e.status_code == 404 else
                   "invalid_request_error")

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path not in OPEN_PATHS and \
                request.headers.get("authorization", "") != f"Bearer {api_key}":
            response = err(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", None,
                           "invalid_api_key", "authentication_error")
        else:
            response = await call_next(request)
        route = request.url.path if request.url.path in KNOWN_ROUTES else "other"
        metrics.requests.labels(route=route, status=str(response.status_code)).inc()
        return response

    # --- helpers ------------------------------------------------------------------------------
    def check(req: SamplingFields) -> None:
        if req.model != model_name:
            raise APIError(404, f"the model '{req.model}' does not exist (this server has '{model_name}')",
                           "model", "model_not_found", "not_found_error")
        field = req.unsupported()
        if field:
            raise APIError(400, f"'{field}' is not supported by this server yet", field, "unsupported")

    def budget(n_prompt: int, asked: int | None, param: str) -> int:
        ctx = engine.max_len
        if n_prompt >= ctx:
            raise APIError(400, f"the prompt is {n_prompt} tokens, which does not fit the context of {ctx} "
                           "tokens", "messages" if param != "prompt" else "prompt", "context_length_exceeded")
        if asked is not None and n_prompt + asked > ctx:
            raise APIError(400, f"{param} = {asked} plus the {n_prompt}-token prompt exceeds the context of "
                           f"{ctx} tokens", param, "context_length_exceeded")
        return asked if asked is not None else ctx - n_prompt

    async def grammar_for(req: SamplingFields) -> Grammar | None:
        """The structured-output grammar response_format asks for (compiled on the engine thread)."""
        if req.response_format is None:
            return None
        try:
            spec = req.response_format.schema_spec()
        except ValueError as e:
            raise APIError(400, str(e), "response_format", "invalid_value") from e
        if spec is None:
            return None
        try:
            schema = None if spec is True else spec
            return await asyncio.wrap_future(engine.run_job(lambda: llm.grammars.get(schema)))
        except SchemaError as e:
            raise APIError(400, f"response_format: {e}", "response_format", "unsupported_schema") from e

    def launch(prompts: list[list[int]], req: SamplingFields, max_tokens: int,
               grammar: Grammar | None) -> tuple[asyncio.Queue, list[Sequence]]:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        seqs = []
        for i, ids in enumerate(prompts):
            def emit(o: Output, i: int = i) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (i, o))
            try:
                constraint = Constraint(grammar) if grammar is not None else None
                seqs.append(engine.submit(ids, req.params(max_tokens, i), emit, req.n_logprobs(), constraint))
            except LeanLMError as e:
                for s in seqs:
                    s.cancel()
                raise APIError(400, str(e), "prompt") from e
        return queue, seqs

    async def events(request: Request, queue: asyncio.Queue, seqs: list[Sequence]) -> AsyncIterator[tuple[int, Output]]:
        """(choice index, event) until every sequence finished; cancels them all if the caller stops early."""
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

    tok = llm.tokenizer
    fmt = Logprobs(tok)
    chat_logprob, text_logprobs, scored = fmt.chat_entry, fmt.text, fmt.scored

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def respond(request: Request, req: SamplingFields, prompts: list[list[int]], max_tokens: int,
                      chat: bool, n_prompt: int, echo: list[tuple[str, dict[str, Any] | None]] | None = None,
                      grammar: Grammar | None = None) -> Any:
        """echo: per choice, the prompt's text and its legacy logprobs (None without logprobs)."""
        want_lp = req.n_logprobs() is not None
        if echo is not None and max_tokens == 0:  # score the prompt only
            choices = [{"index": i, "text": text, "finish_reason": "length", "logprobs": lp}
                       for i, (text, lp) in enumerate(echo)]
            return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model_name,
                    "choices": choices, "usage": usage(n_prompt, 0)}
        queue, seqs = launch(prompts, req, max_tokens, grammar)
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        obj = "chat.completion" if chat else "text_completion"
        if not req.stream:
            texts, reasons, done = [""] * len(prompts), [None] * len(prompts), [0] * len(prompts)
            lps: list[list] = [[] for _ in prompts]
            async for i, o in events(request, queue, seqs):
                texts[i] += o.text
                if scored(o):
                    lps[i].append((o.token, o.logprob, o.top_logprobs))
                if o.finish_reason:
                    reasons[i], done[i] = o.finish_reason, o.completion_tokens
            if any(r is None for r in reasons):
                return JSONResponse({}, status_code=499)  # the client went away
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                            "logprobs": {"content": [chat_logprob(*x) for x in lps[i]]} if want_lp else None}
                           for i, (t, r) in enumerate(zip(texts, reasons))]
            else:
                choices = []
                for i, (t, r) in enumerate(zip(texts, reasons)):
                    head, head_lp = echo[i] if echo is not None else ("", None)
                    lp = None
                    if want_lp:
                        lp = text_logprobs(lps[i], len(head))
                        if head_lp is not None:
                            lp = {k: head_lp[k] + lp[k] for k in lp}
                    choices.append({"index": i, "text": head + t, "finish_reason": r, "logprobs": lp})
            return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices,
                    "usage": usage(n_prompt, sum(done))}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(i: int, text: str | None, reason: str | None, first: bool = False,
                  o: Output | None = None) -> dict[str, Any]:
            lp = None
            if want_lp and o is not None and scored(o):
                lp = {"content": [chat_logprob(o.token, o.logprob, o.top_logprobs)]} if chat else \
                    text_logprobs([(o.token, o.logprob, o.top_logprobs)])
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": lp}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": lp}
            body = {"id": rid, "object": f"{obj}.chunk" if chat else obj, "created": created, "model": model_name,
                    "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return body

        async def stream() -> AsyncIterator[str]:
            done = [0] * len(prompts)
            if chat:
                for i in range(len(prompts)):
                    yield sse(chunk(i, None, None, first=True))
            async for i, o in events(request, queue, seqs):
                if o.finish_reason:
                    done[i] = o.completion_tokens
                    if o.text or (want_lp and scored(o)):
                        yield sse(chunk(i, o.text, None, o=o))
                    yield sse(chunk(i, None, o.finish_reason))
                elif o.text or (want_lp and scored(o)):
                    yield sse(chunk(i, o.text, None, o=o))
            if include_usage:
                yield sse({"id": rid, "object": f"{obj}.chunk" if chat else obj, "created": created,
                           "model": model_name, "choices": [], "usage": usage(n_prompt, sum(done))})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    # --- routes -------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "active": engine.active, "queued": engine.queued}

    @app.get("/")
    async def chat_page() -> Response:
        return Response(CHAT_PAGE.read_bytes(), media_type="text/html; charset=utf-8")

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": now(),
                                            "owned_by": "leanlm", "max_model_len": engine.max_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        check(req)
        try:
            msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
            ids = llm.chat_prompt(msgs)
        except (ValueError, LeanLMError) as e:
            raise APIError(400, str(e), "messages") from e
        asked = req.max_completion_tokens or req.max_tokens
        max_tokens = budget(len(ids), asked, "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        grammar = await grammar_for(req)
        return await respond(request, req, [ids] * req.n, max_tokens, chat=True, n_prompt=len(ids), grammar=grammar)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        check(req)
        p = req.prompt
        if isinstance(p, str):
            prompts = [llm.encode_prompt(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [llm.encode_prompt(x) for x in p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]
        else:
            raise APIError(400, "prompt must be a string, a list of strings, token ids or lists of token ids",
                           "prompt", "invalid_value")
        vocab = llm.model.cfg.vocab_size
        if any(not ids for ids in prompts):
            raise APIError(400, "a prompt is empty", "prompt", "invalid_value")
        if any(not 0 <= t < vocab for ids in prompts for t in ids):
            raise APIError(400, f"token ids must be in [0, {vocab})", "prompt", "invalid_value")
        asked = 16 if req.max_tokens is None else req.max_tokens
        if asked == 0 and not req.echo:
            raise APIError(400, "max_tokens must be >= 1 (0 is allowed with echo, to score the prompt)",
                           "max_tokens", "invalid_value")
        if req.echo and req.stream:
            raise APIError(400, "echo is not supported with stream", "echo", "unsupported")
        max_tokens = min(budget(len(ids), asked, "max_tokens") for ids in prompts)
        grammar = await grammar_for(req)
        echo = None
        if req.echo:
            texts = [p] if isinstance(p, str) else list(p) if all(isinstance(x, str) for x in p) else \
                [tok.decode(ids, skip_special=False) for ids in prompts]
            lps = [None] * len(prompts)
            if req.logprobs is not None:
                lps = await asyncio.wrap_future(engine.run_job(lambda: [fmt.prompt(llm, ids, req.logprobs)
                                                                        for ids in prompts]))
            echo = [(texts[k], lps[k]) for k in range(len(prompts)) for _ in range(req.n)]
        return await respond(request, req, [ids for ids in prompts for _ in range(req.n)], max_tokens, chat=False,
                             n_prompt=sum(map(len, prompts)), echo=echo, grammar=grammar)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send exactly one of 'prompt' and 'messages'", "prompt", "invalid_value")
        if req.messages is not None:
            ids = llm.chat_prompt([{"role": m.role, "content": m.text()} for m in req.messages])
        else:
            ids = llm.encode_prompt(req.prompt) if req.add_special_tokens else \
                llm.tokenizer.encode(req.prompt, add_bos=False)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        vocab = llm.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", "tokens", "invalid_value")
        return {"prompt": llm.tokenizer.decode(req.tokens)}

    return app
