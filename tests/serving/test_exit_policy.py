"""Exit rules: parsing, per-loop confidence thresholds against a closed-form softmax, forced exits, oracle."""

from __future__ import annotations

import math

import pytest
import torch

from recursify.errors import ConfigError
from recursify.serving.exit_policy import oracle_exit_loop, parse_exit_policy


def test_parse_specs() -> None:
    assert parse_exit_policy("confidence:0.9", 3).thresholds == (0.9, 0.9)
    assert parse_exit_policy("confidence:0.5,0.8", 3).thresholds == (0.5, 0.8)
    assert parse_exit_policy("fixed:2", 3).fixed_loops == 2
    assert parse_exit_policy("oracle", 3).spec == "oracle"
    for bad in ("confidence:", "confidence:1.5", "confidence:0.5,0.6,0.7", "fixed:0", "fixed:4", "fixed:x", "none:1", "greedy"):
        with pytest.raises(ConfigError):
            parse_exit_policy(bad, 3)


def test_confidence_uses_each_loops_threshold() -> None:
    # two-token logits (a, 0): max softmax prob = sigmoid(a), a closed form
    logits = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0], [0.0, 0.0]])  # confidences 0.75, 0.75, 0.5
    policy = parse_exit_policy("confidence:0.7,0.8", 3)
    scores = torch.softmax(logits, -1).amax(-1)
    assert policy.decide([0, 1, 2], scores).tolist() == [True, False, True]  # the last loop always exits
    assert parse_exit_policy("confidence:1.0", 3).decide([0], torch.ones(1)).tolist() == [False]


def test_fixed_and_none_need_logits_only_where_they_exit() -> None:
    fixed = parse_exit_policy("fixed:2", 3)
    assert [fixed.needs_logits(loop) for loop in range(3)] == [False, True, False]
    assert fixed.decide([1, 0], None).tolist() == [True, False]
    none = parse_exit_policy("none", 3)
    assert [none.needs_logits(loop) for loop in range(3)] == [False, False, True]
    assert all(parse_exit_policy("oracle", 3).needs_logits(loop) for loop in range(3))


def test_oracle_exit_loop() -> None:
    assert oracle_exit_loop([4, 7, 7]) == 1
    assert oracle_exit_loop([7, 4, 7]) == 0
    assert oracle_exit_loop([1, 2, 3]) == 2
