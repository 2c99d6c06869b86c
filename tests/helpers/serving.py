"""A leanlm server on a free local port, in a thread, for the tests that talk HTTP to it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

import leanlm
from leanlm.llm import Speculation
from leanlm.serve.app import create_app
from leanlm.serve.engine import Engine


@contextlib.contextmanager
def running_server(llm: leanlm.LLM, name: str = "smol", *, max_batch: int = 4, api_key: str | None = None,
                   max_len: int = 512, chunk: int = 64, speculation: Speculation | None = None) -> Iterator[str]:
    """Yield the server's base URL; the engine runs in its own thread (as `Engine.start` explains)."""
    engine = Engine(llm, max_batch=max_batch, max_len=max_len, chunk=chunk, speculation=speculation)
    engine.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(llm, engine, name, api_key=api_key), host="127.0.0.1",
                                        port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join()
        engine.shutdown()
