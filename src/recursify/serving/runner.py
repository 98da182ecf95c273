"""Execute a step plan on the model: one pass of the shared block over every work item at once.

All items' tokens are packed into one row sequence [1, rows, hidden], and each shared layer runs
once over all rows through the model's own ``SharedLayer.forward``: the linears, norms and LoRAs
run once per layer, each row using its own loop's LoRA/norm through the per-token visit index (a
grouped matmul per loop present, no Python loop over rows), and each row at its own depth
(loop * K + layer). Only the attention core depends on a request's own keys: ``PagedAttention``
(serving/kv_cache.py) batches single-token (decode) items over their padded KV blocks and lets
prefill chunks attend one by one. Propagate fill rows ride along after the item rows: the layer
writes their keys/values and drops them before the o-projection.

State kept here between steps (tensors, keyed by request id): the hidden state of every chunk in
flight, the exit hidden states ``propagate`` needs, the exit logits of earlier loops an exit
ensemble combines, and per-request sampling generators. Exit decisions (serving/exit_policy.py)
read either the exit head's logits or, for gates and saturation, the loop-end hidden state and the
state that entered the loop; then the head runs only on the rows that leave.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recursify.config import SamplingConfig
from recursify.errors import ConfigError
from recursify.modeling.generation import sample_next
from recursify.modeling.lora import Visit
from recursify.modeling.model import RecursiveModel
from recursify.serving.exit_policy import ExitPolicy, ensemble_probs, signal_scores
from recursify.serving.kv_cache import KVPool, PagedAttention, attention_groups
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

    def visit(self) -> Visit:
        if self.uniform_loop is not None:
            return self.uniform_loop
        return self.loops[None]  # (1, rows): one visit per token


class ModelRunner:
    """Runs plans on a RecursiveModel with a KV pool, an exit policy and a KV mode for exited tokens."""

    def __init__(self, model: RecursiveModel, pool: KVPool, policy: ExitPolicy, kv_mode: str):
        self.model, self.pool, self.policy, self.kv_mode = model, pool, policy, kv_mode
        self.block = block_size_of(model)
        self.hidden: dict[str, torch.Tensor] = {}
        self.exit_hidden: dict[str, torch.Tensor] = {}
        self.exit_history: dict[str, list[torch.Tensor]] = {}  # ensemble: the token in flight's exit logits per loop
        self.sampling: dict[str, tuple[SamplingConfig, torch.Generator | None]] = {}
        self.head_rows = 0  # rows the LM head has run on, and steps it ran in (the benchmark's cost accounting)
        self.head_steps = 0
        self.row_loops = 0  # item rows run through one loop, summed over steps (fill rows excluded)

    def register(self, request_id: str, sampling: SamplingConfig) -> None:
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        self.sampling[request_id] = (sampling, generator)

    def release(self, request_id: str, keep_sampling: bool = False) -> None:
        """Drop a request's state; a preempted one keeps its sampler, which resumes where it stopped."""
        states = (self.hidden, self.exit_hidden, self.exit_history)
        for state in states if keep_sampling else (*states, self.sampling):
            state.pop(request_id, None)

    @torch.no_grad()
    def execute(self, plan: StepPlan) -> dict[str, ItemResult]:
        """Run one loop for every item of the plan; return each item's exit verdict and token."""
        for request_id in plan.released:
            self.release(request_id)
        for request_id in plan.preempted:
            self.release(request_id, keep_sampling=True)
        if not plan.items:
            return {}
        h, fills, rows = self._inputs(plan.items)  # (item_rows, hidden), (fill_rows, hidden) or None
        arch = self.model.arch
        attention = PagedAttention(
            self.pool,
            self.model.rope_tables(rows.positions[None], h.dtype),  # tables and masks: once per step, not per layer
            rows.blocks,
            rows.offsets,
            rows.items,
            attention_groups(plan.items, self.pool.block_size, arch.layer_types, arch.sliding_window),
        )
        visit, loop_depth = rows.visit(), rows.loops[None] * self.block  # (1, rows): depth = loop * K + layer
        entering = h
        self.row_loops += rows.items
        for k in range(self.block):
            x = h if fills is None else torch.cat([h, fills])  # fills: the same exit state at every layer
            h = self.model.shared_layer(k)(x[None], visit, loop_depth + k, attention)[0]
        return self._finish(plan.items, h, entering, rows)

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

    # --- after the loop ---------------------------------------------------------------------

    def _finish(self, items: list[WorkItem], h: torch.Tensor, entering: torch.Tensor, rows: _Rows) -> dict[str, ItemResult]:
        """Exit decisions, the exit head where needed, sampling, and the state for next steps.

        h / entering: [item_rows, hidden] every item row's state after this loop and as it entered
        it. Only an emitting chunk's last row decides and samples. Gate and saturation decisions
        read the states, so the LM head then runs on the rows that leave only; confidence,
        ensemble and oracle need it on every emitting row first.
        """
        spans, row = [], 0
        for item in items:
            spans.append((row, row + item.num_tokens))
            row += item.num_tokens
        emitting = [i for i, item in enumerate(items) if item.emits]
        decided = self._decide(items, emitting, [spans[i][1] - 1 for i in emitting], h, entering)
        results: dict[str, ItemResult] = {}
        for i, item in enumerate(items):
            start, end = spans[i]
            exited, token, argmax = decided.get(i, (self.policy.is_exit_loop(item.loop), None, None))
            results[item.request_id] = ItemResult(exited=exited, token=token, argmax=argmax)
            if not exited:
                self.hidden[item.request_id] = h[start:end]
            elif item.loop + 1 < self.model.loops:
                self._keep_for_deeper_loops(item, h[start:end], rows.blocks[start:end], rows.offsets[start:end])
        return results

    def _decide(
        self, items: list[WorkItem], emitting: list[int], last_rows: list[int], h: torch.Tensor, entering: torch.Tensor
    ) -> dict[int, tuple[bool, int | None, int | None]]:
        """Per emitting item: (exits now, its token if so, the exit head's argmax where it ran)."""
        if not emitting:
            return {}
        policy, model = self.policy, self.model
        loops = [items[i].loop for i in emitting]
        index = torch.tensor(last_rows)
        states = h[index]  # (emitting, hidden)
        logits: torch.Tensor | None = None  # (emitting, vocab) when the head ran before deciding
        scores: torch.Tensor | None = None
        if any(policy.needs_logits(loop) for loop in loops) and not policy.reads_hidden and policy.kind not in ("none", "fixed"):
            logits = model.exit_logits(states, loops).float()
            self.head_rows, self.head_steps = self.head_rows + len(loops), self.head_steps + 1
            if policy.kind == "ensemble":
                logits = self._ensemble(items, emitting, loops, logits)
                scores = logits.softmax(dim=-1).amax(dim=-1)
            elif policy.kind == "confidence":
                scores = signal_scores("confidence", model, loops, logits=logits)
        elif policy.reads_hidden:
            scores = signal_scores(policy.kind, model, loops, hidden=states, previous=entering[index])
        exits = policy.decide(loops, scores).tolist()
        if logits is None and any(exits):  # the head runs once per token: on the rows leaving now
            leaving = [j for j, leave in enumerate(exits) if leave]
            logits = torch.zeros(len(emitting), model.arch.vocab_size)
            logits[leaving] = model.exit_logits(states[leaving], [loops[j] for j in leaving]).float()
            self.head_rows, self.head_steps = self.head_rows + len(leaving), self.head_steps + 1
        decided: dict[int, tuple[bool, int | None, int | None]] = {}
        for j, i in enumerate(emitting):
            token = argmax = None
            if logits is not None and (exits[j] or policy.needs_logits(loops[j])):
                argmax = int(logits[j].argmax())
            if exits[j]:
                assert logits is not None
                request_id = items[i].request_id
                sampling, generator = self.sampling[request_id]
                token = int(sample_next(logits[j][None], sampling, generator)[0])
                self.exit_history.pop(request_id, None)
            decided[i] = (exits[j], token, argmax)
        return decided

    def _ensemble(self, items: list[WorkItem], emitting: list[int], loops: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the exit ensemble (exits 0..b of each token in flight) [emitting, vocab]; the last loop keeps its own."""
        out = logits.clone()
        for j, i in enumerate(emitting):
            self.exit_history.setdefault(items[i].request_id, []).append(logits[j])
        for loop in sorted(set(loops) - {self.model.loops - 1}):  # rows at one loop hold equally many exits
            rows = [j for j, b in enumerate(loops) if b == loop]
            history = [torch.stack(z) for z in zip(*(self.exit_history[items[emitting[j]].request_id] for j in rows), strict=True)]
            out[rows] = ensemble_probs(self.model, history).clamp_min(1e-30).log()
        return out

    def _keep_for_deeper_loops(self, item: WorkItem, h: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> None:
        """An early-exited chunk: keep its hidden state (propagate) or copy its keys/values deeper (share)."""
        if self.kv_mode == "share":
            for k in range(self.block):
                source = item.loop * self.block + k
                self.pool.copy_depth(blocks, offsets, source, [loop * self.block + k for loop in range(item.loop + 1, self.model.loops)])
            return
        buffer = self.exit_hidden.get(item.request_id)
        if buffer is None or len(buffer) < item.start + item.num_tokens:  # blocks grow with the request, and so does this
            grown = torch.zeros(len(item.blocks) * self.pool.block_size, h.shape[-1], dtype=h.dtype)
            if buffer is not None:
                grown[: len(buffer)] = buffer
            buffer = self.exit_hidden[item.request_id] = grown
        buffer[item.start : item.start + item.num_tokens] = h.to(buffer.dtype)
