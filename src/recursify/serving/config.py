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
        max_kv_tokens: KV pool size in positions (each holding every depth). Blocks are allocated as
            requests grow; when the pool runs out the newest running request is preempted (its KV freed,
            recomputed later) and new requests wait, instead of running out of memory.
        block_size: positions per KV block.
        max_prefill_chunk: longest prompt chunk one step processes (longer prompts are chunked).
        max_model_len: longest sequence (prompt + output) a request may reach; longer max_new_tokens
            are capped. None: the source model's max_position_embeddings (2048 when it has none).
            The KV pool caps it too, since a request must fit the pool alone.
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
    max_model_len: int | None = None
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
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be at least 2 (one prompt token and one new token), got {self.max_model_len}")
