"""The run log: one JSON object per line in ``out/metrics.jsonl`` (+ TensorBoard when installed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Append-only JSONL log of train/eval records; TensorBoard scalars too if available.

    Every record has ``event`` ("train" or "eval"), ``step`` and ``tokens``. On resume the lines
    written after the checkpoint being resumed are dropped, so the log never repeats a step.
    """

    def __init__(self, out: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = out / METRICS_FILE
        if resume_step is not None and self.path.is_file():
            kept = [line for line in read_metrics(self.path) if line["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None:
            self.path.write_text("")
        self.writer = _tensorboard_writer(out / "tensorboard") if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("event", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['event']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a torn last line from a kill is skipped)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _tensorboard_writer(directory: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(directory))
