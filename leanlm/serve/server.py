"""`leanlm serve`: the engine thread plus uvicorn running the app."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from leanlm.errors import LeanLMError
from leanlm.llm import LLM
from leanlm.serve.app import create_app
from leanlm.serve.engine import Engine


def model_id(name: str) -> str:
    """The id clients send as `model`: a registry name as given, a file or folder by its stem."""
    p = Path(name)
    return p.stem if p.suffix or p.is_dir() else name


def serve(llm: LLM, model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, ctx: int = 2048, speculate_max_batch: int | None = 2) -> None:
    import uvicorn

    if max_batch < 1 or ctx < 2:
        raise LeanLMError("--max-batch must be >= 1 and --ctx >= 2")
    engine = Engine(llm, max_batch=max_batch, max_len=ctx, chunk=min(256, llm.prefill_chunk),
                    speculation=llm.speculation, speculate_max_batch=speculate_max_batch)
    for batch in {1, min(2, max_batch)}:  # load (or, with --compile on, build) the decode steps before serving
        for tokens in (1, 2) if llm.speculation is not None else (1,):  # 2: verifying drafts
            llm.decode_step(batch, tokens=tokens)
    name = model_id(model)
    config = uvicorn.Config(create_app(llm, engine, name, api_key), host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    # HTTP on a thread, the engine on the main thread (see Engine.start for why)
    http = threading.Thread(target=server.run, name="leanlm-http", daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            raise LeanLMError(f"could not serve on {host}:{port} (is the port in use?)")
        time.sleep(0.05)
    threading.Thread(target=_stop_when_done, args=(http, engine), daemon=True).start()
    spec = llm.speculation
    how = f"; speculative decoding: {spec.kind}, k={spec.k}, up to {speculate_max_batch} sequences" if spec else ""
    print(f"leanlm: serving '{name}' on http://{host}:{port} (OpenAI API under /v1; batch {max_batch}, "
          f"context {engine.max_len}{how})", file=sys.stderr)
    try:
        engine.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=5)


def _stop_when_done(http: threading.Thread, engine: Engine) -> None:
    http.join()
    engine.shutdown_nowait()
