"""Running the app with uvicorn over an engine: `serve_forever` for `gptlab serve`, `serving` in a background
thread for tests.

`serve_forever` runs the engine's loop on the calling (main) thread and uvicorn beside it. The model's work
belongs on the thread that loaded it: with PyTorch's OpenMP (libgomp), a second thread running parallel kernels
after the first has its own worker team, the teams outnumber the cores, and every kernel then pays for waking
threads that have gone to sleep, several times slower for the small matmuls of decoding."""

from __future__ import annotations

import contextlib
import os
import signal
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
    """A uvicorn server for the app over `engine` (whose loop the caller runs); `api_key` falls back to
    $GPTLAB_API_KEY."""
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


def serve_forever(engine: Engine, server: uvicorn.Server) -> None:
    """Serve until SIGINT or SIGTERM: uvicorn in a background thread, the engine's loop on this one."""
    thread = threading.Thread(target=server.run, name="gptlab-server", daemon=True)

    def shut_down(signum, frame) -> None:
        server.should_exit = True
        engine.stopping = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, shut_down)
    thread.start()
    try:
        engine.run(until=lambda: not thread.is_alive())
    finally:
        server.should_exit = True
        thread.join(timeout=10)
