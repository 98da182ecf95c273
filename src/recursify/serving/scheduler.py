"""Which work runs in the next step: CPU bookkeeping that returns a plan and owns no tensors.

Modelled on vLLM v1: ``schedule() -> StepPlan`` picks the work items, a runner executes the plan
on the model, and ``update_from_output(plan, output)`` advances every request. One step runs the
shared block (one loop) once over all items; an item is one request's chunk in flight at its
current loop. Batching policies differ only in *when* new chunks may start (docs/method.md section 7):

- ``depthwise``: every step; a request whose token left the stack starts its next token at once,
  and a freed slot is refilled by a waiting request at the next loop boundary.
- ``sequence``: only at token boundaries: the batch moves through the loops in lock step, and a
  token that exits early leaves its slot idle until the round ends.
- ``static``: only when the whole batch has finished.

KV memory is allocated on demand: before a request starts a chunk it gets the blocks that chunk
needs, one block at a time as its positions grow. When the pool cannot supply them, the newest
running request is preempted (vLLM's policy): its blocks are freed, it goes back to the head of the
queue with its generated tokens, and once re-admitted one prefill recomputes prompt + outputs (a
request preempted mid-token at some loop restarts that token at loop 0). The oldest running request
therefore always progresses, since ``add`` only accepts requests that fit the pool alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from recursify.errors import ConfigError
from recursify.serving.config import BATCHING, KV_MODES
from recursify.serving.exit_policy import oracle_exit_loop
from recursify.serving.kv_cache import BlockAllocator
from recursify.serving.request import Request, RequestStatus


@dataclass(frozen=True)
class WorkItem:
    """One request's chunk at one loop.

    Attributes:
        request_id: whose chunk.
        loop: the loop this step runs for it.
        start: first position of the chunk; it covers ``start .. start + num_tokens - 1``.
        num_tokens: chunk length (a prefill chunk, or 1 for a decode token).
        token_ids: the chunk's tokens (needed at loop 0, where the embedding is the input).
        fill_start: ``propagate`` only: positions ``fill_start .. start - 1`` left the stack before
            this loop and get their keys/values here from their exit hidden states.
        emits: the chunk's last position yields a new token when the chunk leaves the stack.
        blocks: the request's KV blocks.
    """

    request_id: str
    loop: int
    start: int
    num_tokens: int
    token_ids: tuple[int, ...]
    fill_start: int
    emits: bool
    blocks: tuple[int, ...]


@dataclass
class StepPlan:
    """What one engine step runs, plus requests whose runner state can be dropped.

    Attributes:
        admitted: requests that start running (again, after a preemption) in this step.
        released: finished requests: every runner state of theirs can go.
        preempted: requests sent back to the queue: their computed state (hidden states) goes, their
            sampling state stays so that a resumed request draws the same random numbers.
    """

    items: list[WorkItem]
    admitted: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ItemResult:
    """The runner's verdict for one item: did the chunk leave the stack, and with which token."""

    exited: bool
    token: int | None = None
    argmax: int | None = None


@dataclass
class StepEvents:
    """What ``update_from_output`` changed: requests that emitted a token, and requests that finished."""

    emitted: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)


