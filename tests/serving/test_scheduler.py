"""The scheduler alone, driven by fabricated model outputs: no request lost or duplicated, policies respected."""

from __future__ import annotations

import random

import pytest

from recursify.errors import ConfigError
from recursify.serving.kv_cache import BlockAllocator
from recursify.serving.request import Request
from recursify.serving.scheduler import ItemResult, Scheduler

LOOPS = 3


@pytest.mark.parametrize("batching", ["depthwise", "sequence", "static"])
@pytest.mark.parametrize("kv_mode", ["propagate", "share"])
def test_thousand_random_requests_with_cancellations(batching: str, kv_mode: str) -> None:
    _thousand_random_requests(batching, kv_mode, num_blocks=40)


@pytest.mark.parametrize("batching", ["depthwise", "sequence", "static"])
def test_thousand_random_requests_in_a_pool_that_forces_preemption(batching: str) -> None:
    """8 blocks of 4 for 6 running requests of up to 17 positions: preempted over and over, yet none lost or duplicated."""
    assert _thousand_random_requests(batching, "propagate", num_blocks=8) > 100


def _thousand_random_requests(batching: str, kv_mode: str, num_blocks: int) -> int:
    """Random arrivals, exits and cancellations against fabricated outputs; returns the preemptions seen."""
    rng = random.Random(f"{batching}-{kv_mode}")
    allocator = BlockAllocator(num_blocks=num_blocks, block_size=4)
    scheduler = Scheduler(LOOPS, batching, max_batch=6, allocator=allocator, kv_mode=kv_mode, max_prefill_chunk=5)
    pending = [
        Request(f"r{i}", [rng.randrange(100) for _ in range(rng.randint(1, 12))], rng.randint(1, 6), stop_token_ids=frozenset({0}))
        for i in range(1000)
    ]
    emitted: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    while pending or scheduler.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if pending:
                scheduler.add(pending.pop(0))
        if rng.random() < 0.05 and scheduler.requests:
            victim = rng.choice(list(scheduler.requests))
            request = scheduler.finish(victim, "cancelled")
            assert request is not None and victim not in finished
            finished[victim] = "cancelled"
        plan = scheduler.schedule()
        assert len(scheduler.running) <= 6
        assert len({item.request_id for item in plan.items}) == len(plan.items)
        held = [block for request in scheduler.running for block in request.blocks]
        assert len(held) == len(set(held)) == allocator.used_blocks, "running requests own every used block, none shared"
        assert not set(plan.preempted) & {item.request_id for item in plan.items}
        if batching != "depthwise":
            assert len({item.loop for item in plan.items}) <= 1, "lock-step batching runs one loop at a time"
        if batching == "static" and plan.admitted:
            assert set(plan.admitted) == {r.request_id for r in scheduler.running}
        results = {}
        for item in plan.items:
            assert item.fill_start <= item.start
            assert len(item.blocks) * 4 >= item.start + item.num_tokens, "the chunk in flight has its blocks"
            if item.loop == 0:
                assert len(item.token_ids) == item.num_tokens
            exited = item.loop == LOOPS - 1 or (item.emits and rng.random() < 0.3)
            token = rng.randrange(100) if exited and item.emits else None
            results[item.request_id] = ItemResult(exited=exited, token=token)
        if rng.random() < 0.03 and plan.items:  # cancelled after planning: its result must be ignored
            victim = plan.items[0].request_id
            assert scheduler.finish(victim, "cancelled") is not None
            finished[victim] = "cancelled"
        events = scheduler.update_from_output(plan, results)
        for request in events.emitted:
            assert request.request_id not in finished
            emitted.setdefault(request.request_id, []).append(request.output_ids[-1])
        for request in events.finished:
            assert request.request_id not in finished
            finished[request.request_id] = request.finish_reason or ""
            assert request.output_ids == emitted[request.request_id]
            assert len(request.output_ids) == request.max_new_tokens or request.output_ids[-1] == 0
    assert len(finished) == 1000
    assert sum(reason == "cancelled" for reason in finished.values()) > 20
    assert allocator.used_blocks == 0 and allocator.reserved_tokens == 0 and not allocator.owners()
    return scheduler.preemptions


