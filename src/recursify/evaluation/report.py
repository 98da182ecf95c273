"""Evaluation reports: the JSON contract scripts rely on, and markdown tables for humans.

JSON of one model (keys absent when not computed; ``per_loop`` entries lack the teacher keys
without a teacher)::

    {"model", "ppl": {"value", "tokens", "ctx", "stride"},
     "per_loop": [{"loop", "ppl", "agree_final", "kl_teacher", "agree_teacher"}],
     "oracle_exit": {"histogram", "mean_loops"},
     "tasks": {"<name>": {"acc", "acc_norm", "n", "shots"}}, "params": {...}}

``oracle_exit.histogram[i]`` counts tokens whose oracle exit is loop ``i + 1``. ``compare`` writes
``{"models": [<one such object per model>]}``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from recursify.evaluation.exits import LoopMetrics, OracleExits
from recursify.evaluation.multiple_choice import TaskResult
from recursify.evaluation.perplexity import PerplexityResult


@dataclass
class EvalReport:
    """Everything measured on one model.

    Attributes:
        model: the checkpoint directory or source spec, as given.
        params: ``RecursiveModel.param_counts()``.
        loops: recursion loops (1 = an original model); not part of the JSON contract.
        ppl: perplexity results, when ``--ppl`` was given.
        tasks: multiple-choice results by task name.
    """

    model: str
    params: dict[str, Any]
    loops: int = 1
    ppl: PerplexityResult | None = None
    tasks: dict[str, TaskResult] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract (see the module docstring)."""
        out: dict[str, Any] = {"model": self.model}
        if self.ppl is not None:
            out["ppl"] = {"value": self.ppl.value, "tokens": self.ppl.tokens, "ctx": self.ppl.ctx, "stride": self.ppl.stride}
            if self.ppl.per_loop is not None:
                out["per_loop"] = [{k: v for k, v in asdict(entry).items() if v is not None} for entry in self.ppl.per_loop]
            if self.ppl.oracle is not None:
                out["oracle_exit"] = asdict(self.ppl.oracle)
        if self.tasks:
            out["tasks"] = {name: asdict(result) for name, result in self.tasks.items()}
        out["params"] = dict(self.params)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        """Rebuild a report from its JSON (``to_dict``), e.g. to plot saved ``recursify eval --json`` results.

        ``loops`` is not in the JSON; it is the number of ``per_loop`` entries (1 without them).
        """
        report = cls(model=data["model"], params=dict(data["params"]), loops=len(data.get("per_loop", [])) or 1)
        if "ppl" in data:
            ppl = data["ppl"]
            per_loop = [LoopMetrics(**entry) for entry in data["per_loop"]] if "per_loop" in data else None
            oracle = OracleExits(**data["oracle_exit"]) if "oracle_exit" in data else None
            nll = math.log(ppl["value"]) * ppl["tokens"]
            report.ppl = PerplexityResult(ppl["value"], nll, ppl["tokens"], ppl["ctx"], ppl["stride"], per_loop, oracle)
        report.tasks = {name: TaskResult(**result) for name, result in data.get("tasks", {}).items()}
        return report

    @property
    def layer_params(self) -> int:
        """Non-embedding parameters including LoRA: the size axis of the Pareto plot."""
        return int(self.params["non_embedding"]) + int(self.params["lora"])

    def mean_accuracy(self) -> float | None:
        """acc averaged over tasks (None without tasks)."""
        return sum(r.acc for r in self.tasks.values()) / len(self.tasks) if self.tasks else None


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1e5:
        return f"{value:.3g}"
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def format_markdown(report: EvalReport) -> str:
    """A human-readable summary of one model: perplexity, per-loop table, oracle exits, tasks, size."""
    params = report.params
    lines = [f"## {report.model}", ""]
    lines.append(
        f"parameters: non-embedding {params['non_embedding'] / 1e6:.2f}M + LoRA {params['lora'] / 1e6:.2f}M + "
        f"embedding {params['embedding'] / 1e6:.2f}M = {params['total'] / 1e6:.2f}M ({params['ratio']:.3f} of the source)"
    )
    if report.ppl is not None:
        ppl = report.ppl
        lines += ["", f"perplexity: **{_number(ppl.value)}** over {ppl.tokens:,} tokens (ctx {ppl.ctx}, stride {ppl.stride})"]
        if ppl.per_loop:
            teacher = ppl.per_loop[0].kl_teacher is not None
            header = ["loop", "ppl", "agree final"] + (["KL(teacher‖exit)", "agree teacher"] if teacher else [])
            rows = []
            for entry in ppl.per_loop:
                row = [str(entry.loop), _number(entry.ppl), _number(entry.agree_final)]
                if teacher:
                    row += [_number(entry.kl_teacher), _number(entry.agree_teacher)]
                rows.append(row)
            lines += [""] + _table(header, rows)
        if ppl.oracle is not None:
            histogram = ", ".join(f"loop {i + 1}: {count}" for i, count in enumerate(ppl.oracle.histogram))
            lines += ["", f"oracle exits: {histogram}; mean loops per token {ppl.oracle.mean_loops:.3f}"]
    if report.tasks:
        rows = [[name, _number(r.acc), _number(r.acc_norm), str(r.n), str(r.shots)] for name, r in report.tasks.items()]
        lines += [""] + _table(["task", "acc", "acc_norm", "n", "shots"], rows)
    return "\n".join(lines)


def format_comparison(reports: list[EvalReport]) -> str:
    """One row per model: size, perplexity, oracle mean loops and every task's acc / acc_norm."""
    task_names = list(dict.fromkeys(name for report in reports for name in report.tasks))
    header = ["model", "loops", "non-emb+LoRA (M)", "ratio", "ppl", "oracle loops"]
    header += [f"{name} acc / acc_norm" for name in task_names]
    rows = []
    for report in reports:
        ppl = report.ppl
        row = [
            report.model,
            str(report.loops),
            f"{report.layer_params / 1e6:.2f}",
            f"{report.params['ratio']:.3f}",
            _number(ppl.value) if ppl else "–",
            _number(ppl.oracle.mean_loops) if ppl and ppl.oracle else "–",
        ]
        for name in task_names:
            result = report.tasks.get(name)
            row.append(f"{_number(result.acc)} / {_number(result.acc_norm)}" if result else "–")
        rows.append(row)
    return "\n".join(_table(header, rows))
