"""The FastAPI app: the routes (routes.py), OpenAI-shaped error bodies, the API key check and request counts.

The shared state (model, engine, metrics, served name, key) lives on `app.state.leanlm` (state.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from leanlm.llm import LLM
from leanlm.serve.engine import Engine
from leanlm.serve.logprobs import Logprobs
from leanlm.serve.metrics import Metrics
from leanlm.serve.protocol import APIError, error_body
from leanlm.serve.routes import router
from leanlm.serve.state import ServerState, server_state

# the request counter labels these by path and everything else as "other" (bounded label values)
KNOWN_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
                "/metrics", "/")
OPEN_PATHS = ("/health", "/metrics", "/", "/docs", "/openapi.json")  # reachable without the API key


def create_app(llm: LLM, engine: Engine, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="leanlm", docs_url="/docs")
    app.state.leanlm = ServerState(llm, engine, model_name, api_key, Metrics(engine), Logprobs(llm.tokenizer))
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.middleware("http")(auth_and_count)
    app.include_router(router)
    return app


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


async def api_error(_: Request, e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.param, e.code, e.type)


async def invalid_request(_: Request, e: RequestValidationError) -> JSONResponse:
    """pydantic's first complaint as one OpenAI error naming the field (`messages.0.role`)."""
    first = e.errors()[0] if e.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return error_response(400, "the request body is not valid JSON", None, "invalid_json")
    return error_response(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}",
                          ".".join(loc) or None, "invalid_value")


async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    return error_response(e.status_code, str(e.detail), None, None,
                          "not_found_error" if e.status_code == 404 else "invalid_request_error")


async def auth_and_count(request: Request, call_next: Any) -> Any:
    """Refuse a missing or wrong key (except on the open paths), then count the request by route and status."""
    state = server_state(request)
    if state.api_key and request.url.path not in OPEN_PATHS and \
            request.headers.get("authorization", "") != f"Bearer {state.api_key}":
        response = error_response(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", None,
                                  "invalid_api_key", "authentication_error")
    else:
        response = await call_next(request)
    route = request.url.path if request.url.path in KNOWN_ROUTES else "other"
    state.metrics.requests.labels(route=route, status=str(response.status_code)).inc()
    return response
