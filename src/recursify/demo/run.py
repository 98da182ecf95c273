"""``recursify demo``: convert, uptrain, evaluate and serve the embedded model end to end, with a report.

Layout of a run directory (``--out``, default ``runs/demo``)::

    demo.json           options, measured speeds and the planned budget (fixed at the first run)
    convert/<name>/     converted checkpoints          uptrain/<name>/   uptrained checkpoints (+ metrics.jsonl)
    eval/<name>.json    ``recursify eval --json``      serve.json        ``recursify bench-serve --json``
    state/, logs/       step markers and each command's printed output
    report.md, report.json, plots/*.png
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from recursify.demo.plan import (
    DEFAULT_TASKS,
    EXIT_MODEL,
    EXITS_SUFFIX,
    GRID,
    QUICK_BUDGET,
    UPTRAIN_EVALS,
    Budget,
    DemoOptions,
    ModelSpec,
    plan_budget,
)
from recursify.demo.steps import Execute, Progress, StepLog, run_step
from recursify.errors import CheckpointError, ConfigError, RecursifyError
from recursify.files import write_json

DEMO_FILE = "demo.json"
# Exit training that cannot hurt the last loop: per-loop exit heads (rank 64) learn to agree with the final loop
# (self-distillation) while every parameter the last loop depends on stays frozen. Training the whole model on
# exit losses (the earlier recipe, aggressive:0.1 --self-distill) moved the last loop's KL from 4.3 to 6.3 nats.
EXIT_TRAINING = ["--exit-loss", "aggressive:1", "--early-exit-target", "final", "--exit-heads", "64", "--freeze-model"]
SPECULATIVE = "1x4"  # the serving stage's self-speculation: draft 4 tokens with loop 1
AGREEMENT = "0.95"  # the serving stage's calibrated exits


class Demo:
    """One run directory and the commands that fill it; every stage skips what an earlier run finished."""

    def __init__(self, options: DemoOptions, execute: Execute, fresh: bool = False, progress: Progress | None = None):
        self.options = options
        self.root = Path(options.out)
        self.steps = StepLog(self.root, execute)
        self.progress = progress or Progress()
        self.plan: dict[str, Any] = self._saved_plan(fresh)  # empty for a new run; the model stage fills it

    def _saved_plan(self, fresh: bool) -> dict[str, Any]:
        """The plan of an earlier run in ``out`` (checked against these options), or {} to start anew."""
        saved = self.root / DEMO_FILE
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"--out {self.root} is a file; give a directory for the demo run")
        if self.root.exists() and any(self.root.iterdir()) and not saved.is_file():
            raise ConfigError(f"{self.root} exists and is not a demo run directory; pick another --out or remove it")
        if fresh and saved.is_file():
            shutil.rmtree(self.root)
        if not saved.is_file():
            return {}
        plan: dict[str, Any] = json.loads(saved.read_text(encoding="utf-8"))
        previous = plan["options"]
        changed = [f"{k} was {previous.get(k)!r}, now {v!r}" for k, v in self.options.to_dict().items() if previous.get(k) != v]
        if changed:
            raise ConfigError(
                f"{self.root} holds a demo run made with other options ({'; '.join(changed)}); "
                "rerun with the same options to continue it, or add --fresh to start over"
            )
        return plan

    # paths --------------------------------------------------------------------------------------
    def converted(self, name: str) -> Path:
        return self.root / "convert" / name

    def uptrained(self, name: str) -> Path:
        return self.root / "uptrain" / name

    def eval_json(self, name: str) -> Path:
        return self.root / "eval" / f"{name}.json"

    @property
    def budget(self) -> Budget:
        return Budget.from_dict(self.plan["budget"])

    @property
    def data_spec(self) -> str:
        return self.options.data or f"teacher:{self.budget.train_tokens}"

    # stages -------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """All stages in order; returns report.json's content."""
        from recursify.demo.report import build_report, write_report

        self.stage_model()
        self.stage_convert()
        self.stage_uptrain()
        self.stage_evaluate()
        self.stage_serve()
        self.progress.stage("report")
        report = build_report(self)
        write_report(self, report)
        return report

    def stage_model(self) -> None:
        """Fetch the source (cached), print its parameter table, measure speeds and plan the budget."""
        from recursify.demo.probe import measure_speeds, model_shape
        from recursify.info import format_model_info, model_info
        from recursify.loading import load
        from recursify.sources import quiet_transformers

        self.progress.stage("model")
        began = time.perf_counter()
        if self.plan:
            self.progress.say(f"  continuing the run in {self.root} (budget fixed at its start; --fresh redoes it)")
            return
        quiet_transformers()
        model = load(self.options.model)
        info = model_info(model)
        self.progress.say(format_model_info(info))
        if self.options.quick:
            budget, speeds = QUICK_BUDGET, None
        else:
            self.progress.say("  measuring this machine's speed to size the run to --minutes ...")
            speeds = measure_speeds(model, self.options.seed)
            budget = plan_budget(self.options.minutes, speeds, model_shape(model))
        self.plan = {
            "options": self.options.to_dict(),
            "speeds_tokens_per_s": asdict(speeds) if speeds is not None else None,
            "budget": budget.to_dict(),
            "source": {"spec": self.options.model, "params": info["params"], "layers": info["depths"]},
        }
        write_json(self.root / DEMO_FILE, self.plan)
        self.steps.record("model/plan", {"seconds": round(time.perf_counter() - began, 2)})
        self.progress.say(
            f"  budget: {budget.train_tokens} training tokens per model, {budget.exit_tokens} for exits, "
            f"{budget.eval_tokens} evaluation tokens, {budget.requests} serving requests"
        )

    def stage_convert(self) -> None:
        self.progress.stage("convert")
        for spec in GRID:
            out = self.converted(spec.name)
            run_step(self.steps, self.progress, f"convert/{spec.name}", self.convert_argv(spec), restart=_overwrite_if_exists(out))

    def convert_argv(self, spec: ModelSpec) -> list[str]:
        argv = ["convert", "--model", self.options.model]
        if spec.keep_fraction:
            argv += ["--keep-layers", str(max(1, round(spec.keep_fraction * self.source_layers()))), "--drop-by", "influence"]
        else:
            argv += ["--loops", str(spec.loops), "--init", spec.init, "--rank", str(spec.rank)]
            argv += ["--prelude", str(spec.prelude), "--coda", str(spec.coda)] if spec.prelude or spec.coda else []
            argv += ["--lora-init", spec.lora_init] if spec.calibrated else []
        if spec.calibrated:
            argv += ["--calib", self.data_spec, "--calib-tokens", str(min(self.budget.calib_tokens, self.budget.train_tokens))]
        return argv + ["--seed", str(self.options.seed), "--out", str(self.converted(spec.name))]

    def source_layers(self) -> int:
        """The source model's layer count (recorded with the plan; read from the model for runs planned before)."""
        source = self.plan["source"]
        if "layers" not in source:
            from recursify.loading import load

            source["layers"] = load(self.options.model).num_depths
        return int(source["layers"])

    def stage_uptrain(self) -> None:
        self.progress.stage("uptrain")
        budget = self.budget
        for spec in GRID:
            argv = self.uptrain_argv(self.converted(spec.name), self.uptrained(spec.name), budget.train_tokens)
            run_step(self.steps, self.progress, f"uptrain/{spec.name}", argv, restart=_resume_or_overwrite(self.uptrained(spec.name)))
        exits = self.uptrained(EXIT_MODEL + EXITS_SUFFIX)
        argv = self.uptrain_argv(self.uptrained(EXIT_MODEL), exits, budget.exit_tokens) + EXIT_TRAINING
        run_step(self.steps, self.progress, f"uptrain/{EXIT_MODEL}{EXITS_SUFFIX}", argv, restart=_resume_or_overwrite(exits))
        argv = ["train-exits", str(exits), "--data", self.data_spec, "--teacher", self.options.model, "--tokens", str(budget.exit_tokens)]
        argv += ["--calib-tokens", str(budget.eval_tokens), "--window", str(budget.seq_len), "--seed", str(self.options.seed), "--quiet"]
        run_step(self.steps, self.progress, f"exits/{EXIT_MODEL}{EXITS_SUFFIX}", argv)  # gates + calibration, into the checkpoint

    def uptrain_argv(self, student: Path, out: Path, tokens: int) -> list[str]:
        budget = self.budget
        steps = max(1, tokens // budget.batch_tokens)
        argv = ["uptrain", str(student), "--teacher", self.options.model, "--data", self.data_spec, "--tokens", str(tokens)]
        argv += ["--teacher-cache"]  # every run distils on the same rows: the teacher runs over them once
        argv += ["--seq-len", str(budget.seq_len), "--batch-tokens", str(budget.batch_tokens), "--micro-batch", str(budget.micro_batch)]
        every = str(max(1, steps // (UPTRAIN_EVALS - 1)))  # evaluations before, in between and after
        argv += ["--lr", str(budget.lr), "--eval-tokens", str(budget.uptrain_eval_tokens), "--eval-every", every]
        return argv + ["--save-every", every, "--seed", str(self.options.seed), "--out", str(out)]

    def evaluated_models(self) -> dict[str, str]:
        """Report name -> what ``recursify eval`` opens: the original, the uptrained grid, the exit-trained model."""
        models = {"original": self.options.model}
        models.update({spec.name: str(self.uptrained(spec.name)) for spec in GRID})
        models[EXIT_MODEL + EXITS_SUFFIX] = str(self.uptrained(EXIT_MODEL + EXITS_SUFFIX))
        return models

    def stage_evaluate(self) -> None:
        self.progress.stage("evaluate")
        tasks = self.tasks()
        budget = self.budget
        for name, path in self.evaluated_models().items():
            argv = ["eval", path, "--ppl", self.data_spec, "--max-tokens", str(budget.eval_tokens), "--ctx", str(budget.ctx)]
            argv += ["--teacher", self.options.model]  # KL per loop; the original's own KL of 0 is the check
            if tasks:
                argv += ["--tasks", *tasks, "--limit", str(budget.task_limit)]
            argv += ["--seed", str(self.options.seed), "--json", str(self.eval_json(name))]
            run_step(self.steps, self.progress, f"evaluate/{name}", argv)

    def tasks(self) -> list[str]:
        """The multiple-choice tasks, decided once: the user's, or the defaults when cached or fetchable."""
        from recursify.evaluation.bigbench import bigbench_root, fetch_bigbench

        key = "evaluate/tasks"
        decided = self.steps.done(key)
        if decided is None:
            tasks, note = list(self.options.tasks or []), None
            if self.options.tasks is None:
                tasks = list(DEFAULT_TASKS)
                if self.options.quick and not bigbench_root().is_dir():
                    tasks, note = [], "BIG-bench task files are not cached and --quick does not fetch them (~1.7 GB once)"
                elif not bigbench_root().is_dir():
                    self.progress.say("  fetching BIG-bench task files from PyPI once (about a minute) ...")
                    try:
                        fetch_bigbench()
                    except RecursifyError as err:
                        tasks, note = [], f"could not fetch BIG-bench task files: {err}"
            decided = self.steps.record(key, {"tasks": tasks, "note": note, "seconds": 0.0})
        if decided["note"]:
            self.progress.say(f"  multiple choice skipped: {decided['note']}")
        return list(decided["tasks"])

    def stage_serve(self) -> None:
        self.progress.stage("serve")
        budget = self.budget
        argv = ["bench-serve", str(self.uptrained(EXIT_MODEL + EXITS_SUFFIX)), "--baseline", self.options.model]
        argv += ["--requests", str(budget.requests), "--arrival", "all", "--max-batch", str(budget.max_batch)]
        argv += ["--prompt-tokens", "{},{}".format(*budget.prompt_tokens), "--new-tokens", "{},{}".format(*budget.new_tokens)]
        argv += ["--exit", f"agreement:{AGREEMENT}:confidence", "--agreement-target", AGREEMENT, "--speculative", SPECULATIVE]
        argv += ["--single-requests", str(max(1, budget.requests // 4))]
        argv += ["--seed", str(self.options.seed), "--json", str(self.root / "serve.json")]
        run_step(self.steps, self.progress, "serve/bench", argv)


def _overwrite_if_exists(path: Path) -> Callable[[], list[str]]:
    return lambda: ["--overwrite"] if path.exists() else []


def _resume_or_overwrite(path: Path) -> Callable[[], list[str]]:
    """``--resume`` when an interrupted uptraining left a checkpoint, ``--overwrite`` when it left only files."""

    def flags() -> list[str]:
        from recursify.training.checkpointing import latest_checkpoint

        try:
            latest_checkpoint(path)
            return ["--resume"]
        except CheckpointError:
            return ["--overwrite"] if path.exists() else []

    return flags


def run_demo(options: DemoOptions, execute: Execute, fresh: bool = False) -> dict[str, Any]:
    """Run (or continue) the demo; returns the report (also written to ``OUT/report.json``).

    ``execute`` runs one ``recursify ARGV`` command in this process (the CLI hands in its ``run_command``).
    """
    return Demo(options, execute, fresh).run()
