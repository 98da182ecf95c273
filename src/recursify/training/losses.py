"""Uptraining losses as pure functions: next-token CE, the KD divergence family, early-exit weights.

Conventions: logits are [batch, seq, vocab]; every loss is a mean over positions (so micro-batches of
equal shape can be averaged); computations run in float32 whatever the autocast dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from recursify.errors import ConfigError
from recursify.training.config import KD_KINDS, LossConfig, parse_exit_loss


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from position t ([batch, seq, vocab], [batch, seq])."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def kd_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward-kl", temperature: float = 1.0
) -> torch.Tensor:
    """Mean over positions of a divergence between teacher and student distributions at ``temperature``.

    forward-kl is KL(teacher || student) (mass-covering, the paper's best), reverse-kl is
    KL(student || teacher) (mode-seeking), jsd is the Jensen-Shannon divergence with equal weights,
    tvd the total variation distance. The result is multiplied by temperature**2 so gradient
    magnitudes do not shrink as the temperature grows (Hinton et al. 2015).
    """
    if temperature <= 0:
        raise ConfigError(f"KD temperature must be positive, got {temperature}")
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward-kl":
        per_position = (teacher.exp() * (teacher - student)).sum(-1)
    elif kind == "reverse-kl":
        per_position = (student.exp() * (student - teacher)).sum(-1)
    elif kind == "jsd":
        mixture = torch.logsumexp(torch.stack([student, teacher]), dim=0) - math.log(2.0)
        per_position = 0.5 * (teacher.exp() * (teacher - mixture)).sum(-1) + 0.5 * (student.exp() * (student - mixture)).sum(-1)
    elif kind == "tvd":
        per_position = 0.5 * (teacher.exp() - student.exp()).abs().sum(-1)
    else:
        raise ConfigError(f"unknown KD loss {kind!r}; choose one of: {', '.join(KD_KINDS)}")
    return per_position.mean() * temperature**2


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
    teacher_logits: torch.Tensor | None,
    config: LossConfig,
    first_exit: int = 1,
    train_final: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss over exits, and per-exit metrics for the log.

    For exit b with weight alpha_b: alpha_b * [(1 - w) CE_b + w KD(teacher || exit_b)
    (+ KD(final.detach() || exit_b) for b < B with self-distillation)]; with
    ``config.early_exit_target`` "final", an exit b < B learns alpha_b * KD(final.detach() || exit_b)
    only. Pass only the last exit's logits when ``config.exit_loss`` is none, with ``first_exit`` = B
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
