"""Learning-rate schedule closed forms and the seeded batch order."""

from __future__ import annotations

import pytest
import torch

from recursify.training.schedule import batch_rows, lr_factor


def test_lr_factor_warmup_then_cosine() -> None:
    total, warmup, floor = 21, 4, 0.1
    assert [lr_factor(s, total, warmup, floor) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_factor(4, total, warmup, floor) == pytest.approx(1.0)
    assert lr_factor(12, total, warmup, floor) == pytest.approx((1 + floor) / 2)  # half-way through the decay
    assert lr_factor(20, total, warmup, floor) == pytest.approx(floor)
    values = [lr_factor(s, total, warmup, floor) for s in range(warmup, total)]
    assert values == sorted(values, reverse=True)


def test_batch_rows_cover_each_epoch_once_and_are_deterministic() -> None:
    num_rows, per_step = 10, 4
    order = torch.cat([batch_rows(s, per_step, num_rows, seed=3) for s in range(5)])  # two epochs
    assert sorted(order[:10].tolist()) == list(range(10)) and sorted(order[10:20].tolist()) == list(range(10))
    assert order[:10].tolist() != order[10:20].tolist()
    assert torch.equal(batch_rows(3, per_step, num_rows, seed=3), order[12:16])
    assert not torch.equal(batch_rows(0, per_step, num_rows, seed=4), order[:4])
