"""Which BIG-bench multiple-choice tasks a model answers clearly above chance.

Run: OMP_NUM_THREADS=1 python benchmarks/bigbench_tasks.py [--model smollm2-135m] [--tasks NAME ...] [--limit 50] [--shots 0]
Writes benchmarks/results/bigbench_tasks.json (one row per model x task x shots; rows of earlier runs with
other keys are kept, so a second run with ``--shots 3 --tasks ...`` adds to the first) and prints a table.

Each task is scored by recursify's own multiple-choice evaluation (``evaluate_task``: BIG-bench's prompt
format, lm-evaluation-harness's acc and acc_norm) on its first ``--limit`` examples. Against that:

- ``chance``: the accuracy of uniform random guessing on exactly the questions scored, the mean over
  questions of #gold / #choices, and ``se`` its standard error (``chance_accuracy``);
- ``z = (acc - chance) / se`` for acc and for acc_norm;
- ``const``: the accuracy of always giving the one answer text that is most often correct among these
  questions (``constant_answer_accuracy``): what a model biased towards "True" or "Yes" scores for free
  on binary tasks whose first examples are unbalanced.

A metric is *above chance* when z >= 2 and it also beats ``const``; the ``above`` column names the metrics
that are. The default task list is a curated set of multiple-choice tasks with short prompts (a 135M model
on a shared 2-core CPU); tasks with long few-shot prefixes or long inputs (analogical_similarity, timedial,
temporal_sequences, causal_judgment, logical_args) were left out for cost.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

import recursify
from recursify.evaluation.bigbench import bigbench_task_path
from recursify.evaluation.multiple_choice import (
    build_questions,
    chance_accuracy,
    constant_answer_accuracy,
    evaluate_task,
    load_task,
)
from recursify.files import write_json

RESULTS = Path(__file__).parent / "results" / "bigbench_tasks.json"
Z_ABOVE = 2.0
TASKS = (
    "general_knowledge",
    "hindu_knowledge",
    "emoji_movie",
    "anachronisms",
    "code_line_description",
    "crass_ai",
    "date_understanding",
    "fantasy_reasoning",
    "human_organs_senses",
    "implicatures",
    "metaphor_boolean",
    "misconceptions",
    "navigate",
    "novel_concepts",
    "odd_one_out",
    "physical_intuition",
    "riddle_sense",
    "snarks",
    "winowhy",
    "sports_understanding",
    "known_unknowns",
    "social_iqa",
    "disambiguation_qa",
    "hyperbaton",
    "movie_recommendation",
    "ruin_names",
)


def scan_task(model: recursify.RecursiveModel, name: str, args: argparse.Namespace, shots: int) -> dict[str, Any]:
    """One row: accuracy, the chance and constant-answer baselines of the questions scored, z, seconds."""
    task = load_task(bigbench_task_path(name), name)
    questions = build_questions(task, shots, args.seed, args.limit)
    chance, se = chance_accuracy(questions)
    const, const_answer = constant_answer_accuracy(questions)
    start = time.perf_counter()
    result = evaluate_task(model, task, shots=shots, seed=args.seed, limit=args.limit, batch_size=args.batch_size, precision=args.precision)
    seconds = time.perf_counter() - start
    metrics = {"acc": result.acc, "acc_norm": result.acc_norm}
    z = {metric: (value - chance) / se if se > 0 else math.inf for metric, value in metrics.items()}
    return {
        "model": args.model,
        "task": name,
        "shots": shots,
        "limit": args.limit,
        "seed": args.seed,
        "n": result.n,
        "acc": result.acc,
        "acc_norm": result.acc_norm,
        "acc_stderr": math.sqrt(result.acc * (1 - result.acc) / result.n),
        "chance": chance,
        "se": se,
        "z_acc": z["acc"],
        "z_acc_norm": z["acc_norm"],
        "const": const,
        "const_answer": const_answer,
        "above": [metric for metric, value in metrics.items() if z[metric] >= Z_ABOVE and value > const],
        "seconds": seconds,
    }


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return row["model"], row["task"], row["shots"], row["limit"], row["seed"], row["precision"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="any source or checkpoint recursify.load opens")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="BIG-bench task names (default: a curated list)")
    parser.add_argument("--limit", type=int, default=50, help="questions per task (the first ones)")
    parser.add_argument("--shots", type=int, nargs="+", default=[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    command = shlex.join(["python", *sys.argv])
    if os.environ.get("OMP_NUM_THREADS"):
        command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} {command}"

    model = recursify.load(args.model)
    rows: list[dict[str, Any]] = []
    print(f"{'task':<28}{'shots':>6}{'n':>5}{'acc':>7}{'norm':>7}{'chance':>8}{'const':>7}{'z acc':>7}{'z norm':>8}{'s':>6}  above")
    for shots in args.shots:
        for name in args.tasks:
            row = scan_task(model, name, args, shots) | {"precision": args.precision, "command": command}
            rows.append(row)
            print(
                f"{name:<28}{shots:>6}{row['n']:>5}{row['acc']:>7.3f}{row['acc_norm']:>7.3f}{row['chance']:>8.3f}"
                f"{row['const']:>7.2f}{row['z_acc']:>7.1f}{row['z_acc_norm']:>8.1f}{row['seconds']:>6.0f}  {','.join(row['above'])}",
                flush=True,
            )
            _save(args.out, rows)
    print(f"wrote {args.out}")


def _save(path: Path, rows: list[dict[str, Any]]) -> None:
    """Merge this run's rows into the file: a row of an earlier run survives unless this run re-measured its key."""
    earlier = json.loads(path.read_text())["rows"] if path.is_file() else []
    measured = {_key(row) for row in rows}
    merged = [row for row in earlier if _key(row) not in measured] + rows
    payload = {
        "z_above": Z_ABOVE,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "commands": sorted({row["command"] for row in merged}),
        "rows": merged,
    }
    write_json(path, payload)


if __name__ == "__main__":
    main()
