"""CPU-time budgets: how long a training phase may run, measured as this process's CPU time.

``time.process_time()`` counts the CPU seconds of every thread of this process and nothing else, so
a budget of "8 CPU-minutes" means the same work on an idle machine and on one shared with other jobs
(where wall time is noisy). With one thread per process it equals wall time on an idle core.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from recursify.training.schedule import lr_factor

# Steps of the virtual schedule a budget fraction is mapped onto (fine enough to be smooth).
_SCHEDULE_RESOLUTION = 10_000


class CpuBudget:
    """A budget of CPU seconds on top of ``already_used`` (by a run being resumed); ``paused()`` excludes evaluation.

    It counts from its creation, or, created with ``started=False``, from ``start()``: uptraining
    builds its learning-rate schedule over the budget while setting up, but the setup and the first
    evaluation must not spend it (until then it reads ``already_used``).
    """

    def __init__(self, seconds: float, already_used: float = 0.0, started: bool = True):
        self.seconds = seconds
        self._already_used = already_used
        self._start = 0.0
        self._excluded = 0.0
        self.started = False
        if started:
            self.start()

    def start(self) -> None:
        """Count from now on."""
        self._start = time.process_time() - self._already_used
        self._excluded = 0.0
        self.started = True

    def used(self) -> float:
        """CPU seconds spent so far, excluding paused stretches."""
        if not self.started:
            return self._already_used
        return time.process_time() - self._start - self._excluded

    def fraction(self) -> float:
        """Share of the budget spent, in [0, 1]."""
        return min(1.0, self.used() / self.seconds) if self.seconds > 0 else 1.0

    def spent(self) -> bool:
        return self.used() >= self.seconds

    @contextmanager
    def paused(self) -> Iterator[None]:
        """CPU time spent inside this block (evaluation, logging) does not count."""
        began = time.process_time()
        try:
            yield
        finally:
            self._excluded += time.process_time() - began


def budget_lr_factor(fraction: float, warmup_fraction: float, min_ratio: float) -> float:
    """``lr_factor`` of a run whose length is a CPU budget: warmup then cosine over budget fractions."""
    step = min(_SCHEDULE_RESOLUTION - 1, int(fraction * _SCHEDULE_RESOLUTION))
    return lr_factor(step, _SCHEDULE_RESOLUTION, round(warmup_fraction * _SCHEDULE_RESOLUTION), min_ratio)
