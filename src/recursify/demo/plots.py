"""The demo's own figures: uptraining curves of every model, oracle exit loops, serving throughput.

(The size/quality Pareto plot and per-loop exit curves are ``recursify compare``'s, reused as they are.)
"""

from __future__ import annotations

import os
from typing import Any

from recursify.files import pyplot, save_figure


def loss_curves_plot(runs: dict[str, list[dict[str, Any]]], path: str | os.PathLike[str]) -> None:
    """Training loss (left) and held-out KL to the teacher at the last exit (right) against tokens, one line per model.

    Args:
        runs: model name -> the records of its uptraining ``metrics.jsonl``.
    """
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    try:
        for name, records in runs.items():
            train = [r for r in records if r.get("event") == "train"]
            left.plot([r["tokens"] for r in train], [r["loss"] for r in train], label=name)
            evals = [(r["tokens"], last_exit_kl(r)) for r in records if r.get("event") == "eval"]
            evals = [(tokens, kl) for tokens, kl in evals if kl is not None]
            right.plot([t for t, _ in evals], [kl for _, kl in evals], marker="o", label=name)
        left.set_title("training loss")
        right.set_title("held-out KL(original ‖ model), last exit")
        for axes in (left, right):
            axes.set_xlabel("training tokens")
            axes.set_yscale("log")
            axes.grid(True, alpha=0.3)
        right.set_ylabel("nats / token")
        left.legend(fontsize=7)
        save_figure(figure, path)
    finally:
        plt.close(figure)


def last_exit_kl(metrics: dict[str, Any] | None) -> float | None:
    """KL to the teacher at the last exit of an uptraining evaluation record (``kl/exit1..B``); None without one."""
    exits = sorted((int(key.removeprefix("kl/exit")), value) for key, value in (metrics or {}).items() if key.startswith("kl/exit"))
    return float(exits[-1][1]) if exits else None


def exit_histogram_plot(histograms: dict[str, list[int]], path: str | os.PathLike[str]) -> None:
    """Share of held-out tokens whose oracle exit is each loop (grouped bars per model)."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(8, 4))
    try:
        width = 0.8 / max(1, len(histograms))
        for index, (name, counts) in enumerate(histograms.items()):
            total = max(1, sum(counts))
            loops = [loop + 1 + (index - (len(histograms) - 1) / 2) * width for loop in range(len(counts))]
            axes.bar(loops, [c / total for c in counts], width=width, label=name)
        axes.set_xlabel("oracle exit loop (first loop whose prediction equals the final one)")
        axes.set_ylabel("share of tokens")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(True, axis="y", alpha=0.3)
        axes.legend(fontsize=7)
        axes.set_title("how early tokens could exit")
        save_figure(figure, path)
    finally:
        plt.close(figure)


def throughput_plot(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Measured serving tokens/s per configuration, annotated with mean loops per token."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(9, 4))
    try:
        names = [row["name"] for row in rows]
        values = [row["tokens_per_s"] for row in rows]
        bars = axes.barh(names, values, color=["C0" if row["model"] == rows[0]["model"] else "C1" for row in rows])
        for bar, row in zip(bars, rows, strict=True):
            axes.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {row['mean_loops']:.2f} loops", va="center", fontsize=8)
        axes.invert_yaxis()
        axes.set_xlabel("generated tokens / s (same workload, measured)")
        axes.grid(True, axis="x", alpha=0.3)
        axes.set_title("serving: original (blue) vs recursive (orange)")
        save_figure(figure, path)
    finally:
        plt.close(figure)
