"""The attention core interface, and the one mask builder and RoPE/mask selectors every path uses.

``SharedLayer.forward`` (layers.py) is the only place a block is wired: norms, q/k/v projections,
RoPE, attention, o-projection, residuals, MLP. The only part that depends on *where keys live* is
handed in as an ``AttentionCore``:

- ``modeling.kv_cache.AttentionContext``: the model's contiguous per-depth KVCache (or no cache),
  used by ``RecursiveModel.forward``, generation and healing; one depth (an int) per call;
- ``serving.kv_cache.PagedAttention``: the serving engine's paged KV pool, where a packed batch
  mixes loops, so the depth is one per row ([1, rows]: each row's KV slot, sliding flag and RoPE).

Both cores take the same masks (``build_masks``, from the key positions each query stands at) and
pick a depth's RoPE table and mask with the same selectors (``rope_at``, ``mask_at``), so a new
attention pattern or RoPE type is written once for the model and the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Protocol

import torch

from recursify.modeling.lora import Visit

if TYPE_CHECKING:
    from recursify.modeling.layers import SharedLayer

Depth = int | torch.Tensor  # one depth for the batch, or one per row / token (LongTensor)
RopeTables = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer type -> (cos, sin), [batch, rows, head_dim]


class AttentionCore(Protocol):
    """What a shared layer needs from the KV storage of one forward pass.

    Attributes:
        rope: (cos, sin) [batch, rows, head_dim] of the rows' positions per layer type (select
            with ``rope_at``).
    """

    rope: RopeTables

    def attend(self, layer: SharedLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visit: Visit, depth: Depth) -> torch.Tensor:
        """Store every row's keys/values at ``depth``; return the query rows' attention output.

        q: [batch, heads, rows, head_dim]; k, v: [batch, kv_heads, rows, head_dim] (RoPE applied).
        Returns [batch, heads, queries, head_dim] for the first ``queries`` rows; rows after them
        only store keys/values (the engine's propagate fill rows; ``queries = rows`` elsewhere).
        The attention itself is ``layer.attend`` over the keys each query may see.
        """
        ...


def build_masks(
    query_positions: torch.Tensor,
    num_keys: int,
    layer_types: Sequence[str],
    sliding_window: int | None,
    key_padding: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Boolean masks [batch, 1, queries, num_keys] per layer type, True = may attend.

    Keys are positions 0..num_keys-1 of a sequence's KV row (the contiguous cache's slots, or a
    paged sequence's block table laid end to end); ``query_positions`` [batch or 1, queries] is the
    key position of each query's own key. A key is visible when it is not padding
    (``key_padding`` [batch, num_keys], 0 = padding), not in the future, and (sliding layers) fewer
    than ``sliding_window`` positions back. Each query also sees itself, so padded query rows stay
    finite instead of producing NaNs (and no row of ``scaled_attention`` is fully masked).
    """
    query = query_positions[:, None, :, None]  # (batch, 1, queries, 1)
    keys = torch.arange(num_keys, device=query_positions.device)  # (num_keys,)
    visible = keys <= query  # (batch, 1, queries, num_keys)
    if key_padding is not None:
        visible = visible & key_padding.bool()[:, None, None, :]
    itself = keys == query
    masks = {}
    for layer_type in dict.fromkeys(layer_types):
        allowed = visible
        if layer_type == "sliding_attention" and sliding_window is not None:
            allowed = allowed & (keys > query - sliding_window)
        masks[layer_type] = allowed | itself
    return masks


def rope_at(tables: RopeTables, layer_types: Sequence[str], depth: Depth) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [batch, rows, head_dim] of the layer type at ``depth``: an int, or one per row [batch, rows]."""
    if isinstance(depth, int):
        return tables[layer_types[depth]]
    kinds = list(tables)
    cos, sin = tables[kinds[0]]
    if len(kinds) > 1:  # per-layer-type RoPE (Gemma3) in a depth-mixed batch: each row its own table
        code = _type_codes(tuple(layer_types), tuple(kinds)).to(depth.device)[depth][..., None]  # (batch, rows, 1)
        for index, kind in enumerate(kinds[1:], start=1):
            cos = torch.where(code == index, tables[kind][0], cos)
            sin = torch.where(code == index, tables[kind][1], sin)
    return cos, sin


def mask_at(masks: dict[str, torch.Tensor], layer_types: Sequence[str], depth: Depth) -> torch.Tensor:
    """The bool [batch, 1, queries, keys] mask of the layer type at ``depth``: an int, or one per sequence [batch]."""
    if isinstance(depth, int):
        return masks[layer_types[depth]]
    kinds = list(masks)
    mask = masks[kinds[0]]
    if len(kinds) > 1:  # sliding and full depths in one batch: each sequence its own pattern
        code = _type_codes(tuple(layer_types), tuple(kinds)).to(depth.device)[depth][:, None, None, None]  # (batch, 1, 1, 1)
        for index, kind in enumerate(kinds[1:], start=1):
            mask = torch.where(code == index, masks[kind], mask)
    return mask


@cache
def _type_codes(layer_types: tuple[str, ...], kinds: tuple[str, ...]) -> torch.Tensor:
    """(depths,) index in ``kinds`` of every depth's layer type."""
    return torch.tensor([kinds.index(layer_type) for layer_type in layer_types])