def test_depthwise_refills_freed_slots_at_loop_boundaries_sequence_waits_for_tokens() -> None:
    def admitted_steps(batching: str) -> list[int]:
        scheduler = Scheduler(LOOPS, batching, max_batch=1, allocator=BlockAllocator(8, 4))
        scheduler.add(Request("a", [1, 2], max_new_tokens=1))
        scheduler.add(Request("b", [3], max_new_tokens=1))
        steps = []
        for step in range(20):
            plan = scheduler.schedule()
            if plan.admitted:
                steps.append(step)
            results = {i.request_id: ItemResult(exited=i.loop == 1 or i.loop == LOOPS - 1, token=5) for i in plan.items}
            scheduler.update_from_output(plan, results)
        return steps

    # "a" exits after loop 1 at step 1; depth-wise admits "b" at step 2 as well, which is the next step in both cases,
    # but with a batch of one both policies must wait for the slot to free: same schedule here
    assert admitted_steps("depthwise") == admitted_steps("sequence") == [0, 2]


def test_sequence_batch_idles_exited_tokens_until_the_round_ends() -> None:
    scheduler = Scheduler(LOOPS, "sequence", max_batch=2, allocator=BlockAllocator(8, 4))
    scheduler.add(Request("fast", [1], max_new_tokens=3))
    scheduler.add(Request("slow", [2], max_new_tokens=3))
    items_per_step = []
    for _ in range(6):
        plan = scheduler.schedule()
        items_per_step.append(sorted(item.request_id for item in plan.items))
        results = {i.request_id: ItemResult(exited=i.request_id == "fast" or i.loop == LOOPS - 1, token=7) for i in plan.items}
        scheduler.update_from_output(plan, results)
    assert items_per_step[:3] == [["fast", "slow"], ["slow"], ["slow"]]
    assert items_per_step[3] == ["fast", "slow"]


def test_depthwise_exited_token_starts_its_next_token_at_once() -> None:
    scheduler = Scheduler(LOOPS, "depthwise", max_batch=2, allocator=BlockAllocator(8, 4))
    scheduler.add(Request("fast", [1], max_new_tokens=3))
    scheduler.add(Request("slow", [2], max_new_tokens=3))
    loops = []
    for _ in range(3):
        plan = scheduler.schedule()
        loops.append({i.request_id: i.loop for i in plan.items})
        results = {i.request_id: ItemResult(exited=i.request_id == "fast" or i.loop == LOOPS - 1, token=7) for i in plan.items}
        scheduler.update_from_output(plan, results)
    assert loops == [{"fast": 0, "slow": 0}, {"fast": 0, "slow": 1}, {"fast": 0, "slow": 2}]
    assert "fast" not in scheduler.requests  # three tokens in three steps, while "slow" still works on its first


def test_propagate_plans_fills_for_positions_that_exited_before_a_loop() -> None:
    scheduler = Scheduler(LOOPS, "depthwise", max_batch=1, allocator=BlockAllocator(8, 4), kv_mode="propagate")
    scheduler.add(Request("r", [1, 2, 3], max_new_tokens=4))
    plans = []
    exit_at = {3: 0, 4: 0, 5: 2}  # position of the chunk start -> loop it exits at (prompt runs all loops)
    for _ in range(8):
        plan = scheduler.schedule()
        item = plan.items[0]
        plans.append((item.start, item.loop, item.fill_start))
        exited = item.loop == exit_at.get(item.start, LOOPS - 1)
        scheduler.update_from_output(plan, {"r": ItemResult(exited=exited, token=9)})
    # positions 3 and 4 exit at loop 0; position 5 runs loops 1 and 2 and first fills them for positions 3 and 4
    assert plans == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (3, 0, 3), (4, 0, 4), (5, 0, 5), (5, 1, 3), (5, 2, 3)]
    assert not scheduler.has_unfinished()


def test_request_validation_and_admission_limits() -> None:
    scheduler = Scheduler(LOOPS, "depthwise", max_batch=4, allocator=BlockAllocator(2, 4))
    with pytest.raises(ConfigError, match="KV positions"):
        scheduler.add(Request("big", [1] * 8, max_new_tokens=2))  # 9 positions could never fit the 8 of the pool
    with pytest.raises(ConfigError, match="max_new_tokens"):
        scheduler.add(Request("none", [1], max_new_tokens=0))
    scheduler.add(Request("a", [1] * 4, max_new_tokens=2))  # at most 5 positions: one block for its prompt, a second later
    scheduler.add(Request("b", [1], max_new_tokens=1))
    scheduler.add(Request("c", [1], max_new_tokens=1))
    with pytest.raises(ConfigError, match="duplicate"):
        scheduler.add(Request("a", [1], max_new_tokens=1))
    # blocks are allocated as requests grow, not for prompt + max_new_tokens up front: "a" and "b" fit now, "c" waits
    assert scheduler.schedule().admitted == ["a", "b"]
    assert scheduler.requests["a"].blocks != scheduler.requests["b"].blocks and len(scheduler.requests["a"].blocks) == 1
    scheduler.finish("a", "cancelled")
    assert scheduler.schedule().admitted == ["c"]
    with pytest.raises(ConfigError, match="batching"):
        Scheduler(LOOPS, "greedy", 1, BlockAllocator(1, 1))


