"""``recursify train-exits``: learn exit gates on a frozen model, then calibrate every exit signal.

The model never changes. Its hidden states at every loop end are collected once over the train split
of ``--data`` (evaluation/calibration.py, ``collect_exit_data``), labelled by whether that loop's exit
token equals the final loop's, and each non-final loop's gate (modeling/exit_gates.py) is fitted to
those labels with binary cross-entropy: a few hundred AdamW steps on cached features, CPU-seconds.
Then the held-out split is collected again (now with the gates attached) and every signal's agreement
curve is stored (``exit_calibration.json``), so ``--exit agreement:A`` can pick thresholds for any A.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recursify.checkpoint import is_checkpoint
from recursify.data import TEACHER_PREFIX, load_tokens
from recursify.errors import CheckpointError, ConfigError
from recursify.evaluation.calibration import ExitData, calibration_report, collect_exit_data
from recursify.files import write_json
from recursify.loading import load
from recursify.modeling.exit_addons import CALIBRATION_FILE
from recursify.modeling.exit_gates import GATES_FILE, ExitGates, save_exit_gates
from recursify.text import require_tokenizer
from recursify.training.common import default_teacher, open_teacher
from recursify.training.config import TrainExitsConfig


def fit_gates(data: ExitData, width: int, steps: int, batch: int, lr: float, seed: int) -> tuple[ExitGates, list[float]]:
    """Gates fitted to ``data`` (features required): BCE of "this loop's exit token is the final one's"; returns the loss curve."""
    assert data.features is not None, "collect the exit data with features=True"
    features, labels = data.features, data.agrees("confidence").float()  # (n, B-1, F), (n, B-1)
    loops = labels.shape[1] + 1
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gates = ExitGates(features.shape[-1] - 1, loops, width)
    optimizer = torch.optim.AdamW(gates.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    curve = []
    for _ in range(steps):
        rows = torch.randint(0, features.shape[0], (batch,), generator=generator)
        loss = sum(
            nn.functional.binary_cross_entropy_with_logits(gates.logits_from_features(features[rows, b], b), labels[rows, b])
            for b in range(loops - 1)
        ) / (loops - 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
        schedule.step()
        curve.append(float(loss.detach()))  # type: ignore[union-attr]
    return gates.eval().requires_grad_(False), curve


@torch.no_grad()
def gate_quality(gates: ExitGates, data: ExitData) -> list[dict[str, float]]:
    """Per non-final loop on held-out data: BCE, accuracy at 0.5, base rate of agreement, ROC AUC."""
    assert data.features is not None
    labels = data.agrees("confidence").float()
    out = []
    for b in range(labels.shape[1]):
        logits = gates.logits_from_features(data.features[:, b], b)
        y = labels[:, b]
        out.append(
            {
                "loop": b + 1,
                "bce": float(nn.functional.binary_cross_entropy_with_logits(logits, y)),
                "accuracy": float(((logits > 0).float() == y).float().mean()),
                "agree_rate": float(y.mean()),
                "auc": roc_auc(logits, y),
            }
        )
    return out


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a positive > score of a negative) (ties count half): the Mann-Whitney statistic; nan without both classes."""
    positives, negatives = int(labels.sum()), int((1 - labels).sum())
    if positives == 0 or negatives == 0:
        return math.nan
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for value in scores.unique():  # average ranks over ties
        tied = scores == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return float((ranks[labels.bool()].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def train_exits(config: TrainExitsConfig) -> dict[str, Any]:
    """Train the gates (unless ``gate_width`` is None) and write the calibration; returns the report (also in the calibration file)."""
    began_cpu, began = time.process_time(), time.perf_counter()
    if not is_checkpoint(config.checkpoint):
        raise CheckpointError(f"{config.checkpoint} is not a recursify checkpoint; create one with 'recursify convert' first")
    model = load(config.checkpoint)
    if model.loops < 2:
        raise ConfigError(f"{config.checkpoint} has loops=1: there are no early exits to train")
    model.requires_grad_(False)
    tokenizer = require_tokenizer(model)
    teacher = None
    if config.data_spec.startswith(TEACHER_PREFIX):
        spec = config.teacher or default_teacher(config.checkpoint)
        if spec is None:
            raise ConfigError("--data teacher:N samples text from the original: pass --teacher (the checkpoint records no source)")
        teacher = open_teacher(spec)
    report: dict[str, Any] = {"data": config.data_spec, "window": config.window, "seed": config.seed}
    model.addons.gates = None  # gates of an earlier run are replaced, and never feed their own training data
    if config.gate_width is not None:
        tokens = load_tokens(config.data_spec, tokenizer, "train", config.tokens, config.seed, teacher)
        train = collect_exit_data(model, tokens, config.window, features=True, progress=not config.quiet)
        gates, curve = fit_gates(train, config.gate_width, config.steps, config.batch, config.lr, config.seed)
        model.addons.gates = gates
        report["gates"] = {
            "width": config.gate_width,
            "train_tokens": train.positions,
            "steps": config.steps,
            "loss": [curve[0], curve[-1]],
        }
    heldout_tokens = load_tokens(config.data_spec, tokenizer, "heldout", config.calib_tokens, config.seed, teacher)
    heldout = collect_exit_data(model, heldout_tokens, config.window, features=model.addons.gates is not None, progress=not config.quiet)
    if model.addons.gates is not None:
        report["gates"]["heldout"] = gate_quality(model.addons.gates, heldout)
    report["cpu_minutes"] = (time.process_time() - began_cpu) / 60
    report["wall_minutes"] = (time.perf_counter() - began) / 60
    calibration = calibration_report(heldout, {"split": "heldout", **report})
    directory = Path(config.checkpoint)
    if model.addons.gates is not None:
        save_exit_gates(model.addons.gates, directory, report["gates"])
    else:
        (directory / GATES_FILE).unlink(missing_ok=True)  # a calibration without gates must not sit beside stale ones
    write_json(directory / CALIBRATION_FILE, calibration)
    return {key: value for key, value in calibration.items() if key != "signals"}
