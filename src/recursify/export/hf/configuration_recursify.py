"""RecursifyConfig: a transformers config carrying recursify's architecture and recursion as dicts.

Copied verbatim into every ``recursify export --format transformers`` directory; ``config.json``'s
``auto_map`` points ``AutoConfig`` here.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class RecursifyConfig(PretrainedConfig):
    """``architecture`` / ``recursion``: ``recursify.config.ArchConfig`` / ``RecursionConfig`` as saved by recursify.

    The usual top-level fields (vocab_size, hidden_size, num_hidden_layers = depths, ...) are filled
    by the exporter for tools that read them (lm-eval's maximum length, serving engines).
    """

    model_type = "recursify"

    def __init__(self, architecture: dict[str, Any] | None = None, recursion: dict[str, Any] | None = None, **kwargs: Any):
        self.architecture = architecture or {}
        self.recursion = recursion or {}
        super().__init__(**kwargs)