def _run_to_exit(scheduler: Scheduler, token: int = 7) -> list[str]:
    """Run the running requests through all loops (no early exit); returns the ids preempted meanwhile."""
    preempted = []
    for _ in range(LOOPS):
        plan = scheduler.schedule()
        preempted += plan.preempted
        scheduler.update_from_output(plan, {i.request_id: ItemResult(exited=i.loop == LOOPS - 1, token=token) for i in plan.items})
    return preempted


def test_pool_shortage_preempts_the_newest_which_resumes_at_the_head_with_its_tokens() -> None:
    allocator = BlockAllocator(2, 4)
    scheduler = Scheduler(LOOPS, "depthwise", max_batch=4, allocator=allocator)
    scheduler.add(Request("old", [1] * 4, max_new_tokens=2))
    scheduler.add(Request("new", [2], max_new_tokens=3))
    assert _run_to_exit(scheduler) == []  # both prefill and emit their first token, one block each
    assert scheduler.requests["new"].output_ids == [7]
    scheduler.add(Request("later", [3], max_new_tokens=1))
    plan = scheduler.schedule()  # "old" needs position 4, a second block: "new" (the newest) gives its block back
    assert plan.preempted == ["new"] and plan.admitted == [] and [i.request_id for i in plan.items] == ["old"]
    assert [r.request_id for r in scheduler.waiting] == ["new", "later"]  # back at the head of the queue
    preempted = scheduler.requests["new"]
    assert preempted.blocks == () and preempted.computed == 0 and preempted.output_ids == [7] and preempted.preemptions == 1
    assert allocator.owners() == ["old"] and len(scheduler.requests["old"].blocks) == 2
    scheduler.update_from_output(plan, {"old": ItemResult(exited=False)})
    for _ in range(LOOPS - 1):
        plan = scheduler.schedule()
        scheduler.update_from_output(plan, {i.request_id: ItemResult(exited=i.loop == LOOPS - 1, token=8) for i in plan.items})
    assert "old" not in scheduler.requests and allocator.used_blocks == 0
    plan = scheduler.schedule()
    assert plan.admitted == ["new", "later"]
    resumed = next(item for item in plan.items if item.request_id == "new")
    assert (resumed.start, resumed.loop, resumed.token_ids, resumed.emits) == (0, 0, (2, 7), True)  # recompute prompt + output


def test_preempted_mid_token_restarts_that_token_at_loop_zero() -> None:
    scheduler = Scheduler(LOOPS, "depthwise", max_batch=2, allocator=BlockAllocator(2, 4))
    scheduler.add(Request("old", [1] * 4, max_new_tokens=3))
    plan = scheduler.schedule()
    scheduler.update_from_output(plan, {"old": ItemResult(exited=False)})
    scheduler.add(Request("new", [2] * 4, max_new_tokens=1))  # admitted while "old" is at loop 1
    for _ in range(2):  # "old" emits its first token at loop 2; "new" reaches loop 1
        plan = scheduler.schedule()
        scheduler.update_from_output(plan, {i.request_id: ItemResult(exited=i.loop == LOOPS - 1, token=5) for i in plan.items})
    assert scheduler.requests["new"].loop == 2
    plan = scheduler.schedule()  # "old" starts its second token at position 4: a second block, taken from "new"
    assert plan.preempted == ["new"] and scheduler.requests["new"].loop == 0 and scheduler.requests["new"].filled == [0, 0, 0]


def test_block_allocator_accounting() -> None:
    allocator = BlockAllocator(5, 4)
    blocks = allocator.allocate("x", 9)
    assert len(blocks) == 3 and allocator.used_blocks == 3 and allocator.reserved_tokens == 9
    assert allocator.can_allocate(8) and not allocator.can_allocate(9)
    with pytest.raises(ConfigError, match="exhausted"):
        allocator.allocate("y", 12)
    assert allocator.allocate("x", 12) == blocks and allocator.can_allocate(17, "x") and not allocator.can_allocate(21, "x")
    grown = allocator.allocate("x", 13)  # a table only grows, keeping its blocks in order
    assert grown[:3] == blocks and len(grown) == 4 and allocator.reserved_tokens == 13
    allocator.free("x")
    allocator.free("x")
    assert allocator.used_blocks == 0 and allocator.reserved_tokens == 0
