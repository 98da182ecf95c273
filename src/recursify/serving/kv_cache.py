"""Serving KV memory: fixed-size blocks with one slot per depth, allocated as a request's positions grow.

Three parts with one job each: ``BlockAllocator`` is CPU bookkeeping (which blocks belong to which
request; the scheduler grows a request's table one block at a time and preempts when the pool runs
out), ``KVPool`` holds the preallocated tensors (written and gathered by block, depth and offset),
and ``PagedAttention`` is the attention core (modeling/attention.py) the model's own
``SharedLayer.forward`` runs on in the engine: it writes each packed row's keys/values into the pool
at the row's depth and attends every item's queries over its own blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from recursify.errors import ConfigError
from recursify.modeling.attention import Depth, RopeTables, build_masks, mask_at
from recursify.modeling.lora import Visit

if TYPE_CHECKING:
    from recursify.modeling.layers import SharedLayer


class BlockAllocator:
    """Hands out KV blocks of ``block_size`` positions from a pool of ``num_blocks``.

    An owner's table only grows (``allocate`` appends the blocks a larger position count needs) until
    ``free`` returns all of it: requests hold blocks for what they computed plus their chunk in flight,
    not for the most they might ever generate.
    """

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
        """Positions the live owners' tables cover (before rounding up to whole blocks)."""
        return sum(self._reserved_tokens.values())

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(max(num_tokens, 1) / self.block_size)

    def missing(self, num_tokens: int, owner: str | None = None) -> int:
        """Blocks ``owner`` (a new owner when None) still lacks to cover ``num_tokens`` positions."""
        held = len(self._owned.get(owner, ())) if owner is not None else 0
        return max(self.blocks_for(num_tokens) - held, 0)

    def can_allocate(self, num_tokens: int, owner: str | None = None) -> bool:
        return self.missing(num_tokens, owner) <= len(self._free)

    def allocate(self, owner: str, num_tokens: int) -> tuple[int, ...]:
        """Grow ``owner``'s table to cover ``num_tokens`` positions and return it; the caller checks ``can_allocate`` first."""
        needed = self.missing(num_tokens, owner)
        if needed > len(self._free):
            raise ConfigError(f"KV pool exhausted: {needed} blocks needed, {len(self._free)} free")
        blocks = self._owned.get(owner, ()) + tuple(self._free.pop() for _ in range(needed))
        self._owned[owner] = blocks
        self._reserved_tokens[owner] = max(num_tokens, self._reserved_tokens.get(owner, 0))
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


class Chunk(Protocol):
    """One item's query rows in a step (a scheduler WorkItem): positions start.. start + num_tokens - 1 of a sequence owning ``blocks``."""

    @property
    def start(self) -> int: ...

    @property
    def num_tokens(self) -> int: ...

    @property
    def blocks(self) -> tuple[int, ...]: ...


@dataclass
class AttentionGroup:
    """Items whose queries attend in one call: every single-token (decode) item together, or one prefill chunk.

    Built once per step: between the shared layers of a step only the depth (so the KV slot and
    the sliding flag) changes, so the block tables and masks are reused by every layer.
    """

    rows: torch.Tensor | slice  # the group's query rows among all query rows (n items x t tokens, item-major)
    items: torch.Tensor  # (n,) the first query row of each item: where its depth and visit are read
    tokens: int  # t, the query rows per item
    tables: torch.Tensor  # (n, width) KV blocks of each item, padded with block 0 (masked: beyond every query)
    masks: dict[str, torch.Tensor]  # layer type -> bool (n, 1, t, width * block_size)


