"""CPU budgets: paused stretches and CPU time before ``start()`` do not count; the schedule over budget fractions."""

from __future__ import annotations

import time

import pytest

from recursify.training.budget import CpuBudget, budget_lr_factor


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_budget_excludes_paused_time_and_schedules_over_the_budget() -> None:
    budget = CpuBudget(3600)
    with budget.paused():
        _burn(0.05)
    assert budget.used() < 0.02
    assert budget_lr_factor(0.0, 0.1, 0.1) < 0.01
    assert budget_lr_factor(0.1, 0.1, 0.1) == pytest.approx(1.0, abs=1e-3)
    assert budget_lr_factor(1.0, 0.1, 0.1) == pytest.approx(0.1, abs=1e-3)


def test_a_budget_not_started_reads_what_was_used_before_and_counts_from_start() -> None:
    budget = CpuBudget(100, already_used=10.0, started=False)
    _burn(0.05)
    assert budget.used() == 10.0 and budget.fraction() == 0.1 and not budget.spent()
    budget.start()
    _burn(0.05)
    assert 10.05 <= budget.used() < 10.5
