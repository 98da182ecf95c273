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

    def rewind(self, length: int) -> None:
        """Move the write position back to ``length``: later slots are dropped (overwritten by the next writes)."""
        if not 0 <= length <= self.length:
            raise ConfigError(f"cannot rewind a KV cache of length {self.length} to {length}")
        self.length = length

    def right_align(self, ends: list[int], length: int) -> None:
        """Move row r's slots [0, ends[r]) to end at ``length`` (slots in front of them become junk) and set the length.

        Self-speculative decoding keeps a different number of tokens per row after a verify pass;
        aligning every row's last kept token to one write position keeps one cache length for the
        batch. The caller marks the freed front slots as padding in the attention mask, so
        distances between real tokens (sliding windows) stay what they were.
        """
        if self.keys is None or self.values is None:
            raise ConfigError("right_align needs a written cache")
        end = torch.tensor(ends, device=self.keys.device)
        if bool((end > length).any()) or bool((end > self.length).any()) or len(ends) != self.batch_size:
            raise ConfigError(f"cannot align rows ending at {ends} to end at {length} (cache length {self.length})")
        if bool((end < length).any()):
            source = torch.arange(length, device=end.device)[None] - (length - end)[:, None]  # (batch, length) slot to read
            index = source.clamp(min=0)[None, :, None, :, None].expand(self.num_depths, -1, self.num_kv_heads, -1, self.head_dim)
            self.keys[:, :, :, :length] = self.keys.gather(3, index)
            self.values[:, :, :, :length] = self.values.gather(3, index)
        self.length = length

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
