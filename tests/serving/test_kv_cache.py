"""The engine's attention core: a depth-mixed packed batch with propagate fill rows equals per-sequence model forwards.

Reference: each sequence alone through the model's contiguous per-depth KVCache (AttentionContext), at
one int depth per call, with every row a query. The engine side packs all sequences into one row
sequence, each row at its own loop, its keys in scattered pool blocks, its fill rows after the
query rows, and runs the same shared layers through ``PagedAttention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import recursify
from recursify.modeling.model import RecursiveModel
from recursify.serving.kv_cache import KVPool, PagedAttention, attention_groups
from tiny import tiny_model

BLOCK = 4


@dataclass(frozen=True)
class Step:
    """One sequence in the step: ``length`` tokens; positions fill_start..start-1 are fills, start..length-1 queries at ``loop``."""

    length: int
    fill_start: int
    start: int
    loop: int
    blocks: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return self.length - self.start


STEPS = [
    Step(length=9, fill_start=8, start=8, loop=2, blocks=(7, 0, 4)),  # decode at the last loop, keys beyond the window
    Step(length=5, fill_start=2, start=2, loop=1, blocks=(2, 9)),  # a prefill chunk of 3 at loop 1: attends alone
    Step(length=7, fill_start=4, start=6, loop=1, blocks=(5, 1)),  # decode at loop 1 with two fill rows (exited at loop 0)
    Step(length=4, fill_start=3, start=3, loop=0, blocks=(3,)),  # decode at loop 0
]


def _model(family: str, relax: str, rank: int) -> RecursiveModel:
    model = recursify.convert(tiny_model(family, seed=3), loops=3, init="average", rank=rank, relax=relax, progress=False)
    torch.manual_seed(0)
    with torch.no_grad():  # move prefixes off their zero init so every depth really differs
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("prefix_keys", "prefix_values"):
                param.add_(torch.randn_like(param) * 0.3)
    return model


@torch.no_grad()
def _alone(model: RecursiveModel, ids: torch.Tensor, step: Step) -> tuple[torch.Tensor, ...]:
    """(step input rows, fill rows, expected query outputs, cached keys, cached values) of one sequence run by itself."""
    block = len(model.layers)
    cache = model.new_cache(1, step.length)
    if step.fill_start:
        model(ids[None, : step.fill_start], cache=cache)  # earlier positions: every depth
    positions = torch.arange(step.fill_start, step.length)[None]
    ctx = model.attention_context(torch.ones(1, step.length, dtype=torch.long), positions, cache, torch.float32)
    h = model.embed_tokens(ids[None, step.fill_start :])
    for loop in range(step.loop):  # fills and queries together through the loops before the step
        for k in range(block):
            h = model.shared_layer(k)(h, loop, loop * block + k, ctx)
    fills, x = h[:, : step.start - step.fill_start], h[:, step.start - step.fill_start :]
    inputs = x
    for k in range(block):  # propagate: fill rows project keys/values from their exit state at every layer
        x = model.shared_layer(k)(torch.cat([fills, x], dim=1), step.loop, step.loop * block + k, ctx)[:, fills.shape[1] :]
    assert cache.keys is not None and cache.values is not None
    return inputs[0], fills[0], x[0], cache.keys, cache.values


@pytest.mark.parametrize(
    ("family", "relax", "rank"),
    [("gemma3_text", "lora", 4), ("gemma2", "prefix:2", 0)],  # RoPE per layer type + windows + LoRA; soft-caps + prefixes
)
def test_depth_mixed_batch_with_fill_rows_equals_each_sequence_alone(family: str, relax: str, rank: int) -> None:
    model = _model(family, relax, rank)
    arch, block = model.arch, len(model.layers)
    pool = KVPool(10, BLOCK, model.num_depths, arch.num_kv_heads, arch.head_dim)
    noise = torch.zeros(1, arch.num_kv_heads, arch.head_dim)
    pool.write(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), noise, noise)
    pool.keys.normal_(generator=torch.Generator().manual_seed(1))  # anything not written below must not be read
    pool.values.normal_(generator=torch.Generator().manual_seed(2))
    queries, fills, expected = [], [], []
    rows: dict[str, list[int]] = {"positions": [], "loops": [], "blocks": []}
    fill_rows: dict[str, list[int]] = {"positions": [], "loops": [], "blocks": []}
    for index, step in enumerate(STEPS):
        ids = torch.randint(3, 97, (step.length,), generator=torch.Generator().manual_seed(index))
        inputs, fill, output, keys, values = _alone(model, ids, step)
        queries.append(inputs)
        fills.append(fill)
        expected.append(output)
        for position in range(step.length):  # the pool holds what earlier steps wrote: no key of this step's loop
            depths = range(model.num_depths if position < step.fill_start else step.loop * block)
            for depth in depths:
                where = torch.tensor([step.blocks[position // BLOCK]]), torch.tensor([position % BLOCK]), torch.tensor([depth])
                pool.write(*where, keys[depth, :, :, position], values[depth, :, :, position])
        for table, span in ((rows, range(step.start, step.length)), (fill_rows, range(step.fill_start, step.start))):
            table["positions"] += span
            table["loops"] += [step.loop] * len(span)
            table["blocks"] += [step.blocks[p // BLOCK] for p in span]
    positions = torch.tensor(rows["positions"] + fill_rows["positions"])
    loops = torch.tensor(rows["loops"] + fill_rows["loops"])
    attention = PagedAttention(
        pool,
        model.rope_tables(positions[None], torch.float32),
        torch.tensor(rows["blocks"] + fill_rows["blocks"]),
        positions % BLOCK,
        len(rows["positions"]),
        attention_groups(STEPS, BLOCK, arch.layer_types, arch.sliding_window),
    )
    assert len(attention.groups) == 2  # the prefill chunk alone, the three decode items together
    h, fill_h = torch.cat(queries), torch.cat(fills)
    with torch.no_grad():
        for k in range(block):
            h = model.shared_layer(k)(torch.cat([h, fill_h])[None], loops[None], loops[None] * block + k, attention)[0]
    assert h.shape[0] == len(rows["positions"])
    torch.testing.assert_close(h, torch.cat(expected), atol=1e-5, rtol=1e-5)
