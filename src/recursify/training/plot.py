"""``recursify plot RUN``: the loss curves of an uptrain run (per exit) drawn to a PNG."""

from __future__ import annotations

import os
from pathlib import Path

from recursify.errors import DataError
from recursify.files import pyplot, save_figure
from recursify.training.metrics import METRICS_FILE, read_metrics


def plot_run(run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Draw training loss, per-exit CE/KD and held-out metrics against tokens; returns the PNG path.

    Uses matplotlib's Agg backend (no display needed); the PNG is written atomically.
    """
    plt = pyplot()
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        raise DataError(f"{run} has no {METRICS_FILE}; give the --out directory of a 'recursify uptrain' run")
    records = read_metrics(path)
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    if not train and not evals:
        raise DataError(f"{path} holds no records yet; plot again once the run has taken a step")
    panels = [("training loss", train, ["loss"]), ("training CE / KD per exit", train, _series(train, ("ce/", "kd/")))]
    panels.append(("held-out CE / KL per exit", evals, _series(evals, ("ce/", "kl/"))))
    panels = [p for p in panels if p[1] and p[2]]
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for axis, (title, rows, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            points = [(r["tokens"], r[key]) for r in rows if key in r]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o" if rows is evals else None, label=key)
        axis.set_title(title)
        axis.set_xlabel("tokens")
        axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(str(run))
    figure.tight_layout()
    target = Path(out) if out is not None else Path(run) / "loss.png"
    try:
        save_figure(figure, target, dpi=100)
    finally:
        plt.close(figure)
    return target


def _series(records: list[dict[str, object]], prefixes: tuple[str, ...]) -> list[str]:
    keys = {key for record in records for key in record if key.startswith(prefixes)}
    return sorted(keys)