def attention_groups(
    chunks: Sequence[Chunk], block_size: int, layer_types: Sequence[str], sliding_window: int | None
) -> list[AttentionGroup]:
    """One group per prefill chunk (attending alone) and one for all single-token chunks (batched decode).

    ``chunks`` are the step's query rows in order. A decode batch gathers every item's KV blocks
    padded to the longest; a prefill chunk would pad every other item to its length, so it runs alone.
    """
    groups, row, decode_rows, decode = [], 0, [], []
    for chunk in chunks:
        if chunk.num_tokens == 1:
            decode_rows.append(row)
            decode.append(chunk)
        else:
            groups.append(_group(slice(row, row + chunk.num_tokens), torch.tensor([row]), [chunk], block_size, layer_types, sliding_window))
        row += chunk.num_tokens
    if decode:
        decode_index = torch.tensor(decode_rows)
        groups.append(_group(decode_index, decode_index, decode, block_size, layer_types, sliding_window))
    return groups


def _group(
    rows: torch.Tensor | slice,
    items: torch.Tensor,
    chunks: list[Chunk],
    block_size: int,
    layer_types: Sequence[str],
    sliding_window: int | None,
) -> AttentionGroup:
    """Block tables and masks (``attention.build_masks``, the model's own) for chunks of equal length t."""
    t = chunks[0].num_tokens
    width = math.ceil(max(chunk.start + t for chunk in chunks) / block_size)
    tables = torch.tensor([list(chunk.blocks[:width]) + [0] * (width - min(width, len(chunk.blocks))) for chunk in chunks])
    queries = torch.tensor([[chunk.start + i for i in range(t)] for chunk in chunks])  # (n, t) key position of each query
    return AttentionGroup(rows, items, t, tables, build_masks(queries, width * block_size, layer_types, sliding_window))


class PagedAttention:
    """The attention core of one engine step over a ``KVPool`` (see ``AttentionCore``).

    The step's rows are packed as one sequence [1, rows]: first the items' query rows, then the
    propagate fill rows (keys/values only). Each row has its own depth (``depth`` [1, rows] =
    loop * K + layer: a packed batch mixes loops), hence its own KV slot, RoPE table and pattern.
    """

    def __init__(
        self, pool: KVPool, rope: RopeTables, blocks: torch.Tensor, offsets: torch.Tensor, queries: int, groups: list[AttentionGroup]
    ):
        self.pool, self.rope, self.groups = pool, rope, groups
        self.blocks, self.offsets = blocks, offsets  # (rows,) where each row's key is stored
        self.queries = queries

    def attend(self, layer: SharedLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visit: Visit, depth: Depth) -> torch.Tensor:
        """q: [1, heads, rows, d]; k, v: [1, kv_heads, rows, d]; depth [1, rows] (or one int for all) -> [1, heads, queries, d]."""
        if isinstance(depth, int):  # a prelude or coda depth: every row at the same depth
            depth = torch.full((1, k.shape[2]), depth, dtype=torch.long)
        self.pool.write(self.blocks, self.offsets, depth[0], k[0].transpose(0, 1), v[0].transpose(0, 1))
        heads, head_dim = q.shape[1], q.shape[3]
        out = torch.empty(self.queries, heads, head_dim, dtype=q.dtype, device=q.device)  # (queries, heads, d)
        for group in self.groups:
            n, t = group.items.shape[0], group.tokens
            item_depth = depth[0, group.items]  # (n,)
            keys, values = self.pool.gather(group.tables, item_depth)  # (n, kv_heads, width * block_size, d)
            mask = mask_at(group.masks, layer.arch.layer_types, item_depth)
            item_visit = visit if isinstance(visit, int) else visit[0, group.items]  # (n,): every token of an item is at its loop
            group_q = q[0, :, group.rows].unflatten(1, (n, t)).transpose(0, 1)  # (n, heads, t, d)
            part = layer.attend(group_q, keys, values, mask, item_visit)  # (n, heads, t, d)
            out[group.rows] = part.transpose(1, 2).reshape(n * t, heads, head_dim).to(out.dtype)
        return out.transpose(0, 1)[None]  # (1, heads, queries, d), a view the o-projection reads back contiguously
