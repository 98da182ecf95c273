"""Serving options, kept free of torch so the CLI can state and check them before loading a model."""

from __future__ import annotations

from dataclasses import dataclass

from recursify.config import PRECISIONS, parse_speculative
from recursify.errors import ConfigError

BATCHING: tuple[str, ...] = ("static", "sequence", "depthwise")
KV_MODES: tuple[str, ...] = ("propagate", "share")


@dataclass
class EngineConfig:
    """Serving options.

    Attributes:
        batching: static | sequence | depthwise (continuous depth-wise batching, recursive models).
        max_batch: most requests running at once.
        exit: none | confidence:TAU[,TAU...] | fixed:B | oracle (simulation only: runs every loop).
        kv_mode: keys/values of early-exited tokens at deeper loops: propagate (computed later
            from the exit hidden state) or share (copied from the last computed loop).
        precision: fp32 or bf16 (autocast).
        max_kv_tokens: KV pool size in positions (each holding every depth); requests that do not
            fit wait for others to finish (admission control instead of out-of-memory).
        block_size: positions per KV block.
        max_prefill_chunk: longest prompt chunk one step processes (longer prompts are chunked).
        speculative: ``BxD`` self-speculative decoding (modeling/speculative.py): one request at a
            time (``max_batch`` 1, no early exits), one draft-and-verify round per step, on the
            model's contiguous cache instead of the KV pool; None = off.
    """

    batching: str = "depthwise"
    max_batch: int = 32
    exit: str = "none"
    kv_mode: str = "propagate"
    precision: str = "fp32"
    max_kv_tokens: int = 16384
    block_size: int = 16
    max_prefill_chunk: int = 512
    speculative: str | None = None

    def __post_init__(self) -> None:
        if self.batching not in BATCHING:
            raise ConfigError(f"unknown batching {self.batching!r}; choose one of: {', '.join(BATCHING)}")
        if self.kv_mode not in KV_MODES:
            raise ConfigError(f"unknown kv_mode {self.kv_mode!r}; choose one of: {', '.join(KV_MODES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.speculative is not None:
            parse_speculative(self.speculative)
            if self.max_batch != 1 or self.exit != "none":
                raise ConfigError("speculative serving runs one request at a time without early exits: set max_batch=1 and exit='none'")
        if self.max_kv_tokens < self.block_size:
            raise ConfigError(f"max_kv_tokens ({self.max_kv_tokens}) must hold at least one block of {self.block_size}")
