"""The OpenAI-compatible HTTP routes: validate a request, turn it into prompts and a token budget, hand it to
responses.py. The wire format lives in protocol.py, batching in engine.py, the app (errors, auth) in app.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from leanlm.errors import LeanLMError
from leanlm.llm import LLM
from leanlm.runtime.structured import Grammar, SchemaError
from leanlm.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    now,
)
from leanlm.serve.responses import Echo, respond
from leanlm.serve.state import ServerState, State

CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"

router = APIRouter()


def check(state: ServerState, req: SamplingFields) -> None:
    """The model must be ours and every field one this server honours."""
    if req.model != state.model_name:
        raise APIError(404, f"the model '{req.model}' does not exist (this server has '{state.model_name}')",
                       "model", "model_not_found", "not_found_error")
    field = req.unsupported()
    if field:
        raise APIError(400, f"'{field}' is not supported by this server yet", field, "unsupported")


def budget(state: ServerState, n_prompt: int, asked: int | None, param: str) -> int:
    """The tokens a prompt may generate: what was asked if it fits the context, else the rest of the context."""
    ctx = state.engine.max_len
    if n_prompt >= ctx:
        raise APIError(400, f"the prompt is {n_prompt} tokens, which does not fit the context of {ctx} "
                       "tokens", "messages" if param != "prompt" else "prompt", "context_length_exceeded")
    if asked is not None and n_prompt + asked > ctx:
        raise APIError(400, f"{param} = {asked} plus the {n_prompt}-token prompt exceeds the context of "
                       f"{ctx} tokens", param, "context_length_exceeded")
    return asked if asked is not None else ctx - n_prompt


async def grammar_for(state: ServerState, req: SamplingFields) -> Grammar | None:
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
        return await asyncio.wrap_future(state.engine.run_job(lambda: state.llm.grammars.get(schema)))
    except SchemaError as e:
        raise APIError(400, f"response_format: {e}", "response_format", "unsupported_schema") from e


def check_ids(llm: LLM, ids: list[int], param: str) -> None:
    vocab = llm.model.cfg.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise APIError(400, f"token ids must be in [0, {vocab})", param, "invalid_value")


def completion_prompts(llm: LLM, p: Any) -> list[list[int]]:
    """A completions prompt in any of its four shapes (text, texts, ids, lists of ids) as token ids."""
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
    if any(not ids for ids in prompts):
        raise APIError(400, "a prompt is empty", "prompt", "invalid_value")
    for ids in prompts:
        check_ids(llm, ids, "prompt")
    return prompts


async def echo_for(state: ServerState, req: CompletionRequest, prompts: list[list[int]]) -> Echo:
    """Per choice, the prompt as text and (with logprobs) its scores, scored on the engine thread."""
    p = req.prompt
    texts = [p] if isinstance(p, str) else list(p) if all(isinstance(x, str) for x in p) else \
        [state.llm.tokenizer.decode(ids, skip_special=False) for ids in prompts]
    lps: list[dict[str, Any] | None] = [None] * len(prompts)
    if req.logprobs is not None:
        lps = await asyncio.wrap_future(state.engine.run_job(
            lambda: [state.logprobs.prompt(state.llm, ids, req.logprobs) for ids in prompts]))
    return [(texts[k], lps[k]) for k in range(len(prompts)) for _ in range(req.n)]


@router.get("/health")
async def health(state: State) -> dict[str, Any]:
    return {"status": "ok", "model": state.model_name, "active": state.engine.active, "queued": state.engine.queued}


@router.get("/")
async def chat_page() -> Response:
    return Response(CHAT_PAGE.read_bytes(), media_type="text/html; charset=utf-8")


@router.get("/metrics")
async def prometheus(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(state: State) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": now(),
                                        "owned_by": "leanlm", "max_model_len": state.engine.max_len}]}


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request, state: State) -> Any:
    check(state, req)
    try:
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        ids = state.llm.chat_prompt(msgs)
    except (ValueError, LeanLMError) as e:
        raise APIError(400, str(e), "messages") from e
    asked = req.max_completion_tokens or req.max_tokens
    max_tokens = budget(state, len(ids), asked,
                        "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
    grammar = await grammar_for(state, req)
    return await respond(request, req, [ids] * req.n, max_tokens, chat=True, n_prompt=len(ids), grammar=grammar)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, state: State) -> Any:
    check(state, req)
    prompts = completion_prompts(state.llm, req.prompt)
    asked = 16 if req.max_tokens is None else req.max_tokens
    if asked == 0 and not req.echo:
        raise APIError(400, "max_tokens must be >= 1 (0 is allowed with echo, to score the prompt)",
                       "max_tokens", "invalid_value")
    if req.echo and req.stream:
        raise APIError(400, "echo is not supported with stream", "echo", "unsupported")
    max_tokens = min(budget(state, len(ids), asked, "max_tokens") for ids in prompts)
    grammar = await grammar_for(state, req)
    echo = await echo_for(state, req, prompts) if req.echo else None
    return await respond(request, req, [ids for ids in prompts for _ in range(req.n)], max_tokens, chat=False,
                         n_prompt=sum(map(len, prompts)), echo=echo, grammar=grammar)


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, state: State) -> dict[str, Any]:
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "send exactly one of 'prompt' and 'messages'", "prompt", "invalid_value")
    llm = state.llm
    if req.messages is not None:
        ids = llm.chat_prompt([{"role": m.role, "content": m.text()} for m in req.messages])
    else:
        ids = llm.encode_prompt(req.prompt) if req.add_special_tokens else \
            llm.tokenizer.encode(req.prompt, add_bos=False)
    return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_len}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, state: State) -> dict[str, Any]:
    check_ids(state.llm, req.tokens, "tokens")
    return {"prompt": state.llm.tokenizer.decode(req.tokens)}
