"""Per-loop exit metrics and oracle exits.

References: exits recomputed from the hidden states after each loop end (``model.head``), KL and
agreement computed by hand with torch, and a brute-force oracle over random argmax tables.
"""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import recursify
from recursify.evaluation.exits import ExitAccumulator, oracle_exit_loops
from recursify.evaluation.perplexity import evaluate_perplexity
from recursify.modeling.model import RecursiveModel
from tiny import tiny_model

TOKENS = 41  # one window of 40 targets with ctx >= 40


@cache
def _model(loops: int, seed: int = 2) -> RecursiveModel:
    return recursify.convert(tiny_model("qwen2", seed=seed), loops=loops, init="average", rank=4, progress=False)


def _stream(seed: int) -> torch.Tensor:
    return torch.randint(3, 97, (TOKENS,), generator=torch.Generator().manual_seed(seed))


def _exit_logits(model: RecursiveModel, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Reference exits: the head applied to the residual stream after every loop's last depth."""
    with torch.no_grad():
        hidden = model(tokens[None, :-1], output_hidden_states=True).hidden_states
        assert hidden is not None
        return [model.head(hidden[depth + 1])[0] for depth in sorted(model.exit_depths)]


def test_loops_1_per_loop_equals_the_final_numbers() -> None:
    model = _model(1)
    tokens = _stream(1)
    result = evaluate_perplexity(model, tokens, ctx=64, per_loop=True, progress=False)
    plain = evaluate_perplexity(model, tokens, ctx=64, progress=False)
    assert result.per_loop is not None and result.oracle is not None
    [only] = result.per_loop
    assert only.loop == 1 and only.agree_final == 1.0
    assert only.ppl == pytest.approx(result.value, rel=1e-6) and result.value == pytest.approx(plain.value, rel=1e-6)
    assert result.oracle.histogram == [TOKENS - 1] and result.oracle.mean_loops == 1.0
    assert only.kl_teacher is None and only.agree_teacher is None


def test_per_loop_metrics_equal_a_hand_computation_from_hidden_states() -> None:
    model, teacher = _model(3), _model(1, seed=9)
    tokens = _stream(2)
    result = evaluate_perplexity(model, tokens, ctx=64, teacher=teacher, progress=False)
    exits = _exit_logits(model, tokens)
    targets = tokens[1:]
    with torch.no_grad():
        teacher_logp = teacher(tokens[None, :-1]).logits[0].log_softmax(-1)
    assert result.per_loop is not None and len(result.per_loop) == 3
    for entry, logits in zip(result.per_loop, exits, strict=True):
        logp = logits.log_softmax(-1)
        ce = torch.nn.functional.cross_entropy(logits, targets)
        kl = torch.nn.functional.kl_div(logp, teacher_logp, log_target=True, reduction="batchmean")
        assert entry.ppl == pytest.approx(math.exp(float(ce)), rel=1e-5)
        assert entry.agree_final == pytest.approx(float((logits.argmax(-1) == exits[-1].argmax(-1)).float().mean()))
        assert entry.kl_teacher == pytest.approx(float(kl), rel=1e-4)
        assert entry.agree_teacher == pytest.approx(float((logits.argmax(-1) == teacher_logp.argmax(-1)).float().mean()))
    assert result.per_loop[-1].ppl == pytest.approx(result.value, rel=1e-9)
    assert result.per_loop[-1].agree_final == 1.0


def test_teacher_equal_to_the_model_has_zero_kl() -> None:
    model = _model(1)
    result = evaluate_perplexity(model, _stream(3), ctx=16, stride=8, teacher=model, progress=False)
    assert result.per_loop is not None
    assert result.per_loop[0].kl_teacher == pytest.approx(0.0, abs=1e-5) and result.per_loop[0].agree_teacher == 1.0


def test_oracle_exits_are_consistent_with_argmax_agreement() -> None:
    model = _model(3)
    tokens = _stream(4)
    result = evaluate_perplexity(model, tokens, ctx=64, per_loop=True, progress=False)
    assert result.per_loop is not None and result.oracle is not None
    histogram = result.oracle.histogram
    assert len(histogram) == 3 and sum(histogram) == TOKENS - 1
    exits = torch.stack([logits.argmax(-1) for logits in _exit_logits(model, tokens)])
    expected = [0, 0, 0]
    for column in exits.T.tolist():
        expected[next(b for b in range(3) if column[b] == column[-1])] += 1
    assert histogram == expected
    # tokens agreeing with the final loop at loop b have an oracle exit <= b; the first loop's agreements are exactly its exits
    n = TOKENS - 1
    assert histogram[0] == round(result.per_loop[0].agree_final * n)
    for b in range(3):
        assert sum(histogram[: b + 1]) >= round(result.per_loop[b].agree_final * n)
    assert result.oracle.mean_loops == pytest.approx(sum((b + 1) * c for b, c in enumerate(histogram)) / n)
    assert 1.0 <= result.oracle.mean_loops <= 3.0


@settings(max_examples=100, deadline=None)
@given(loops=st.integers(1, 5), tokens=st.integers(1, 30), vocab=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_oracle_exit_is_the_first_loop_that_agrees(loops: int, tokens: int, vocab: int, seed: int) -> None:
    argmax = torch.randint(0, vocab, (loops, tokens), generator=torch.Generator().manual_seed(seed))
    exits = oracle_exit_loops(argmax)
    for column, exit_loop in zip(argmax.T.tolist(), exits.tolist(), strict=True):
        assert exit_loop == 1 + next(b for b in range(loops) if column[b] == column[-1])
        assert 1 <= exit_loop <= loops


def test_accumulator_rejects_mismatched_inputs() -> None:
    accumulator = ExitAccumulator(2)
    logits = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="exits"):
        accumulator.update([logits], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher"):
        accumulator.update([logits, logits], torch.zeros(3, dtype=torch.long), teacher_logits=logits)
