"""Uptraining losses as pure functions: next-token CE, the KD divergence family, early-exit weights.

Conventions: logits are [batch, seq, vocab]; every loss is a mean over positions (so micro-batches of
equal shape can be averaged); computations run in float32 whatever the autocast dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from recursify.errors import ConfigError
from recursify.training.config import KD_KINDS, LossConfig, parse_exit_loss


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from position t ([batch, seq, vocab], [batch, seq])."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


@dataclass
class SparseTargets:
    """A teacher's distribution kept as its top-k log-probabilities and the log of the mass left over.

    Shapes: indices [..., k] (token ids), log_probs [..., k], rest [...] (the log of the probability
    of every other token; -inf at k = vocab). Computed at a KD
    temperature T (``top_k_targets``), so the student is compared at the same T.
    """

    indices: torch.Tensor
    log_probs: torch.Tensor
    rest: torch.Tensor

    def __getitem__(self, rows: torch.Tensor | slice) -> SparseTargets:
        """The targets of some rows (the leading dimension)."""
        return SparseTargets(self.indices[rows], self.log_probs[rows], self.rest[rows])

    def to(self, device: torch.device | str) -> SparseTargets:
        return SparseTargets(self.indices.to(device), self.log_probs.to(device), self.rest.to(device))


def top_k_targets(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> SparseTargets:
    """The top-k log-probabilities of ``teacher_logits`` [..., vocab] at ``temperature`` and the remaining mass."""
    log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    top, indices = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
    return SparseTargets(indices, top, _outside(log_probs, indices))


def kd_divergence(
    student_logits: torch.Tensor, teacher: torch.Tensor | SparseTargets, kind: str = "forward-kl", temperature: float = 1.0
) -> torch.Tensor:
    """Mean over positions of a divergence between teacher and student distributions at ``temperature``.

    forward-kl is KL(teacher || student) (mass-covering, the paper's best), reverse-kl is
    KL(student || teacher) (mode-seeking), jsd is the Jensen-Shannon divergence with equal weights,
    tvd the total variation distance. The result is multiplied by temperature**2 so gradient
    magnitudes do not shrink as the temperature grows (Hinton et al. 2015).

    ``teacher`` is the teacher's logits [..., vocab], or its cached top-k (``SparseTargets``): then
    both distributions are compared over k + 1 outcomes, the teacher's top-k tokens and "any other
    token" (its leftover mass against the student's mass outside those k). That is the divergence of
    the distributions coarsened to those outcomes, never more than the full one, and exactly the
    full one at k = vocab.
    """
    if temperature <= 0:
        raise ConfigError(f"KD temperature must be positive, got {temperature}")
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, SparseTargets):
        indices = teacher.indices.long()
        top, target = student.gather(-1, indices), teacher.log_probs.float()  # (..., k)
        if indices.shape[-1] < student.shape[-1]:  # the "any other token" outcome (none at k = vocab)
            student = torch.cat([top, _outside(student, indices)[..., None]], -1)
            target = torch.cat([target, teacher.rest[..., None].float()], -1)
        else:
            student = top
    else:
        target = F.log_softmax(teacher.float() / temperature, dim=-1)
    return divergence(target, student, kind).mean() * temperature**2


def divergence(teacher: torch.Tensor, student: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position divergence between two distributions given as log-probabilities over the last dimension.

    Outcomes with zero probability (log-probability -inf) contribute nothing to the sums they weight.
    """
    if kind == "forward-kl":
        return _weighted(teacher, teacher - student)
    if kind == "reverse-kl":
        return _weighted(student, student - teacher)
    if kind == "jsd":
        mixture = torch.logsumexp(torch.stack([student, teacher]), dim=0) - math.log(2.0)
        return 0.5 * _weighted(teacher, teacher - mixture) + 0.5 * _weighted(student, student - mixture)
    if kind == "tvd":
        return 0.5 * (teacher.exp() - student.exp()).abs().sum(-1)
    raise ConfigError(f"unknown KD loss {kind!r}; choose one of: {', '.join(KD_KINDS)}")


def _weighted(log_weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum(exp(log_weights) * values) over the last dimension, with 0 * anything = 0 where a weight is zero."""
    weights = log_weights.exp()
    return torch.where(weights > 0, weights * values, torch.zeros_like(values)).sum(-1)


def _outside(log_probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log of the probability outside ``indices`` [..., k]: a logsumexp over the other entries (no cancellation)."""
    return torch.logsumexp(log_probs.scatter(-1, indices, -math.inf), dim=-1)


def exit_loss_weights(spec: str, num_exits: int) -> list[float]:
    """Weight of each exit b = 1..B in the training loss (docs/method.md section 6).

    none: only the last exit (1 for b = B, 0 elsewhere); weighted: alpha_b = b / sum(1..B);
    aggressive:C: 1 for the last exit and C for every earlier one.
    """
    mode, coefficient = parse_exit_loss(spec)
    if num_exits < 1:
        raise ConfigError(f"a model has at least one exit, got {num_exits}")
    if mode == "weighted":
        total = num_exits * (num_exits + 1) / 2
        return [b / total for b in range(1, num_exits + 1)]
    early = coefficient if mode == "aggressive" else 0.0
    return [early] * (num_exits - 1) + [1.0]


def uptrain_loss(
    exit_logits: list[torch.Tensor],
    input_ids: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTargets | None,
    config: LossConfig,
    first_exit: int = 1,
    train_final: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss over exits, and per-exit metrics for the log.

    For exit b with weight alpha_b: alpha_b * [(1 - w) CE_b + w KD(teacher || exit_b)
    (+ KD(final.detach() || exit_b) for b < B with self-distillation)]; with
    ``config.early_exit_target`` "final", an exit b < B learns alpha_b * KD(final.detach() || exit_b)
    only. The teacher is its logits or its cached top-k (``SparseTargets``, see ``kd_divergence``).
    Pass only the last exit's logits when ``config.exit_loss`` is none, with ``first_exit`` = B
    so the metrics name it exit B. ``train_final`` False leaves the last exit out of the loss (its
    parameters are frozen); its CE is still logged.

    Returns:
        (loss, metrics) with metrics ``loss``, ``ce/exit{b}``, ``kd/exit{b}`` where a teacher term
        was computed and ``sd/exit{b}`` for exits learning from the final one only.
    """
    weights = exit_loss_weights(config.exit_loss, len(exit_logits))
    final = exit_logits[-1].detach()
    total = exit_logits[-1].new_zeros((), dtype=torch.float32)
    metrics: dict[str, float] = {}
    for b, (logits, weight) in enumerate(zip(exit_logits, weights, strict=True), start=1):
        name = f"exit{first_exit + b - 1}"
        is_final = b == len(exit_logits)
        ce = next_token_ce(logits, input_ids)
        metrics[f"ce/{name}"] = float(ce.detach())
        if is_final and not train_final:
            continue
        if not is_final and config.early_exit_target == "final":
            distilled = kd_divergence(logits, final, config.kd, config.temperature)
            metrics[f"sd/{name}"] = float(distilled.detach())
            if weight > 0:
                total = total + weight * distilled
            continue
        if teacher_logits is None and config.kd_weight > 0:
            raise ConfigError("KD needs a teacher: pass --teacher, or --kd-weight 0 to train on cross-entropy only")
        term = (1.0 - config.kd_weight) * ce if config.kd_weight < 1.0 else ce.new_zeros(())
        if teacher_logits is not None:
            kd = kd_divergence(logits, teacher_logits, config.kd, config.temperature)
            metrics[f"kd/{name}"] = float(kd.detach())
            term = term + config.kd_weight * kd
        if config.self_distill and b < len(exit_logits):
            term = term + kd_divergence(logits, final, config.kd, config.temperature)
        if weight > 0:
            total = total + weight * term
    metrics["loss"] = float(total.detach())
    return total, metrics
