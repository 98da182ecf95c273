"""Execute a step plan on the model: one pass of the shared block over every work item at once.

All items' tokens are packed into one row sequence [1, rows, hidden], and each shared layer runs
once over all rows through the model's own ``SharedLayer.forward``: the linears, norms and LoRAs
run once per layer, each row using its own loop's LoRA/norm through the per-token visit index (a
grouped matmul per loop present, no Python loop over rows), and each row at its own depth
(N + loop * K + layer, after a prelude of N depths). Only the attention core depends on a
request's own keys: ``PagedAttention`` (serving/kv_cache.py) batches single-token (decode) items
over their padded KV blocks and lets prefill chunks attend one by one. Propagate fill rows ride
along after the item rows: the layer writes their keys/values and drops them before the o-projection.

A prelude (the original's first layers kept unique) runs on a chunk's fresh embeddings, in the step
of its first loop; a coda (the last layers kept unique) runs on the chunks leaving the stack in this
step (and on those whose exit verdict needs their logits), through ``model.exit_logits``, the
model's one exit path; each has its own KV slots, written once per token.

State kept here between steps (tensors, keyed by request id): the hidden state of every chunk in
flight, the exit hidden states ``propagate`` needs, the exit logits of earlier loops an exit
ensemble combines, and per-request sampling generators. Exit decisions (serving/exit_policy.py)
read either the exit head's logits or, for gates and saturation, the loop-end hidden state and the
state that entered the loop; then the head runs only on the rows that leave.
"""

from __future__ import annotations

