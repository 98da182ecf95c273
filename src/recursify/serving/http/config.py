"""Server options, free of torch and FastAPI so the CLI can state and check them before loading a model."""

from __future__ import annotations

from dataclasses import dataclass

from recursify.errors import ConfigError


@dataclass
class ServerConfig:
    """How ``recursify serve`` listens and admits requests (the engine's own options are EngineConfig).

    Attributes:
        host: address to bind; loopback by default, so nothing outside the machine can reach it.
        port: TCP port; 0 asks the OS for a free one.
        model_name: the name clients pass as ``model`` (None: the source's last path component).
        max_waiting: requests accepted but not running (new, or preempted) beyond which new ones get
            429; bounds the backlog instead of queueing without limit.
        shutdown_timeout: seconds running requests get to finish after SIGINT/SIGTERM before they are
            cancelled (their streams still end properly).
        completion_max_tokens: ``max_tokens`` of /v1/completions when a request names none (OpenAI's
            default, 16); chat completions default to the rest of the context.
        log_level: uvicorn's log level.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None
    max_waiting: int = 256
    shutdown_timeout: float = 30.0
    completion_max_tokens: int = 16
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.max_waiting < 1:
            raise ConfigError(f"max_waiting must be >= 1 (every request waits before it runs), got {self.max_waiting}")
        if self.shutdown_timeout < 0:
            raise ConfigError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        if self.completion_max_tokens < 1:
            raise ConfigError(f"completion_max_tokens must be >= 1, got {self.completion_max_tokens}")
