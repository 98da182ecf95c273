"""PNG plots for ``recursify compare``: a size/quality Pareto plot and per-loop exit curves.

matplotlib runs on its Agg backend (no display needed); files are written atomically.
"""

from __future__ import annotations

import os

from recursify.errors import ConfigError
from recursify.evaluation.report import EvalReport
from recursify.files import pyplot, save_figure

METRICS = ("ppl", "acc")


def _metric(report: EvalReport, metric: str) -> float | None:
    if metric == "ppl":
        return report.ppl.value if report.ppl is not None else None
    return report.mean_accuracy()


def pareto_plot(reports: list[EvalReport], path: str | os.PathLike[str], metric: str = "ppl") -> None:
    """Non-embedding parameters (incl. LoRA) vs perplexity (log scale) or mean task accuracy.

    One marker per model; every original model (loops = 1) also draws a dashed horizontal
    reference line at its quality.

    Raises:
        ConfigError: unknown metric, or no model has that metric.
    """
    if metric not in METRICS:
        raise ConfigError(f"unknown plot metric {metric!r}; choose one of: {', '.join(METRICS)}")
    points = [(report, _metric(report, metric)) for report in reports]
    points = [(report, value) for report, value in points if value is not None]
    if not points:
        need = "--ppl DATA" if metric == "ppl" else "--tasks"
        raise ConfigError(f"nothing to plot: no model has a {metric} result; pass {need}")
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    try:
        for index, (report, value) in enumerate(points):
            color = f"C{index % 10}"
            axes.scatter(report.layer_params / 1e6, value, color=color, s=50, zorder=3, label=f"{report.model} (loops {report.loops})")
            if report.loops == 1:
                axes.axhline(value, color=color, linestyle="--", linewidth=1, label=f"original: {report.model}")
        axes.set_xlabel("non-embedding parameters incl. LoRA (millions)")
        if metric == "ppl":
            axes.set_ylabel("perplexity (lower is better)")
            axes.set_yscale("log")
        else:
            axes.set_ylabel("mean multiple-choice accuracy")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
        axes.set_title("size vs quality")
        save_figure(figure, path)
    finally:
        plt.close(figure)


def exit_plot(reports: list[EvalReport], path: str | os.PathLike[str]) -> None:
    """Per-loop exit perplexity (left) and top-1 agreement with the final loop (right) per model.

    Raises:
        ConfigError: no model has per-loop results.
    """
    curves = [r for r in reports if r.ppl is not None and r.ppl.per_loop]
    if not curves:
        raise ConfigError("nothing to plot: no model has per-loop results; pass --ppl DATA (compare computes per-loop metrics)")
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        for report in curves:
            assert report.ppl is not None and report.ppl.per_loop is not None
            loops = [entry.loop for entry in report.ppl.per_loop]
            oracle = f", oracle {report.ppl.oracle.mean_loops:.2f} loops" if report.ppl.oracle else ""
            left.plot(loops, [entry.ppl for entry in report.ppl.per_loop], marker="o", label=f"{report.model}{oracle}")
            right.plot(loops, [entry.agree_final for entry in report.ppl.per_loop], marker="o", label=report.model)
        left.set_yscale("log")
        left.set_xlabel("exit after loop")
        left.set_ylabel("perplexity")
        right.set_xlabel("exit after loop")
        right.set_ylabel("top-1 agreement with the final loop")
        right.set_ylim(0, 1.05)
        for axes in (left, right):
            axes.grid(True, alpha=0.3)
            axes.xaxis.get_major_locator().set_params(integer=True)
        left.legend(fontsize=8)
        figure.suptitle("static early exits")
        save_figure(figure, path)
    finally:
        plt.close(figure)
