"""What every route shares: the model, the engine, the metrics, the served name and the API key.

`create_app` puts one `ServerState` on `app.state.leanlm`; route handlers receive it through the
`State` dependency, plumbing code reads it from the request (`server_state`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from leanlm.llm import LLM
from leanlm.serve.engine import Engine
from leanlm.serve.logprobs import Logprobs
from leanlm.serve.metrics import Metrics


@dataclass(frozen=True)
class ServerState:
    llm: LLM
    engine: Engine
    model_name: str
    api_key: str | None
    metrics: Metrics
    logprobs: Logprobs


def server_state(request: Request) -> ServerState:
    return request.app.state.leanlm


State = Annotated[ServerState, Depends(server_state)]
