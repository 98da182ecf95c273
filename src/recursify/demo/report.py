"""Collect every number a demo run measured into ``report.json``, ``report.md``, plots and a headline table.

``report.json``::

    {"generated", "machine", "options", "budget", "speeds_tokens_per_s", "source",
     "models": {"<name>": {"description", "path", "commands": [...], "seconds", "params", "eval", "uptrain"}},
     "headline": [{"model", "loops", "params_m", "ratio", "ppl", "kl", "kl_before", "oracle_loops", "acc"}],
     "serving": {<bench-serve JSON>, "command"}, "tasks_note", "stage_seconds", "plots"}

``commands`` lists, in order, the exact ``recursify`` commands that produced a model's row.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recursify.demo.plan import EXIT_MODEL, EXITS_SUFFIX, GRID
from recursify.demo.plots import last_exit_kl
from recursify.files import write_json, write_text

if TYPE_CHECKING:
    from recursify.demo.run import Demo

PLOTS = {
    "pareto": "plots/pareto.png",
    "exits": "plots/exits.png",
    "loss_curves": "plots/loss_curves.png",
    "exit_histogram": "plots/exit_histogram.png",
    "throughput": "plots/throughput.png",
}


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _step_keys(name: str) -> list[str]:
    """The steps whose commands produced a model's row, in order."""
    if name == "original":
        return ["evaluate/original"]
    if name == EXIT_MODEL + EXITS_SUFFIX:
        return [f"convert/{EXIT_MODEL}", f"uptrain/{EXIT_MODEL}", f"uptrain/{name}", f"exits/{name}", f"evaluate/{name}"]
    return [f"convert/{name}", f"uptrain/{name}", f"evaluate/{name}"]


def _uptrain_summary(run: Path) -> dict[str, Any]:
    """Held-out metrics before and after (last exit), tokens and mean speed of an uptraining run."""
    from recursify.training.metrics import METRICS_FILE, read_metrics

    records = read_metrics(run / METRICS_FILE)
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    summary: dict[str, Any] = {
        "tokens": train[-1]["tokens"] if train else 0,
        "tokens_per_s": sum(r["tokens_per_s"] for r in train) / len(train) if train else None,
        "final_loss": train[-1]["loss"] if train else None,
    }
    if evals:
        summary["before"] = {k: v for k, v in evals[0].items() if "/" in k}
        summary["after"] = {k: v for k, v in evals[-1].items() if "/" in k}
    return summary


def headline_row(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    evaluated = entry["eval"]
    params = evaluated["params"]
    per_loop = evaluated.get("per_loop", [])
    tasks = evaluated.get("tasks", {})
    uptrain = entry.get("uptrain", {})
    return {
        "model": name,
        "loops": len(per_loop) or 1,
        "params_m": (params["non_embedding"] + params["lora"]) / 1e6,
        "ratio": params["ratio"],
        "ppl": evaluated["ppl"]["value"],
        "kl": per_loop[-1].get("kl_teacher", 0.0) if per_loop else 0.0,
        "kl_before": last_exit_kl(uptrain.get("before")),
        "oracle_loops": evaluated["oracle_exit"]["mean_loops"] if "oracle_exit" in evaluated else 1.0,
        "acc": sum(t["acc"] for t in tasks.values()) / len(tasks) if tasks else None,
    }


def build_report(demo: Demo) -> dict[str, Any]:
    """Everything measured, keyed by model, with the commands that produced each row."""
    models: dict[str, Any] = {}
    descriptions = {spec.name: spec.description for spec in GRID}
    descriptions["original"] = f"the source model {demo.options.model}"
    descriptions[EXIT_MODEL + EXITS_SUFFIX] = (
        f"{descriptions[EXIT_MODEL]}, then per-loop exit heads trained with the model frozen, exit gates and an agreement calibration"
    )
    for name, path in demo.evaluated_models().items():
        markers = [demo.steps.done(key) or {} for key in _step_keys(name)]
        evaluated = json.loads(demo.eval_json(name).read_text(encoding="utf-8"))
        entry = {
            "description": descriptions[name],
            "path": path,
            "commands": [m["command"] for m in markers if "command" in m],
            "seconds": round(sum(m.get("seconds", 0.0) for m in markers), 1),
            "params": evaluated["params"],
            "eval": evaluated,
        }
        if name != "original":
            entry["uptrain"] = _uptrain_summary(Path(path))
        models[name] = entry
    serving = json.loads((demo.root / "serve.json").read_text(encoding="utf-8"))
    serving.pop("table", None)
    serving["command"] = (demo.steps.done("serve/bench") or {}).get("command")
    stage_seconds: dict[str, float] = {}
    for marker in sorted(demo.steps.state_dir.glob("*.json")):
        stage = marker.name.split("--")[0]
        stage_seconds[stage] = round(stage_seconds.get(stage, 0.0) + json.loads(marker.read_text())["seconds"], 1)
    return {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "options": demo.plan["options"],
        "budget": demo.plan["budget"],
        "speeds_tokens_per_s": demo.plan["speeds_tokens_per_s"],
        "source": demo.plan["source"],
        "models": models,
        "headline": [headline_row(name, entry) for name, entry in models.items()],
        "serving": serving,
        "tasks_note": (demo.steps.done("evaluate/tasks") or {}).get("note"),
        "stage_seconds": stage_seconds,
        "plots": dict(PLOTS),
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.2e}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]


HEADLINE_COLUMNS = [
    "model",
    "loops",
    "params (M)",
    "× source",
    "held-out ppl",
    "KL to original",
    "KL before uptrain",
    "oracle loops",
    "MC acc",
]
HEADLINE_KEYS = ["model", "loops", "params_m", "ratio", "ppl", "kl", "kl_before", "oracle_loops", "acc"]


