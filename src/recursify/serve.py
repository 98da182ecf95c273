"""``from recursify.serve import Engine``: the serving engine and its option/output types."""

from recursify.serving.engine import Engine, EngineConfig, RequestOutput

__all__ = ["Engine", "EngineConfig", "RequestOutput"]
