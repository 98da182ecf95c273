"""Each loss against a direct float64 reference; exit weights against their closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from recursify.errors import ConfigError
from recursify.training.config import KD_KINDS, LossConfig
from recursify.training.losses import exit_loss_weights, kd_divergence, next_token_ce, top_k_targets, uptrain_loss


def _logits(seed: int, shape=(2, 5, 11)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2


def _reference_divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> float:
    """Position by position, probability by probability, in float64."""
    total, positions = 0.0, 0
    for s_row, t_row in zip(student.double().reshape(-1, student.shape[-1]), teacher.double().reshape(-1, teacher.shape[-1]), strict=True):
        q = [math.exp(v / temperature) for v in s_row.tolist()]
        p = [math.exp(v / temperature) for v in t_row.tolist()]
        q = [v / sum(q) for v in q]
        p = [v / sum(p) for v in p]
        m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]

        def kl(a: list[float], b: list[float]) -> float:
            return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True))

        value = {"forward-kl": kl(p, q), "reverse-kl": kl(q, p), "jsd": 0.5 * kl(p, m) + 0.5 * kl(q, m)}.get(
            kind, 0.5 * sum(abs(x - y) for x, y in zip(p, q, strict=True))
        )
        total += value
        positions += 1
    return total / positions * temperature**2


def test_next_token_ce_matches_reference() -> None:
    logits = _logits(0)
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = []
    for b in range(2):
        for t in range(4):
            row = logits[b, t].double()
            expected.append(-(row[ids[b, t + 1]] - torch.logsumexp(row, 0)).item())
    assert next_token_ce(logits, ids).item() == pytest.approx(sum(expected) / len(expected), rel=1e-6)


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_divergences_match_reference(kind: str, temperature: float) -> None:
    student, teacher = _logits(2), _logits(3)
    value = kd_divergence(student, teacher, kind, temperature).item()
    assert value == pytest.approx(_reference_divergence(student, teacher, kind, temperature), rel=1e-5, abs=1e-7)
    assert value > 0


@pytest.mark.parametrize("kind", KD_KINDS)
def test_kd_is_zero_when_student_equals_teacher(kind: str) -> None:
    logits = _logits(4)
    assert kd_divergence(logits, logits.clone(), kind).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sparse_kd_at_k_vocab_is_full_kd(kind: str, temperature: float) -> None:
    student, teacher = _logits(5), _logits(6)
    sparse = kd_divergence(student, top_k_targets(teacher, 11, temperature), kind, temperature).item()
    assert sparse == pytest.approx(kd_divergence(student, teacher, kind, temperature).item(), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_sparse_kd_is_the_kl_of_the_coarsened_distributions(k: int) -> None:
    """Top-k tokens plus one "any other token" outcome, by hand in float64; never above the full KL (data processing)."""
    student, teacher = _logits(7), _logits(8)
    targets = top_k_targets(teacher, k)
    p, q = torch.softmax(teacher.double(), -1), torch.softmax(student.double(), -1)
    p_top, q_top = p.gather(-1, targets.indices), q.gather(-1, targets.indices)
    p_bins = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_bins = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    expected = float((p_bins * (p_bins / q_bins).log()).sum(-1).mean())
    sparse = kd_divergence(student, targets).item()
    assert sparse == pytest.approx(expected, rel=1e-5)
    assert sparse <= kd_divergence(student, teacher).item()
    assert torch.allclose(targets.rest.double().exp(), 1 - p_top.sum(-1), atol=1e-6)
    grad_student = student.clone().requires_grad_(True)
    kd_divergence(grad_student, targets).backward()
    assert grad_student.grad is not None and bool(torch.isfinite(grad_student.grad).all())


def test_kd_rejects_bad_options() -> None:
    with pytest.raises(ConfigError):
        kd_divergence(_logits(0), _logits(1), "kl")
    with pytest.raises(ConfigError):
        kd_divergence(_logits(0), _logits(1), temperature=0.0)


def test_exit_loss_weights_closed_forms() -> None:
    assert exit_loss_weights("none", 3) == [0.0, 0.0, 1.0]
    assert exit_loss_weights("weighted", 3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    weights = exit_loss_weights("weighted", 5)
    assert weights == pytest.approx([b / 15 for b in range(1, 6)]) and sum(weights) == pytest.approx(1.0)
    assert exit_loss_weights("aggressive:0.1", 4) == [0.1, 0.1, 0.1, 1.0]
    assert exit_loss_weights("aggressive:0.3", 1) == [1.0]
    for bad in ("aggressive", "aggressive:-1", "aggressive:x", "weighted:2", "linear"):
        with pytest.raises(ConfigError):
            exit_loss_weights(bad, 3)


def test_uptrain_loss_combines_exits_as_specified() -> None:
    exits = [_logits(10 + b).requires_grad_() for b in range(3)]
    teacher = _logits(20)
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(5))
    config = LossConfig(kd="jsd", kd_weight=0.25, temperature=2.0, exit_loss="aggressive:0.3", self_distill=True)
    loss, metrics = uptrain_loss(exits, ids, teacher, config)
    expected = 0.0
    for b, (logits, alpha) in enumerate(zip(exits, [0.3, 0.3, 1.0], strict=True)):
        term = 0.75 * next_token_ce(logits, ids) + 0.25 * kd_divergence(logits, teacher, "jsd", 2.0)
        if b < 2:
            term = term + kd_divergence(logits, exits[2].detach(), "jsd", 2.0)
        expected = expected + alpha * term
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert metrics["loss"] == pytest.approx(float(loss.detach()))
    assert set(metrics) == {"loss"} | {f"{k}/exit{b}" for k in ("ce", "kd") for b in (1, 2, 3)}
    # Self-distillation targets are detached: the last exit's gradient comes from its own term only.
    loss.backward()
    own = exits[2].detach().requires_grad_()
    (0.75 * next_token_ce(own, ids) + 0.25 * kd_divergence(own, teacher, "jsd", 2.0)).backward()
    torch.testing.assert_close(exits[2].grad, own.grad)


def test_loss_config_validation() -> None:
    with pytest.raises(ConfigError, match="self-distill"):
        LossConfig(self_distill=True)
    with pytest.raises(ConfigError):
        LossConfig(kd_weight=1.5)
    with pytest.raises(ConfigError, match="teacher"):
        uptrain_loss([_logits(0)], torch.zeros(2, 5, dtype=torch.long), None, LossConfig())
    loss, metrics = uptrain_loss([_logits(0)], torch.zeros(2, 5, dtype=torch.long), None, LossConfig(kd_weight=0.0))
    assert metrics == {"ce/exit1": pytest.approx(loss.item()), "loss": pytest.approx(loss.item())}
    _, metrics = uptrain_loss([_logits(0)], torch.zeros(2, 5, dtype=torch.long), _logits(1), LossConfig(), first_exit=3)
    assert set(metrics) == {"ce/exit3", "kd/exit3", "loss"}  # a lone last exit of a 3-loop model
