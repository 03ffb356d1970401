"""Loading a model into an engine and running the app with uvicorn, in the foreground (`gptlab serve`) or in a
background thread (tests, `gptlab bench serve`)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import uvicorn

from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.serve.app import create_app
from gptlab.serve.engine import Engine
from gptlab.serve.protocol import Limits
from gptlab.tokenizer import Tokenizer

API_KEY_ENV = "GPTLAB_API_KEY"


def build_server(
    engine: Engine,
    tokenizer: Tokenizer,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: Limits | None = None,
) -> uvicorn.Server:
    """A uvicorn server for the app over a started `engine`; `api_key` falls back to $GPTLAB_API_KEY."""
    app = create_app(engine, tokenizer, model_name, api_key or os.environ.get(API_KEY_ENV) or None, limits)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    return uvicorn.Server(config)


@contextlib.contextmanager
def serving(
    model: GPT, tokenizer: Tokenizer, model_name: str = "gptlab", engine_options: dict | None = None, **options
) -> Iterator[str]:
    """Run the server in a background thread on a free port of 127.0.0.1 (unless `port` is given) and yield its
    base URL; stops the server and the engine on exit."""
    engine = Engine(model, tokenizer, **(engine_options or {})).start()
    server = build_server(engine, tokenizer, model_name, port=options.pop("port", 0), **options)
    thread = threading.Thread(target=server.run, name="gptlab-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise GptlabError("the server did not start")
            time.sleep(0.02)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()
