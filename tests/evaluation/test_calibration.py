"""Agreement calibration: exit loops and curves against brute force, the chosen threshold meets its target on the
calibration data, and the collected signals against the model's own hidden states and logits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import recursify
from recursify.evaluation.calibration import ExitData, agreement_curve, calibration_report, collect_exit_data, exit_loops
from recursify.serving.exit_policy import fixed_sequence_index
from tiny import tiny_model


def _data(seed: int, positions: int = 60, loops: int = 3) -> ExitData:
    """Random signals; exits agree with the final token more often when confident / saturated (as real ones do)."""
    generator = torch.Generator().manual_seed(seed)
    confidence = torch.rand(positions, loops - 1, generator=generator)
    change = torch.rand(positions, loops - 1, generator=generator)
    final = torch.randint(0, 5, (positions, 1), generator=generator)
    right = torch.rand(positions, loops - 1, generator=generator) < confidence
    wrong = (final + 1) % 5
    tokens = torch.cat([torch.where(right, final, wrong), final], dim=1)
    return ExitData(
        exit_tokens=tokens,
        scores={"confidence": confidence, "saturation": change},
        signal_tokens={"confidence": tokens[:, :-1], "saturation": tokens[:, :-1]},
    )


def test_exit_loops_by_hand() -> None:
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.1, 0.2]])
    assert exit_loops("confidence", scores, torch.tensor([0.5, 0.5])).tolist() == [0, 1, 2]
    assert exit_loops("saturation", scores, torch.tensor([0.15, 0.15])).tolist() == [1, 2, 0]
    many = exit_loops("confidence", scores, torch.tensor([[0.5, 0.5], [0.05, 0.05]]))
    assert many.tolist() == [[0, 1, 2], [0, 0, 0]]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), signal=st.sampled_from(["confidence", "saturation"]))
def test_curve_against_brute_force(seed: int, signal: str) -> None:
    data = _data(seed)
    curve = agreement_curve(data, signal, candidates=17)
    scores, agrees = data.scores[signal].tolist(), data.agrees(signal).tolist()
    assert curve["agreement"][0] == 1.0 and curve["mean_loops"][0] == 3.0  # first: never exit early
    for threshold, agreement, mean_loops in zip(curve["thresholds"], curve["agreement"], curve["mean_loops"], strict=True):
        same, loops_run = 0, 0
        for row_scores, row_agrees in zip(scores, agrees, strict=True):
            leave = next(
                (b for b, s in enumerate(row_scores) if (s < threshold if signal == "saturation" else s >= threshold and threshold < 1.0)),
                2,
            )
            same += leave == 2 or row_agrees[leave]
            loops_run += leave + 1
        assert agreement == pytest.approx(same / len(scores))
        assert mean_loops == pytest.approx(loops_run / len(scores))
    order = curve["thresholds"]  # strict to loose
    assert order == (sorted(order) if signal == "saturation" else sorted(order, reverse=True))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), target=st.floats(0.5, 1.0))
def test_chosen_threshold_meets_the_target_on_the_calibration_data(seed: int, target: float) -> None:
    data = _data(seed, positions=200)
    curve = agreement_curve(data, "confidence")
    threshold = curve["thresholds"][fixed_sequence_index(curve["agreement"], target)]
    leave = exit_loops("confidence", data.scores["confidence"], torch.tensor([threshold, threshold]))
    agrees = torch.cat([data.agrees("confidence"), torch.ones(200, 1, dtype=torch.bool)], dim=1)
    assert float(agrees.gather(1, leave[:, None]).float().mean()) >= target


def test_collected_signals_match_the_models_states_and_logits() -> None:
    model = recursify.convert(tiny_model("qwen2", seed=6), loops=3, init="average", rank=4, progress=False).eval()
    tokens = torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(1))
    data = collect_exit_data(model, tokens, window=16, features=True)
    assert data.positions == 40 and data.features is not None and data.features.shape == (40, 2, model.arch.hidden_size + 1)
    with torch.no_grad():
        out = model(tokens[None], output_hidden_states=True, output_exits=True)
    assert out.hidden_states is not None and out.exit_logits is not None
    for b in range(2):  # windows of 16 do not see across their borders: compare the first window only
        end, entering = out.hidden_states[model.exit_depths[b] + 1][0], out.hidden_states[(model.exit_depths[b - 1] + 1) if b else 0][0]
        change = (end - entering).norm(dim=-1) / entering.norm(dim=-1)
        torch.testing.assert_close(data.scores["saturation"][:16, b], change[:16])
        torch.testing.assert_close(data.scores["confidence"][:16, b], out.exit_logits[b][0, :16].softmax(-1).amax(-1))
    assert torch.equal(data.exit_tokens[:16, -1], out.logits[0, :16].argmax(-1))
    report = calibration_report(data, {"data": "test"})
    assert report["data"] == "test" and set(report["signals"]) == {"confidence", "saturation"}
    assert report["per_loop_agreement"][-1] == 1.0
    assert report["at_targets"]["confidence"]["0.95"]["agreement"] >= 0.95
