"""Serving KV memory: fixed-size blocks with one slot per depth, reserved per request at admission.

Two halves with one job each: ``BlockAllocator`` is CPU bookkeeping (which blocks belong to which
request; the scheduler uses it for admission control), ``KVPool`` holds the preallocated tensors
(the runner writes and gathers keys/values by block, depth and offset). A request reserves every
block it can ever need when it is admitted, so a running request never runs out of memory: requests
that do not fit wait in the queue instead.
"""

from __future__ import annotations

import math

import torch

from recursify.errors import ConfigError


class BlockAllocator:
    """Hands out KV blocks of ``block_size`` positions from a pool of ``num_blocks``."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ConfigError(f"KV pool needs at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))
        self._owned: dict[str, tuple[int, ...]] = {}
        self._reserved_tokens: dict[str, int] = {}

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def reserved_tokens(self) -> int:
        """Positions reserved by live requests (before rounding up to whole blocks)."""
        return sum(self._reserved_tokens.values())

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(max(num_tokens, 1) / self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, owner: str, num_tokens: int) -> tuple[int, ...]:
        """Reserve blocks for ``num_tokens`` positions; the caller checks ``can_allocate`` first."""
        if owner in self._owned:
            raise ConfigError(f"request {owner!r} already holds KV blocks")
        needed = self.blocks_for(num_tokens)
        if needed > len(self._free):
            raise ConfigError(f"KV pool exhausted: {needed} blocks needed, {len(self._free)} free")
        blocks = tuple(self._free.pop() for _ in range(needed))
        self._owned[owner], self._reserved_tokens[owner] = blocks, num_tokens
        return blocks

    def free(self, owner: str) -> None:
        """Return the owner's blocks (a no-op for owners that hold none)."""
        self._free.extend(reversed(self._owned.pop(owner, ())))
        self._reserved_tokens.pop(owner, None)

    def owners(self) -> list[str]:
        return list(self._owned)


class KVPool:
    """Keys and values: [num_blocks, num_depths, block_size, kv_heads, head_dim] each.

    Positions sit outside heads so that one (block, depth) slab and one (block, depth, offset) row
    are contiguous: writes are ``index_copy_`` over rows and a gather is one ``index_select`` over
    slabs (several times faster than multi-tensor advanced indexing on CPU), whose
    [n, positions, kv_heads, d] result attention reads through a transposed view.

    The buffers are allocated once, on the first write, in the dtype the model computes keys in
    (as the core KVCache does), and then reused for the engine's lifetime.
    """

    def __init__(self, num_blocks: int, block_size: int, num_depths: int, num_kv_heads: int, head_dim: int):
        self.shape = (num_blocks, num_depths, block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    @property
    def keys(self) -> torch.Tensor:
        assert self._keys is not None, "KVPool read before its first write"
        return self._keys

    @property
    def values(self) -> torch.Tensor:
        assert self._values is not None, "KVPool read before its first write"
        return self._values

    def nbytes(self) -> int:
        """Bytes held by the buffers (0 before the first write)."""
        return 0 if self._keys is None or self._values is None else self._keys.nbytes + self._values.nbytes

    def write(self, blocks: torch.Tensor, offsets: torch.Tensor, depths: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store rows: blocks/offsets/depths [rows] (long), key/value [rows, kv_heads, head_dim]."""
        if self._keys is None or self._values is None:
            self._keys = torch.zeros(self.shape, dtype=key.dtype, device=key.device)
            self._values = torch.zeros(self.shape, dtype=value.dtype, device=value.device)
        rows = self._rows(blocks, depths, offsets)
        self._flat_rows(self.keys).index_copy_(0, rows, key.to(self.keys.dtype))
        self._flat_rows(self.values).index_copy_(0, rows, value.to(self.values.dtype))

    def gather(self, tables: torch.Tensor, depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of several sequences: tables [n, blocks] and depths [n] -> [n, kv_heads, blocks*block_size, head_dim].

        The results are transposed views of one gathered copy each (not contiguous).
        """
        n, num_blocks = tables.shape
        positions = num_blocks * self.block_size
        slabs = (tables * self.shape[1] + depths[:, None]).view(-1)  # (n * blocks,) index of each (block, depth) slab
        keys = self.keys.flatten(0, 1).index_select(0, slabs).view(n, positions, *self.shape[3:])  # (n, positions, kv_heads, d)
        values = self.values.flatten(0, 1).index_select(0, slabs).view(n, positions, *self.shape[3:])
        return keys.transpose(1, 2), values.transpose(1, 2)

    def copy_depth(self, blocks: torch.Tensor, offsets: torch.Tensor, source: int, targets: list[int]) -> None:
        """KV sharing: positions (blocks/offsets [rows]) reuse depth ``source``'s keys/values at ``targets``."""
        sources = self._rows(blocks, torch.full_like(blocks, source), offsets)
        for target in targets:
            rows = self._rows(blocks, torch.full_like(blocks, target), offsets)
            for buffer in (self._flat_rows(self.keys), self._flat_rows(self.values)):
                buffer.index_copy_(0, rows, buffer.index_select(0, sources))

    def _rows(self, blocks: torch.Tensor, depths: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Flat row index of each (block, depth, offset) in ``_flat_rows``."""
        return (blocks * self.shape[1] + depths) * self.block_size + offsets

    @staticmethod
    def _flat_rows(buffer: torch.Tensor) -> torch.Tensor:
        """A [blocks * depths * block_size, kv_heads, head_dim] view: one row per stored position and depth."""
        return buffer.flatten(0, 2)