def headline_table(report: dict[str, Any]) -> str:
    """The models table (markdown), also what the demo prints at the end."""
    return "\n".join(_table(HEADLINE_COLUMNS, [[row[key] for key in HEADLINE_KEYS] for row in report["headline"]]))


def serving_table(report: dict[str, Any]) -> str:
    serving = report["serving"]
    rows = [
        [
            row["name"],
            row["tokens_per_s"],
            serving["ratios"]["vs_static"][row["name"]],
            row["mean_loops"],
            row["agreement"],
            row.get("positional_agreement"),
            row.get("identical_output"),
            row["ttft_p50_ms"],
        ]
        for row in serving["rows"]
    ]
    header = ["configuration", "tokens/s", "× vanilla static", "mean loops", "agreement", "positional agreement", "identical output"]
    lines = _table([*header, "TTFT p50 (ms)"], rows)
    extra = {key: value for key, value in serving["ratios"].items() if key not in ("vs_static", "vs_sequence")}
    lines += [""] + [f"- {key}: {value:.2f}" for key, value in extra.items()]
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    """report.md: what ran where, the tables, the plots and the commands to reproduce every row."""
    options, budget, host = report["options"], report["budget"], report["machine"]
    total_min = sum(report["stage_seconds"].values()) / 60
    budget_flag = "--quick" if options["quick"] else f"--minutes {options['minutes']:g}"
    lines = [
        "# recursify demo report",
        "",
        f"Generated {report['generated']} on {host['platform']} ({host['processor']}, {host['cpus']} CPUs, torch {host['torch']}, "
        f"{host['torch_threads']} threads); commands took {total_min:.1f} minutes in total.",
        "",
        f"Source model `{options['model']}`; data `{options['data'] or 'teacher:N (text sampled from the source model)'}`; "
        f"{budget_flag}. Budget per model: {budget['train_tokens']} "
        f"uptraining tokens (early-exit post-training: {budget['exit_tokens']}), evaluation on {budget['eval_tokens']} held-out tokens.",
        "",
        "## Models",
        "",
        "KL is KL(original ‖ model) in nats per token on held-out text, at the last loop; *KL before uptrain* is the same at conversion "
        "(on the uptraining run's held-out slice). *Oracle loops*: mean loops a token needs before its prediction equals the final one. "
        "On text sampled from the original at temperature 1 (the default data) the original's own perplexity is exp(its entropy), "
        "so compare models by KL and by their perplexity relative to the original's.",
        "",
        headline_table(report),
        "",
    ]
    if report.get("tasks_note"):
        lines += [f"Multiple choice: {report['tasks_note']}.", ""]
    exit_name = EXIT_MODEL + EXITS_SUFFIX
    per_loop = report["models"][exit_name]["eval"].get("per_loop", [])
    if per_loop:
        lines += [f"### Per-loop exits of {exit_name}", ""]
        rows = [[e["loop"], e["ppl"], e.get("kl_teacher"), e["agree_final"]] for e in per_loop]
        lines += _table(["exit after loop", "ppl", "KL to original", "agreement with final"], rows) + [""]
    lines += ["## Serving", "", f"`{report['serving']['command']}`", "", serving_table(report), ""]
    lines += [
        "*agreement*: generated tokens equal to the same model's full-depth greedy token after the same prefix; *positional "
        "agreement*: equal, position by position, to its no-exit output; rows 5g / 5s: gate and saturation exits at the "
        "calibrated agreement; row 7: self-speculative decoding (draft with loop 1) against greedy decoding at the same batch.",
        "",
    ]
    lines += ["## Plots", ""] + [f"![{name}]({path})" for name, path in report["plots"].items()] + [""]
    lines += ["## Commands to reproduce each row", ""]
    for name, entry in report["models"].items():
        lines += [f"**{name}** — {entry['description']} ({entry['seconds']:.0f} s)", "", "```"] + entry["commands"] + ["```", ""]
    return "\n".join(lines)


def write_report(demo: Demo, report: dict[str, Any]) -> None:
    """report.json, report.md and the plots; prints the headline table."""
    from recursify.demo.plots import exit_histogram_plot, loss_curves_plot, throughput_plot
    from recursify.evaluation.plots import exit_plot, pareto_plot
    from recursify.evaluation.report import EvalReport
    from recursify.training.metrics import METRICS_FILE, read_metrics

    root = demo.root
    reports = [EvalReport.from_dict({**entry["eval"], "model": name}) for name, entry in report["models"].items()]
    pareto_plot(reports, root / PLOTS["pareto"])
    exit_plot([r for r in reports if r.loops > 1], root / PLOTS["exits"])
    runs = {name: read_metrics(Path(entry["path"]) / METRICS_FILE) for name, entry in report["models"].items() if "uptrain" in entry}
    loss_curves_plot(runs, root / PLOTS["loss_curves"])
    oracle = {name: entry["eval"].get("oracle_exit", {}) for name, entry in report["models"].items()}
    histograms = {name: exits["histogram"] for name, exits in oracle.items() if len(exits.get("histogram", [])) > 1}  # recursive ones
    exit_histogram_plot(histograms, root / PLOTS["exit_histogram"])
    throughput_plot(report["serving"]["rows"], root / PLOTS["throughput"])
    write_json(root / "report.json", report)
    write_text(root / "report.md", format_markdown(report))
    demo.progress.say("\n" + headline_table(report) + "\n\n" + serving_table(report))
    demo.progress.say(f"\nreport: {root / 'report.md'} (numbers in {root / 'report.json'}, plots in {root / 'plots'})")
