"""``from recursify.serve import Engine``: the serving engine and its option/output types."""

from recursify.serving.config import EngineConfig
from recursify.serving.engine import Engine, RequestOutput

__all__ = ["Engine", "EngineConfig", "RequestOutput"]
