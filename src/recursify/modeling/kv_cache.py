"""The model's attention core: a preallocated key/value cache with its own slot for every depth.

A looped model visits each shared layer several times per token; each visit sees a different
hidden state, so its keys and values differ. Caching by *shared layer* (one slot reused across
loops) silently overwrites earlier loops' keys; here the slot is the depth (loop x layer).

``AttentionContext`` is the ``AttentionCore`` (modeling/attention.py) of ``RecursiveModel.forward``,
generation and healing: the whole batch sits at one depth, its keys are appended to a ``KVCache``
(or, without a cache, are exactly the rows' own keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from recursify.errors import ConfigError
from recursify.modeling.attention import Depth, RopeTables, mask_at
from recursify.modeling.lora import Visit

if TYPE_CHECKING:
    from recursify.modeling.layers import SharedLayer


class KVCache:
    """Keys/values for ``num_depths`` depths of a batch, written at a common write position.

    Buffers are allocated on the first write (so they take the dtype the model computes in, e.g.
    bf16 under autocast) with shape (depths, batch, kv_heads, max_len, head_dim).
    """

    def __init__(self, num_depths: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int):
        self.num_depths, self.batch_size, self.max_len = num_depths, batch_size, max_len
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    def update(self, depth: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's key/value ([batch, kv_heads, T, head_dim]) at ``depth``; return all so far."""
        new = key.shape[2]
        if self.length + new > self.max_len:
            raise ConfigError(f"KV cache full: {self.length} + {new} tokens exceed max_len={self.max_len}")
        if self.keys is None or self.values is None:
            shape = (self.num_depths, self.batch_size, self.num_kv_heads, self.max_len, self.head_dim)
            self.keys = torch.zeros(shape, dtype=key.dtype, device=key.device)
            self.values = torch.zeros(shape, dtype=value.dtype, device=value.device)
        end = self.length + new
        self.keys[depth, :, :, self.length : end] = key
        self.values[depth, :, :, self.length : end] = value
        return self.keys[depth, :, :, :end], self.values[depth, :, :, :end]

    def advance(self, new_tokens: int) -> None:
        """Move the write position once every depth has stored the step's tokens."""
        self.length += new_tokens

    def nbytes(self) -> int:
        """Bytes held by the preallocated buffers (0 before the first write)."""
        if self.keys is None or self.values is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


@dataclass
class AttentionContext:
    """What every depth of one model forward pass shares: RoPE tables, masks and the cache.

    Build it with ``RecursiveModel.attention_context``; masks come from ``attention.build_masks``
    with the queries at the last cache positions.
    """

    rope: RopeTables  # layer type -> (cos, sin), [batch, seq, head_dim]
    masks: dict[str, torch.Tensor]  # layer type -> bool [batch, 1, seq, kv_len], True = may attend
    cache: KVCache | None

    def attend(self, layer: SharedLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visit: Visit, depth: Depth) -> torch.Tensor:
        """q: [batch, heads, seq, d]; k, v: [batch, kv_heads, seq, d] -> [batch, heads, seq, d]; every row is a query."""
        assert isinstance(depth, int), "the contiguous cache holds one depth per call (the engine's core mixes depths)"
        if self.cache is not None:
            k, v = self.cache.update(depth, k, v)  # (batch, kv_heads, past + seq, d)
        return layer.attend(q, k, v, mask_at(self.masks, layer.arch.layer_types, depth), visit)
