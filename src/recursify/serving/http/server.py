"""uvicorn around the app: ``serve`` (the CLI's server, graceful on SIGINT/SIGTERM) and ``BackgroundServer``.

Shutdown: the first SIGINT/SIGTERM stops admissions at once (new requests get 503, waiting ones are
cancelled), running requests get ``shutdown_timeout`` seconds to finish and are then cancelled (their
streams still end with a finish reason and ``data: [DONE]``); uvicorn closes the connections, the
engine thread stops and ``serve`` returns, so the command exits 0. A second SIGINT forces the exit.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType

import uvicorn

from recursify.errors import ConfigError
from recursify.modeling.model import RecursiveModel
from recursify.serving.config import EngineConfig
from recursify.serving.engine import Engine
from recursify.serving.http.app import create_app
from recursify.serving.http.config import ServerConfig
from recursify.serving.http.metrics import ServerMetrics
from recursify.serving.http.worker import EngineWorker

STARTUP_TIMEOUT_S = 60.0


class _GracefulServer(uvicorn.Server):
    """uvicorn's server whose signal handler also starts the engine's drain.

    uvicorn re-raises a handled signal once it has shut down, which ends the process with that
    signal's status; here the graceful shutdown is the whole response, so the signal is not re-raised.
    """

    def __init__(self, config: uvicorn.Config, worker: EngineWorker, grace_s: float):
        super().__init__(config)
        self.worker, self.grace_s = worker, grace_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.worker.begin_shutdown(self.grace_s)
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def build_server(model: RecursiveModel, engine_config: EngineConfig, server_config: ServerConfig, model_name: str) -> _GracefulServer:
    """The engine, its worker thread (started with the app), the app and the uvicorn server for one model."""
    metrics = ServerMetrics()
    worker = EngineWorker(Engine(model, engine_config), server_config.max_waiting, metrics)
    app = create_app(worker, server_config, model_name, metrics)
    config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        log_level=server_config.log_level,
        lifespan="on",
        timeout_graceful_shutdown=int(server_config.shutdown_timeout) + 5,  # a backstop: the worker ends streams first
    )
    return _GracefulServer(config, worker, server_config.shutdown_timeout)


def default_model_name(source: str | os.PathLike[str]) -> str:
    """What clients call the model: a local path's last component (``runs/rrt`` -> ``rrt``), else the source as given."""
    path = Path(source)
    return path.name if path.exists() and path.name else str(source)


def serve(source: str | os.PathLike[str], engine_config: EngineConfig | None = None, server_config: ServerConfig | None = None) -> None:
    """Open any model source with ``recursify.load`` and serve it until SIGINT/SIGTERM (blocking)."""
    from recursify.loading import load

    engine_config, server_config = engine_config or EngineConfig(), server_config or ServerConfig()
    model = load(source)
    name = server_config.model_name or default_model_name(source)
    server = build_server(model, engine_config, server_config, name)
    engine = server.worker.engine
    print(
        f"recursify: serving {name!r} (loops {model.loops}, batching {engine_config.batching}, exit {engine.policy.spec}, "
        f"context {engine.max_model_len}, KV pool {engine.allocator.capacity_tokens} positions) "
        f"at http://{server_config.host}:{server_config.port}/v1",
        flush=True,
    )
    server.run()


class BackgroundServer:
    """A server in a background thread of this process (tests, benchmarks): ``with BackgroundServer(...) as s: s.url``."""

    def __init__(self, model: RecursiveModel, engine_config: EngineConfig, server_config: ServerConfig, model_name: str = "model"):
        self.server = build_server(model, engine_config, server_config, model_name)
        self.worker = self.server.worker
        self._thread = threading.Thread(target=self.server.run, name="recursify-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError("the HTTP server did not start (is the port free?)")
            time.sleep(0.01)
        return self

    def shutdown(self, grace_s: float = 0.0, timeout: float = 30.0) -> None:
        """What SIGTERM does to ``serve``: stop admitting, give running requests ``grace_s``, stop."""
        self.worker.begin_shutdown(grace_s)
        self.server.should_exit = True
        self._thread.join(timeout)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.shutdown()
