"""Pure schedules of an uptraining run: the learning-rate factor and which rows form each batch."""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Linear warmup from 1/(warmup+1) to 1 over ``warmup_steps`` steps, then cosine decay to
    ``min_ratio`` at the last step.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_rows(step: int, rows_per_step: int, num_rows: int, seed: int) -> torch.Tensor:
    """Indices of the packed rows forming global batch ``step``: a fresh seeded permutation per epoch.

    A pure function of (step, seed), so a resumed run reads exactly the batches it would have read.
    """
    positions = torch.arange(step * rows_per_step, (step + 1) * rows_per_step)
    epochs, offsets = positions // num_rows, positions % num_rows
    return torch.stack([_epoch_order(int(e), num_rows, seed)[int(o)] for e, o in zip(epochs, offsets, strict=True)])


@lru_cache(maxsize=4)
def _epoch_order(epoch: int, num_rows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=generator)
