"""Execute a step plan on the model: one pass of the shared block over every work item at once.

All items' tokens are packed into one row sequence [1, rows, hidden]. The linears, norms and LoRAs
run once per shared layer over all rows, each row using its own loop's LoRA/norm through the
per-token visit index (a gather inside the batched matmul, no Python loop over depths). Only the
attention core depends on a request's own keys: single-token (decode) items share one batched
attention over their padded KV blocks, prefill chunks attend one by one.

State kept here between steps (tensors, keyed by request id): the hidden state of every chunk in
flight, the exit hidden states ``propagate`` needs, and per-request sampling generators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recursify.config import SamplingConfig
from recursify.errors import ConfigError
from recursify.modeling.generation import sample_next
from recursify.modeling.layers import SharedLayer, scaled_attention
from recursify.modeling.lora import Visit
from recursify.modeling.model import RecursiveModel
from recursify.serving.exit_policy import ExitPolicy
from recursify.serving.kv_cache import KVPool
from recursify.serving.scheduler import ItemResult, StepPlan, WorkItem


def block_size_of(model: RecursiveModel) -> int:
    """K, the layers one loop runs; raises unless depth = loop * K + layer with visit = loop (cycle sharing)."""
    block = len(model.layers)
    cyclic = all(slot.layer == slot.depth % block and slot.visit == slot.depth // block for slot in model.schedule)
    if not cyclic or block * model.loops != model.num_depths:
        raise ConfigError(
            f"the serving engine needs strategy 'cycle' (one block of shared layers looped); this model uses "
            f"{model.recursion.strategy!r}: convert with --strategy cycle"
        )
    return block


@dataclass
class _Rows:
    """Per-row metadata of one step: item rows first (``items`` of them), then propagate fill rows."""

    positions: torch.Tensor  # (rows,)
    loops: torch.Tensor  # (rows,)
    blocks: torch.Tensor  # (rows,) KV block of each row's position
    offsets: torch.Tensor  # (rows,) offset inside that block
    items: int  # number of item rows (fill rows follow)
    uniform_loop: int | None  # the loop every row is at, when they agree (the cheaper int-visit path)

    def visit(self, rows: int | None = None) -> Visit:
        if self.uniform_loop is not None:
            return self.uniform_loop
        return self.loops[None, :rows]  # (1, rows): one visit per token


@dataclass
class _AttentionGroup:
    """Items whose queries attend in one call (all decode items, or one prefill chunk).

    Built once per step: only the depth (and so the KV slot and sliding flag) changes between
    the shared layers of a step, so tables and masks are reused by every layer.
    """

    rows: torch.Tensor | slice  # the group's query rows among the item rows (n * t of them)
    tables: torch.Tensor  # (n, width) KV blocks of each item, padded with block 0
    loops: torch.Tensor  # (n,)
    allowed: torch.Tensor  # (n, 1, t, width * block_size) causal mask
    windowed: torch.Tensor | None  # the same with the sliding window (models with sliding depths)


class ModelRunner:
    """Runs plans on a RecursiveModel with a KV pool, an exit policy and a KV mode for exited tokens."""

    def __init__(self, model: RecursiveModel, pool: KVPool, policy: ExitPolicy, kv_mode: str):
        self.model, self.pool, self.policy, self.kv_mode = model, pool, policy, kv_mode
        self.block = block_size_of(model)
        kinds = model.arch.rope_kinds
        # layer type index of every (loop, layer): attention pattern and RoPE table differ per depth
        self.type_of = torch.tensor([[kinds.index(model.arch.layer_types[loop * self.block + k]) for k in range(self.block)]
                                     for loop in range(model.loops)])  # fmt: skip
        self.sliding = torch.tensor([[model.arch.layer_types[loop * self.block + k] == "sliding_attention" for k in range(self.block)]
                                     for loop in range(model.loops)])  # fmt: skip
        self.windowed = model.arch.sliding_window is not None and bool(self.sliding.any())
        self.hidden: dict[str, torch.Tensor] = {}
        self.exit_hidden: dict[str, torch.Tensor] = {}
        self.sampling: dict[str, tuple[SamplingConfig, torch.Generator | None]] = {}

    def register(self, request_id: str, sampling: SamplingConfig) -> None:
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        self.sampling[request_id] = (sampling, generator)

    def release(self, request_id: str) -> None:
        for state in (self.hidden, self.exit_hidden, self.sampling):
            state.pop(request_id, None)

    @torch.no_grad()
    def execute(self, plan: StepPlan) -> dict[str, ItemResult]:
        """Run one loop for every item of the plan; return each item's exit verdict and token."""
        for request_id in plan.released:
            self.release(request_id)
        if not plan.items:
            return {}
        h, fills, rows = self._inputs(plan.items)
        tables = self.model.rope_tables(rows.positions[None], h.dtype)
        groups = self._attention_groups(plan.items)
        for k in range(self.block):
            rope = self._rope(k, rows, tables)
            h = self._layer(self.model.shared_layer(k), k, h, fills, rows, rope, groups)
        return self._finish(plan.items, h, rows)

    # --- inputs -----------------------------------------------------------------------------

    def _inputs(self, items: list[WorkItem]) -> tuple[torch.Tensor, torch.Tensor | None, _Rows]:
        """Item rows [items_rows, hidden], fill rows (or None) and the row metadata."""
        fresh = [token for item in items if item.loop == 0 for token in item.token_ids]
        embedded = self.model.embed_tokens(torch.tensor(fresh, dtype=torch.long)[None])[0] if fresh else None
        parts, fill_parts, used = [], [], 0
        positions: list[int] = []
        loops: list[int] = []
        fill_positions: list[int] = []
        fill_loops: list[int] = []
        owners: list[tuple[int, ...]] = []
        fill_owners: list[tuple[int, ...]] = []
        for item in items:
            if item.loop == 0:
                assert embedded is not None
                parts.append(embedded[used : used + item.num_tokens])
                used += item.num_tokens
            else:
                parts.append(self.hidden.pop(item.request_id))
            positions += range(item.start, item.start + item.num_tokens)
            loops += [item.loop] * item.num_tokens
            owners += [item.blocks] * item.num_tokens
            if item.fill_start < item.start:
                fill_parts.append(self.exit_hidden[item.request_id][item.fill_start : item.start])
                fill_positions += range(item.fill_start, item.start)
                fill_loops += [item.loop] * (item.start - item.fill_start)
                fill_owners += [item.blocks] * (item.start - item.fill_start)
        all_positions = positions + fill_positions
        all_loops = loops + fill_loops
        size = self.pool.block_size
        blocks = [table[p // size] for table, p in zip(owners + fill_owners, all_positions, strict=True)]
        rows = _Rows(
            positions=torch.tensor(all_positions),
            loops=torch.tensor(all_loops),
            blocks=torch.tensor(blocks),
            offsets=torch.tensor([p % size for p in all_positions]),
            items=len(positions),
            uniform_loop=all_loops[0] if len(set(all_loops)) == 1 else None,
        )
        return torch.cat(parts), (torch.cat(fill_parts) if fill_parts else None), rows

    def _rope(self, k: int, rows: _Rows, tables: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's (cos, sin) [1, rows, head_dim] for the layer type of its depth at shared layer k."""
        kinds = self.model.arch.rope_kinds
        if len(kinds) == 1:
            return tables[kinds[0]]
        row_type = self.type_of[rows.loops, k][None, :, None]  # (1, rows, 1)
        cos, sin = tables[kinds[0]]
        for index, kind in enumerate(kinds[1:], start=1):
            cos = torch.where(row_type == index, tables[kind][0], cos)
            sin = torch.where(row_type == index, tables[kind][1], sin)
        return cos, sin

    # --- one shared layer -------------------------------------------------------------------

    def _layer(
        self,
        layer: SharedLayer,
        k: int,
        h: torch.Tensor,
        fills: torch.Tensor | None,
        rows: _Rows,
        rope: tuple[torch.Tensor, torch.Tensor],
        groups: list[_AttentionGroup],
    ) -> torch.Tensor:
        """h: [item_rows, hidden] -> same, after shared layer k at each row's own depth."""
        arch = self.model.arch
        x = h if fills is None else torch.cat([h, fills])
        normed = layer.norm("attn_norm")(x[None], rows.visit())
        q, key, value = layer.project_qkv(normed, rows.visit(), rope)  # (1, heads, rows, d)
        depths = rows.loops * self.block + k
        self.pool.write(rows.blocks, rows.offsets, depths, key[0].transpose(0, 1), value[0].transpose(0, 1))
        attn = self._attend(q[0, :, : rows.items], k, groups)  # (item_rows, heads * head_dim)
        visit = rows.visit(rows.items)
        out = layer.linear("o")(attn[None], visit)
        if arch.sandwich_norms:
            out = layer.norm("post_attn_norm")(out, visit)
        h = h + out[0]
        mlp = layer.mlp(layer.norm("mlp_norm")(h[None], visit), visit)
        if arch.sandwich_norms:
            mlp = layer.norm("post_mlp_norm")(mlp, visit)
        return h + mlp[0]

    def _attend(self, q: torch.Tensor, k: int, groups: list[_AttentionGroup]) -> torch.Tensor:
        """Attention of every item's queries (q: [heads, item_rows, d]) over its own keys at its depth."""
        heads, total, head_dim = q.shape
        out = torch.empty(total, heads * head_dim, dtype=q.dtype)
        for group in groups:
            n, t = group.allowed.shape[0], group.allowed.shape[2]
            part = self._attend_group(q[:, group.rows].unflatten(1, (n, t)).transpose(0, 1), k, group)  # (n, heads, t, d)
            out[group.rows] = part.transpose(1, 2).reshape(n * t, -1).to(out.dtype)
        return out

    def _attention_groups(self, items: list[WorkItem]) -> list[_AttentionGroup]:
        """One group per prefill chunk (attending alone) and one for all single-token items."""
        groups, row, decode_rows, decode_items = [], 0, [], []
        for item in items:
            if item.num_tokens == 1:
                decode_rows.append(row)
                decode_items.append(item)
            else:
                groups.append(self._attention_group(slice(row, row + item.num_tokens), [item]))
            row += item.num_tokens
        if decode_items:
            groups.append(self._attention_group(torch.tensor(decode_rows), decode_items))
        return groups

    def _attention_group(self, rows: torch.Tensor | slice, items: list[WorkItem]) -> _AttentionGroup:
        """Block tables and masks for items of equal chunk length t."""
        size, t = self.pool.block_size, items[0].num_tokens
        width = math.ceil(max(item.start + t for item in items) / size)
        tables = torch.tensor([list(item.blocks[:width]) + [0] * (width - min(width, len(item.blocks))) for item in items])
        query_pos = torch.tensor([[item.start + i for i in range(t)] for item in items])[:, None, :, None]  # (n, 1, t, 1)
        key_pos = torch.arange(width * size)[None, None, None, :]
        allowed = key_pos <= query_pos
        window = self.model.arch.sliding_window
        windowed = allowed & (key_pos > query_pos - window) if self.windowed and window is not None else None
        return _AttentionGroup(rows, tables, torch.tensor([item.loop for item in items]), allowed, windowed)

    def _attend_group(self, q: torch.Tensor, k: int, group: _AttentionGroup) -> torch.Tensor:
        """q: [n, heads, t, d] for the group's n items -> [n, heads, t, d], at each item's depth of shared layer k."""
        arch = self.model.arch
        keys, values = self.pool.gather(group.tables, group.loops * self.block + k)  # (n, kv_heads, width * size, d)
        allowed = group.allowed
        if group.windowed is not None:
            allowed = torch.where(self.sliding[group.loops, k][:, None, None, None], group.windowed, group.allowed)
        prefix = self.model.shared_layer(k).prefix
        if prefix is not None:  # per-depth learned keys/values (--relax prefix:N), visit = loop
            keys, values, allowed = prefix.prepend(keys, values, allowed, group.loops)
        return scaled_attention(q, keys.to(q.dtype), values.to(q.dtype), allowed, arch.attn_scale, arch.attn_softcap)

    # --- after the loop ---------------------------------------------------------------------

    def _finish(self, items: list[WorkItem], h: torch.Tensor, rows: _Rows) -> dict[str, ItemResult]:
        """Exit head where the policy needs it, exit verdicts, sampling, and the state for next steps."""
        spans, row = [], 0
        for item in items:
            spans.append((row, row + item.num_tokens))
            row += item.num_tokens
        checked = [i for i, item in enumerate(items) if item.emits and self.policy.needs_logits(item.loop)]
        logits = self.model.head(h[torch.tensor([spans[i][1] - 1 for i in checked], dtype=torch.long)]).float() if checked else None
        exits = self.policy.decide(logits, [items[i].loop for i in checked]).tolist() if logits is not None else []
        verdict = dict(zip(checked, exits, strict=True))
        argmax = dict(zip(checked, logits.argmax(dim=-1).tolist(), strict=True)) if logits is not None else {}
        results: dict[str, ItemResult] = {}
        for i, item in enumerate(items):
            start, end = spans[i]
            exited = verdict.get(i, False) if item.emits else self.policy.is_exit_loop(item.loop)
            token = None
            if exited and item.emits:
                assert logits is not None
                sampling, generator = self.sampling[item.request_id]
                token = int(sample_next(logits[checked.index(i)][None], sampling, generator)[0])
            results[item.request_id] = ItemResult(exited=exited, token=token, argmax=argmax.get(i))
            if not exited:
                self.hidden[item.request_id] = h[start:end]
            elif item.loop + 1 < self.model.loops:
                self._keep_for_deeper_loops(item, h[start:end], rows.blocks[start:end], rows.offsets[start:end])
        return results

    def _keep_for_deeper_loops(self, item: WorkItem, h: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> None:
        """An early-exited chunk: keep its hidden state (propagate) or copy its keys/values deeper (share)."""
        if self.kv_mode == "share":
            for k in range(self.block):
                source = item.loop * self.block + k
                self.pool.copy_depth(blocks, offsets, source, [loop * self.block + k for loop in range(item.loop + 1, self.model.loops)])
            return
        buffer = self.exit_hidden.get(item.request_id)
        if buffer is None:
            buffer = torch.zeros(len(item.blocks) * self.pool.block_size, h.shape[-1], dtype=h.dtype)
            self.exit_hidden[item.request_id] = buffer
        buffer[item.start : item.start + item.num_tokens] = h.to(buffer.dtype)