class Scheduler:
    """Queue, admission control (batch slots and KV blocks), preemption and the per-request state machine."""

    def __init__(
        self,
        loops: int,
        batching: str,
        max_batch: int,
        allocator: BlockAllocator,
        kv_mode: str = "propagate",
        max_prefill_chunk: int = 512,
        oracle: bool = False,
    ):
        if batching not in BATCHING:
            raise ConfigError(f"unknown batching {batching!r}; choose one of: {', '.join(BATCHING)}")
        if kv_mode not in KV_MODES:
            raise ConfigError(f"unknown kv_mode {kv_mode!r}; choose one of: {', '.join(KV_MODES)}")
        if max_batch < 1 or max_prefill_chunk < 1:
            raise ConfigError(f"max_batch and max_prefill_chunk must be positive, got {max_batch} and {max_prefill_chunk}")
        self.loops, self.batching, self.max_batch = loops, batching, max_batch
        self.allocator, self.kv_mode, self.max_prefill_chunk, self.oracle = allocator, kv_mode, max_prefill_chunk, oracle
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._released: list[str] = []
        self.preemptions = 0

    # --- queue ------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request; raises ConfigError if it could not fit the KV pool even alone, or repeats an id."""
        if request.request_id in self.requests:
            raise ConfigError(f"duplicate request id {request.request_id!r}")
        if not request.prompt_ids:
            raise ConfigError("a request needs at least one prompt token")
        if request.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        if request.kv_tokens_needed > self.allocator.capacity_tokens:
            raise ConfigError(
                f"request {request.request_id!r} needs {request.kv_tokens_needed} KV positions (prompt + max_new_tokens - 1) "
                f"but the pool holds {self.allocator.capacity_tokens}; raise max_kv_tokens or shorten it"
            )
        request.status, request.filled = RequestStatus.WAITING, [0] * self.loops
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish(self, request_id: str, reason: str) -> Request | None:
        """End a request now (cancellation, stop string); returns it, or None if unknown or already done."""
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return None
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        else:
            self.running.remove(request)
            self.allocator.free(request_id)
        self._released.append(request_id)  # a preempted request waits with runner state (its sampler) too
        request.status, request.finish_reason = RequestStatus.FINISHED, reason
        del self.requests[request_id]
        return request

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- planning ---------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Give running requests the KV blocks of their next chunk (preempting if needed), admit what the policy allows, plan."""
        may_admit = self._may_admit()
        preempted = self._grow_running()
        admitted = self._admit() if may_admit and not preempted else []  # no admissions while memory is short
        items = [self._item(request) for request in self.running if not request.idle]
        released, self._released = self._released, []
        return StepPlan(items=items, admitted=admitted, released=released, preempted=preempted)

    def _may_admit(self) -> bool:
        if self.batching == "depthwise":
            return True
        if self.batching == "sequence":  # a token boundary: no running chunk has started its round yet
            return all(request.loop == 0 and not request.idle for request in self.running)
        return not self.running

    def _grow_running(self) -> list[str]:
        """Blocks for every chunk about to start, oldest request first; preempt the newest while the pool is short."""
        preempted: list[str] = []
        for request in list(self.running):
            if request.status is not RequestStatus.RUNNING or request.idle or request.loop != 0:
                continue  # preempted just now, waiting for its round, or mid-chunk (its blocks exist)
            request.chunk_len = request.next_chunk_len(self.max_prefill_chunk)
            while not self.allocator.can_allocate(request.kv_tokens_in_use, request.request_id):
                victim = self.running[-1]  # the newest: admission order is the list's order
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                request.blocks = self.allocator.allocate(request.request_id, request.kv_tokens_in_use)
        return preempted

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.allocator.free(request.request_id)
        request.preempt()
        self.waiting.appendleft(request)  # newest first, so older preempted requests end up ahead of it
        self.preemptions += 1

    def _admit(self) -> list[str]:
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            request = self.waiting[0]
            chunk = request.next_chunk_len(self.max_prefill_chunk)
            if not self.allocator.can_allocate(chunk):
                break  # first come, first served: later requests do not overtake the head of the queue
            self.waiting.popleft()
            request.status, request.loop, request.chunk_len = RequestStatus.RUNNING, 0, chunk
            request.blocks = self.allocator.allocate(request.request_id, request.kv_tokens_in_use)
            self.running.append(request)
            admitted.append(request.request_id)
        return admitted

    def _item(self, request: Request) -> WorkItem:
        start = request.computed
        tokens = tuple(request.all_ids[start : start + request.chunk_len]) if request.loop == 0 else ()
        fill_start = min(request.filled[request.loop], start) if self.kv_mode == "propagate" else start
        return WorkItem(
            request_id=request.request_id,
            loop=request.loop,
            start=start,
            num_tokens=request.chunk_len,
            token_ids=tokens,
            fill_start=fill_start,
            emits=request.chunk_emits(),
            blocks=request.blocks,
        )

    # --- advancing --------------------------------------------------------------------------

    def update_from_output(self, plan: StepPlan, results: dict[str, ItemResult]) -> StepEvents:
        """Advance every planned request by its result; requests finished meanwhile are skipped."""
        events = StepEvents()
        for item in plan.items:
            request = self.requests.get(item.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            result = results[item.request_id]
            end = item.start + item.num_tokens
            request.filled[item.loop] = end
            if item.emits and result.argmax is not None and self.oracle:
                request.argmax_per_loop.append(result.argmax)
            if not result.exited:
                if item.loop + 1 >= self.loops:
                    raise ConfigError(f"request {item.request_id!r} did not exit at the last loop")
                request.loop += 1
                continue
            if self.kv_mode == "share":  # the runner copied this loop's keys/values to every deeper loop
                for deeper in range(item.loop + 1, self.loops):
                    request.filled[deeper] = end
            request.computed, request.loop, request.chunk_len = end, 0, 0
            request.idle = self.batching != "depthwise"
            if item.emits:
                self._emit(request, item, result, events)
        self._end_round_if_done()
        return events

    def _emit(self, request: Request, item: WorkItem, result: ItemResult, events: StepEvents) -> None:
        if result.token is None:
            raise ConfigError(f"request {item.request_id!r} exited an emitting chunk without a token")
        request.output_ids.append(result.token)
        request.loops_run.append(item.loop + 1)
        if self.oracle and request.argmax_per_loop:
            request.oracle_loops.append(oracle_exit_loop(request.argmax_per_loop) + 1)
        request.argmax_per_loop = []
        events.emitted.append(request)
        if result.token in request.stop_token_ids:
            reason = "stop"
        elif len(request.output_ids) >= request.max_new_tokens:
            reason = "length"
        else:
            return
        finished = self.finish(request.request_id, reason)
        assert finished is not None
        events.finished.append(finished)

    def _end_round_if_done(self) -> None:
        """Lock-step batching: once no running chunk is still inside the stack, the next round starts at loop 0."""
        if self.batching == "depthwise" or not all(request.idle for request in self.running):
            return
        for request in self.running:
            request.idle = False
