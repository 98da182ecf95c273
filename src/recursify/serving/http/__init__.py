"""An OpenAI-compatible HTTP front for the serving engine (``recursify serve``).

Modules with one job each: ``config`` (ServerConfig, free of torch and FastAPI so the CLI can state
its defaults), ``protocol`` (OpenAI request bodies, responses, stream chunks, errors), ``worker`` (the
one thread that owns the engine, and the queues requests cross), ``metrics`` (Prometheus), ``app``
(the FastAPI routes) and ``server`` (uvicorn, signals, graceful shutdown). FastAPI, uvicorn and
prometheus-client are the ``serve`` extra: nothing here imports them until a server is built.
"""

from __future__ import annotations

import importlib.util

from recursify.errors import ConfigError

SERVER_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")


def require_server_packages() -> None:
    """Raise one clear error naming the extra to install when the server's packages are missing."""
    missing = [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f'serving over HTTP needs {", ".join(missing)}: pip install "recursify[serve]"')
