"""The one mask builder and the per-row RoPE/mask selectors against naive element-by-element references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import recursify
from recursify.modeling.attention import build_masks, mask_at, rope_at
from tiny import tiny_model

TYPES = ["sliding_attention", "full_attention"]


def _naive_mask(queries: list[list[int]], num_keys: int, sliding: int | None, padding: list[list[int]] | None) -> torch.Tensor:
    """Element by element: a key is visible if real, not in the future, inside the window; a query always sees itself."""
    batch = max(len(queries), len(padding) if padding else 1)
    out = torch.zeros(batch, 1, len(queries[0]), num_keys, dtype=torch.bool)
    for b in range(batch):
        for i, query in enumerate(queries[b % len(queries)]):
            for key in range(num_keys):
                real = padding is None or bool(padding[b][key])
                inside = sliding is None or query - key < sliding
                out[b, 0, i, key] = (real and key <= query and inside) or key == query
    return out


@pytest.mark.parametrize(
    ("queries", "num_keys", "padding"),
    [
        ([[0, 1, 2, 3, 4, 5]], 6, None),  # a whole unpadded sequence (no cache)
        ([[0, 1, 2, 3, 4]], 5, [[0, 0, 1, 1, 1]]),  # a left-padded prompt: padding queries see only themselves
        ([[4, 5, 6]], 7, [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]),  # left padding, queries after a cache (offset)
        ([[5], [2], [9]], 12, None),  # the engine's decode group: each sequence at its own position, keys past it are other blocks
        ([[3, 4, 5, 6]], 8, [[0, 1, 1, 1, 1, 1, 1, 1]]),  # a padded prefill chunk at an offset
    ],
    ids=["whole", "padded", "padded-offset", "per-sequence", "chunk"],
)
@pytest.mark.parametrize("window", [None, 1, 3])
def test_build_masks_equals_the_naive_mask(
    queries: list[list[int]], num_keys: int, padding: list[list[int]] | None, window: int | None
) -> None:
    key_padding = torch.tensor(padding) if padding is not None else None
    masks = build_masks(torch.tensor(queries), num_keys, TYPES, window, key_padding=key_padding)
    assert list(masks) == TYPES
    torch.testing.assert_close(masks["full_attention"], _naive_mask(queries, num_keys, None, padding), rtol=0, atol=0)
    torch.testing.assert_close(masks["sliding_attention"], _naive_mask(queries, num_keys, window, padding), rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    num_keys=st.integers(1, 10),
    window=st.integers(1, 6),
    data=st.data(),
)
def test_build_masks_random_positions(num_keys: int, window: int, data: st.DataObject) -> None:
    batch, count = data.draw(st.integers(1, 3)), data.draw(st.integers(1, num_keys))
    queries = [data.draw(st.lists(st.integers(0, num_keys - 1), min_size=count, max_size=count)) for _ in range(batch)]
    padding = [data.draw(st.lists(st.integers(0, 1), min_size=num_keys, max_size=num_keys)) for _ in range(batch)]
    masks = build_masks(torch.tensor(queries), num_keys, ["sliding_attention"], window, key_padding=torch.tensor(padding))
    assert torch.equal(masks["sliding_attention"], _naive_mask(queries, num_keys, window, padding))


def test_rope_and_mask_selectors_pick_each_rows_own_layer_type() -> None:
    """Per-row depths (a depth-mixed batch) select exactly what each row's int depth selects (Gemma3: RoPE per layer type)."""
    model = recursify.convert(tiny_model("gemma3_text", seed=1), loops=1, progress=False)
    layer_types = model.arch.layer_types
    assert len(set(layer_types)) == 2
    positions = torch.tensor([[3, 7, 0, 11, 5, 2]])
    tables = model.rope_tables(positions, torch.float32)
    assert not torch.equal(tables["sliding_attention"][0], tables["full_attention"][0])  # the tables really differ
    depths = torch.tensor([[0, 1, 4, 2, 5, 3]])  # (1, rows): one depth per row
    cos, sin = rope_at(tables, layer_types, depths)
    for row, depth in enumerate(depths[0].tolist()):
        own_cos, own_sin = rope_at(tables, layer_types, depth)
        assert torch.equal(cos[0, row], own_cos[0, row]) and torch.equal(sin[0, row], own_sin[0, row])
    masks = build_masks(torch.tensor([[4], [4], [4]]), 6, layer_types, model.arch.sliding_window)
    sequence_depths = torch.tensor([0, 1, 4])  # sliding, full, full
    mixed = mask_at(masks, layer_types, sequence_depths)
    for b, depth in enumerate(sequence_depths.tolist()):
        assert torch.equal(mixed[b], mask_at(masks, layer_types, depth)[b])
    assert not torch.equal(mixed[0], mixed[1])  # the window really cuts
