"""Exit rules: parsing, per-loop thresholds against closed forms (softmax, relative change), forced exits, oracle,
what each signal needs, calibrated agreement thresholds and the fixed-sequence search against brute force."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recursify.errors import ConfigError
from recursify.modeling.exit_addons import ExitAddons
from recursify.modeling.exit_gates import ExitGates
from recursify.serving.exit_policy import fixed_sequence_index, oracle_exit_loop, parse_exit_policy, signal_scores


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


def _addons(**fields: object) -> ExitAddons:
    return ExitAddons(**fields)  # type: ignore[arg-type]


def test_signal_specs_and_what_they_need() -> None:
    assert parse_exit_policy("saturation:0.05", 3).thresholds == (0.05, 0.05)
    gates = ExitGates(hidden=4, loops=3, width=0)
    assert parse_exit_policy("gate:0.8,0.9", 3, _addons(gates=gates)).thresholds == (0.8, 0.9)
    assert parse_exit_policy("ensemble:0.5", 3, _addons(ensemble=torch.eye(2))).kind == "ensemble"
    with pytest.raises(ConfigError, match="train-exits"):
        parse_exit_policy("gate:0.9", 3)
    with pytest.raises(ConfigError, match="--exit-ensemble"):
        parse_exit_policy("ensemble:0.9", 3, _addons())
    with pytest.raises(ConfigError, match="calibrated checkpoint"):
        parse_exit_policy("agreement:0.95", 3, _addons())
    for bad in ("saturation:-1", "saturation:x", "gate:1.5", "agreement:1.5", "agreement:x", "agreement:0.9:nope"):
        with pytest.raises(ConfigError):
            parse_exit_policy(bad, 3, _addons(gates=gates, calibration={"signals": {}}))


def test_gate_and_saturation_need_no_head_before_deciding() -> None:
    for spec in ("saturation:0.1", "gate:0.5"):
        policy = parse_exit_policy(spec, 3, _addons(gates=ExitGates(4, 3, 0)))
        assert [policy.needs_logits(loop) for loop in range(3)] == [False, False, True]
        assert policy.reads_hidden
    assert [parse_exit_policy("confidence:0.5", 3).needs_logits(loop) for loop in range(3)] == [True, True, True]


def test_saturation_exits_when_the_state_stops_moving() -> None:
    previous = torch.tensor([[3.0, 4.0], [3.0, 4.0], [3.0, 4.0]])
    hidden = torch.tensor([[3.0, 4.5], [3.0, 4.05], [9.0, 9.0]])  # relative changes 0.1, 0.01, large
    policy = parse_exit_policy("saturation:0.05,0.2", 3)
    scores = signal_scores("saturation", None, [0, 0, 1], hidden=hidden, previous=previous)  # type: ignore[arg-type]
    assert scores.tolist() == pytest.approx([0.1, 0.01, math.hypot(6, 5) / 5], rel=1e-5)
    assert policy.decide([0, 0, 1], scores).tolist() == [False, True, False]
    assert policy.decide([1, 2], torch.tensor([0.1, 9.0])).tolist() == [True, True]  # loop 1's threshold is 0.2; the last loop exits


def test_agreement_resolves_calibrated_thresholds() -> None:
    curve = {"thresholds": [1.0, 0.9, 0.8, 0.7, 0.6], "agreement": [1.0, 0.99, 0.96, 0.94, 0.97], "mean_loops": [3, 2.8, 2.5, 2.2, 2.0]}
    addons = _addons(gates=ExitGates(4, 3, 0), calibration={"signals": {"gate": curve, "saturation": curve}})
    policy = parse_exit_policy("agreement:0.95", 3, addons)
    assert policy.kind == "gate" and policy.thresholds == (0.8, 0.8) and policy.target == 0.95  # 0.6 meets 0.95 again: never reached
    assert policy.expected == {"agreement": 0.96, "mean_loops": 2.5}
    assert parse_exit_policy("agreement:0.99:saturation", 3, addons).thresholds == (0.9, 0.9)
    assert parse_exit_policy("agreement:1", 3, addons).thresholds == (1.0, 1.0)  # 1.0 = never exit early
    with pytest.raises(ConfigError, match="no 'confidence' curve"):
        parse_exit_policy("agreement:0.9:confidence", 3, addons)


@settings(max_examples=200, deadline=None)
@given(agreements=st.lists(st.floats(0, 1), min_size=1, max_size=12), target=st.floats(0, 1))
def test_fixed_sequence_search_against_brute_force(agreements: list[float], target: float) -> None:
    agreements = [1.0, *agreements]  # the first candidate is "never exit early"
    passing_prefix = [i for i in range(len(agreements)) if all(a >= target for a in agreements[: i + 1])]
    assert fixed_sequence_index(agreements, target) == max(passing_prefix)