import itertools
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
    """K, the layers one loop runs; raises unless the looped depths are N + loop * K + k running layer N + k at visit loop.

    A prelude and a coda (``--prelude`` / ``--coda``) are fine around that block; a block tied by
    another strategy (sequence, cycle-rev) is not, since one engine step runs one loop of the block.
    """
    looped = [slot for slot in model.schedule if slot.part == "loop"]
    first = model.recursion.prelude
    block = len(looped) // model.loops
    cyclic = all(slot.layer == first + (slot.depth - first) % block and slot.visit == (slot.depth - first) // block for slot in looped)
    if not cyclic:
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
        self.first = model.recursion.prelude  # depth and shared-layer index of the block's first layer
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
        visit, loop_depth = rows.visit(), self.first + rows.loops[None] * self.block  # (1, rows): depth = N + loop * K + layer
        entering = h
        self.row_loops += rows.items
        for k in range(self.block):
            x = h if fills is None else torch.cat([h, fills])  # fills: the same exit state at every layer
            h = self.model.shared_layer(self.first + k)(x[None], visit, loop_depth + k, attention)[0]
        return self._finish(plan.items, h, entering, rows)

    def _attention(self, items: list[WorkItem], rows: torch.Tensor, all_rows: _Rows, dtype: torch.dtype) -> PagedAttention:
        """The attention core of ``items`` alone (their query rows ``rows`` among the step's): for the prelude and the coda."""
        arch = self.model.arch
        return PagedAttention(
            self.pool,
            self.model.rope_tables(all_rows.positions[rows][None], dtype),
            all_rows.blocks[rows],
            all_rows.offsets[rows],
            len(rows),
            attention_groups(items, self.pool.block_size, arch.layer_types, arch.sliding_window),
        )

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
        h = torch.cat(parts)
        if self.model.prelude and embedded is not None:  # the prelude runs once per token, with its first loop
            fresh_items = [item for item in items if item.loop == 0]
            fresh_rows = torch.cat(
                [torch.arange(span[0], span[1]) for span, item in zip(_spans(items), items, strict=True) if item.loop == 0]
            )
            attention = self._attention(fresh_items, fresh_rows, rows, h.dtype)
            h[fresh_rows] = self.model.run_depths(self.model.prelude, h[fresh_rows][None], attention)[0]
        return h, (torch.cat(fill_parts) if fill_parts else None), rows

    # --- after the loop ---------------------------------------------------------------------

    def _finish(self, items: list[WorkItem], h: torch.Tensor, entering: torch.Tensor, rows: _Rows) -> dict[str, ItemResult]:
        """Exit decisions, the exit path (coda + head) where needed, sampling, and the state for next steps.

        h / entering: [item_rows, hidden] every item row's state after this loop and as it entered
        it. Only an emitting chunk's last row decides and samples. Gate and saturation decisions
        read the states, so the exit path then runs on the rows that leave only; confidence,
        ensemble and oracle need it on every emitting row first. A model with a coda also runs it on
        the non-emitting chunks (prefill) leaving at their exit loop, to write their coda keys.
        """
        spans = _spans(items)
        emitting = [i for i, item in enumerate(items) if item.emits]
        silent = [i for i, item in enumerate(items) if not item.emits and self.policy.is_exit_loop(item.loop)] if self.model.coda else []
        decided = self._decide(items, spans, emitting, h, entering, rows, silent)
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
        self,
        items: list[WorkItem],
        spans: list[tuple[int, int]],
        emitting: list[int],
        h: torch.Tensor,
        entering: torch.Tensor,
        rows: _Rows,
        silent: list[int],
    ) -> dict[int, tuple[bool, int | None, int | None]]:
        """Per emitting item: (exits now, its token if so, the exit head's argmax where it ran).

        ``silent``: non-emitting items leaving now whose coda still has to run (it runs with the
        first exit-path call of the step, or alone when there is none).
        """
        policy, model = self.policy, self.model
        loops = [items[i].loop for i in emitting]
        last_rows = torch.tensor([spans[i][1] - 1 for i in emitting], dtype=torch.long)
        logits: torch.Tensor | None = None  # (emitting, vocab) when the head ran before deciding
        scores: torch.Tensor | None = None
        if (
            emitting
            and any(policy.needs_logits(loop) for loop in loops)
            and not policy.reads_hidden
            and policy.kind not in ("none", "fixed")
        ):
            logits = self._exit_logits(items, spans, emitting, h, rows, silent).float()
            silent = []
            if policy.kind == "ensemble":
                logits = self._ensemble(items, emitting, loops, logits)
                scores = logits.softmax(dim=-1).amax(dim=-1)
            elif policy.kind == "confidence":
                scores = signal_scores("confidence", model, loops, logits=logits)
        elif emitting and policy.reads_hidden:
            scores = signal_scores(policy.kind, model, loops, hidden=h[last_rows], previous=entering[last_rows])
        exits = policy.decide(loops, scores).tolist() if emitting else []
        if logits is None and (any(exits) or silent):  # the exit path runs once per token: on the rows leaving now
            leaving = [j for j, leave in enumerate(exits) if leave]
            logits = torch.zeros(len(emitting), model.arch.vocab_size)
            leaving_logits = self._exit_logits(items, spans, [emitting[j] for j in leaving], h, rows, silent)
            if leaving:
                logits[leaving] = leaving_logits.float()
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

    def _exit_logits(
        self, items: list[WorkItem], spans: list[tuple[int, int]], chosen: list[int], h: torch.Tensor, rows: _Rows, silent: list[int]
    ) -> torch.Tensor:
        """Logits [chosen, vocab] of the chosen items' last rows at their loops, through ``model.exit_logits``.

        Without a coda only those rows go to the exit map and the head. With one, the coda runs on
        every row of the chosen items and of the ``silent`` ones (non-emitting chunks leaving now):
        each position's coda keys are written when it leaves the stack (a chosen item that stays is
        rewritten when it leaves later, before any other position can read it).
        """
        loops = [items[i].loop for i in chosen]
        self.head_rows, self.head_steps = self.head_rows + len(chosen), self.head_steps + (1 if chosen else 0)
        if not self.model.coda:
            last = torch.tensor([spans[i][1] - 1 for i in chosen], dtype=torch.long)
            return self.model.exit_logits(h[last], loops)
        run = sorted(set(chosen) | set(silent))
        exit_rows = torch.cat([torch.arange(*spans[i]) for i in run])
        offsets = dict(zip(run, itertools.accumulate([0] + [spans[i][1] - spans[i][0] for i in run]), strict=False))
        attention = self._attention([items[i] for i in run], exit_rows, rows, h.dtype)
        if not chosen:
            self.model.run_depths(self.model.coda, h[exit_rows][None], attention)
            return torch.zeros(0, self.model.arch.vocab_size)
        keep = torch.tensor([offsets[i] + spans[i][1] - spans[i][0] - 1 for i in chosen], dtype=torch.long)
        return self.model.exit_logits(h[exit_rows][None], loops, attention, keep)[0]

    def _keep_for_deeper_loops(self, item: WorkItem, h: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> None:
        """An early-exited chunk: keep its hidden state (propagate) or copy its keys/values deeper (share)."""
        if self.kv_mode == "share":
            for k in range(self.block):
                source = self.first + item.loop * self.block + k
                deeper = [self.first + loop * self.block + k for loop in range(item.loop + 1, self.model.loops)]
                self.pool.copy_depth(blocks, offsets, source, deeper)
            return
        buffer = self.exit_hidden.get(item.request_id)
        if buffer is None or len(buffer) < item.start + item.num_tokens:  # blocks grow with the request, and so does this
            grown = torch.zeros(len(item.blocks) * self.pool.block_size, h.shape[-1], dtype=h.dtype)
            if buffer is not None:
                grown[: len(buffer)] = buffer
            buffer = self.exit_hidden[item.request_id] = grown
        buffer[item.start : item.start + item.num_tokens] = h.to(buffer.dtype)


def _spans(items: list[WorkItem]) -> list[tuple[int, int]]:
    """The query rows (start, end) of every item in the step's packed rows, item-major."""
    ends = list(itertools.accumulate(item.num_tokens for item in items))
    return [(end - item.num_tokens, end) for item, end in zip(items, ends, strict=True)]
