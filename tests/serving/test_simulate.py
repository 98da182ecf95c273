"""The hypothetical-throughput simulator against hand-counted schedules (unit step cost, no head cost)."""

from __future__ import annotations

import pytest

from recursify.serving.simulate import StepCosts, simulate_throughput

UNIT = StepCosts(batch_sizes=[1, 2, 4], loop_s=[1.0, 1.0, 1.0], head_s=[0.0, 0.0, 0.0])


def test_no_exits_every_token_costs_all_loops() -> None:
    # two requests of 2 tokens, 3 loops, both in the batch: 2 tokens x 3 steps each = 6 steps for 4 tokens
    for batching in ("static", "sequence", "depthwise"):
        assert simulate_throughput(UNIT, 3, [2, 2], None, batching, 2, False) == pytest.approx(4 / 6)


def test_depthwise_turns_early_exits_into_throughput_lock_step_does_not() -> None:
    trajectory = [1, 3]  # alternate: one token exits after loop 1, the next needs all 3 loops
    depthwise = simulate_throughput(UNIT, 3, [4, 4], trajectory, "depthwise", 2, False)
    sequence = simulate_throughput(UNIT, 3, [4, 4], trajectory, "sequence", 2, False)
    # lock step: every round waits for its slowest token (3 steps whenever a 3-loop token is in it)
    assert sequence == pytest.approx(8 / 12)
    assert depthwise > sequence
    # depth-wise: each request needs 1 + 3 + 1 + 3 loop-steps for 4 tokens, both run side by side: 8 steps
    assert depthwise == pytest.approx(8 / 8)


def test_static_waits_for_the_whole_batch() -> None:
    # batch of 2 with lengths 1 and 3 (3 loops): static runs 3 tokens x 3 steps before admitting the third request
    static = simulate_throughput(UNIT, 3, [1, 3, 3], None, "static", 2, False)
    sequence = simulate_throughput(UNIT, 3, [1, 3, 3], None, "sequence", 2, False)
    assert static == pytest.approx(7 / 18)
    assert sequence == pytest.approx(7 / 12)
