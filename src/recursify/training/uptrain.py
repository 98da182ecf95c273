"""The uptraining recipe: KD from the original model (online teacher), early-exit losses, resumable.

``uptrain(config)`` runs the same on one CPU process and under ``accelerate launch`` (DDP: every
process takes an equal slice of each global batch, gradients are averaged, so the loss curve matches
the single-process run with the same global batch).

The recipe is a few phases over one explicit state, an ``UptrainRun``:

- ``setup(config)`` does everything before the first step: checks the output directory (a fresh
  run, or ``--resume`` with the same options and data), starts accelerate, picks the precision,
  loads student, teacher and data, builds optimizer and learning-rate scheduler, and restores them
  from the checkpoint being resumed. The run it returns is complete: no phase builds state later.
- ``UptrainRun.train_step()`` is one optimizer step over one global batch: this process's rows in
  micro-batches (gradients synchronised on the last), clipping, a finite check (a non-finite loss
  or gradient stops the run before the update, keeping the last good checkpoint), the log record.
- ``UptrainRun.evaluate()`` and ``UptrainRun.save()``: held-out metrics and an atomic checkpoint
  (``checkpointing``), each on its own cadence and after the last step.
- ``uptrain(config)`` drives them: setup, the evaluation before training, then steps until the
  token budget is covered or the CPU budget (``budget``) is spent. The CPU budget starts with the
  first step and is paused while evaluating and saving, so it measures training alone.

Resume is exact because every input of a step is either a pure function of (step, seed) (the batch
rows, ``schedule.batch_rows``) or saved in the checkpoint (weights, optimizer, scheduler, RNG
states, CPU seconds used).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from recursify.checkpoint import check_writable, is_checkpoint
from recursify.data import load_tokens, pack
from recursify.errors import CheckpointError, ConfigError, DataError, TrainingError
from recursify.loading import load
from recursify.modeling.model import RecursiveModel
from recursify.text import precision_context, require_tokenizer
from recursify.training import checkpointing
from recursify.training.budget import CpuBudget, budget_lr_factor
from recursify.training.common import (
    BETAS,
    ExitModel,
    check_tokenizers,
    exit_metrics,
    heldout_rows,
    open_teacher,
    resolve_precision,
    teacher_logits,
)
from recursify.training.config import UptrainConfig
from recursify.training.exit_ensemble import ExitEnsemble, load_exit_ensemble
from recursify.training.losses import SparseTargets, uptrain_loss
from recursify.training.metrics import MetricsLog
from recursify.training.params import apply_freeze, enable_gradient_checkpointing, param_groups
from recursify.training.schedule import batch_rows, lr_factor
from recursify.training.teacher_cache import teacher_targets

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class RunPlan:
    """Batch geometry derived from the config and the number of processes."""

    seq_len: int
    rows_per_step: int
    rows_per_process: int
    total_steps: int
    warmup_steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.rows_per_step * self.seq_len


def plan_run(config: UptrainConfig, world_size: int) -> RunPlan:
    """Rows per step (a multiple of the process count), steps to cover the token budget, warmup."""
    rows = max(world_size, (config.batch_tokens // config.seq_len) // world_size * world_size)
    total = math.ceil(config.tokens / (rows * config.seq_len))
    warmup = config.warmup_steps if config.warmup_steps is not None else round(0.05 * total)
    return RunPlan(config.seq_len, rows, rows // world_size, total, warmup)


@dataclass
class UptrainRun:
    """The state of an uptraining run between phases: what ``setup`` built, and how far it has got.

    ``model`` and ``optimizer`` are as ``accelerator.prepare`` returned them (DDP-wrapped under a
    multi-process launch). ``log`` is None on processes other than the main one, which do not
    write. ``step`` counts optimizer steps done; ``last_saved`` is the step of the newest checkpoint.
    """

    config: UptrainConfig
    out: Path
    accelerator: Accelerator
    plan: RunPlan
    precision: str
    model: nn.Module
    teacher: RecursiveModel | None
    first_exit: int  # the first exit the loss reads (only the last is computed without exit losses)
    rows: torch.Tensor  # [rows, seq_len] packed training tokens
    data_sha: str
    heldout: torch.Tensor | None  # [rows, <= seq_len] held-out tokens; None without evaluation
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    budget: CpuBudget  # not started until the first step
    targets: SparseTargets | None  # [rows, seq_len, k] cached teacher top-k (--teacher-cache); None = online teacher
    cache_info: dict[str, Any] | None  # what the cache cost (teacher_cache.teacher_targets)
    log: MetricsLog | None
    resumed: bool
    step: int
    tokens_seen: int
    last_saved: int
    speeds: list[float] = field(default_factory=list)  # tokens/s of every step of this process
    evals: dict[str, dict[str, float]] = field(default_factory=dict)  # "eval_before" / "eval_after" -> metrics

    def train_step(self) -> dict[str, float]:
        """One optimizer step over global batch ``step``; returns its metrics (averaged over processes)."""
        began = time.perf_counter()
        plan, index = self.plan, self.accelerator.process_index
        global_rows = batch_rows(self.step, plan.rows_per_step, self.rows.shape[0], self.config.seed)
        local = global_rows[index * plan.rows_per_process : (index + 1) * plan.rows_per_process]
        metrics = self._forward_backward(local)
        clip = self.config.clip if self.config.clip > 0 else math.inf
        metrics["grad_norm"] = float(self.accelerator.clip_grad_norm_(self.model.parameters(), clip))
        if not all(math.isfinite(v) for v in metrics.values()):
            bad = ", ".join(f"{k}={v}" for k, v in metrics.items() if not math.isfinite(v))
            raise TrainingError(
                f"non-finite values at step {self.step + 1} ({bad}); stopped without updating. The last good checkpoint "
                f"(step {self.last_saved}) is kept in {self.out}: lower --lr, keep --clip on or use --precision fp32, then --resume"
            )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += plan.tokens_per_step
        speed = plan.tokens_per_step / (time.perf_counter() - began)
        self.speeds.append(speed)
        if self.log is not None:
            record = {"event": "train", "step": self.step, "tokens": self.tokens_seen, "lr": lr, "tokens_per_s": speed}
            self.log.write({**record, "cpu_s": self.budget.used(), **metrics})
        return metrics

    def _forward_backward(self, local: torch.Tensor) -> dict[str, float]:
        """Forward/backward over the micro-batches of this process's rows (indices ``local``); metrics averaged over processes."""
        device = self.accelerator.device
        chunks = local.split(self.config.micro_batch)
        totals: dict[str, float] = {}
        for index, rows in enumerate(chunks):
            chunk = self.rows[rows].to(device)
            sync = index == len(chunks) - 1  # DDP all-reduces gradients once, after the last micro-batch
            with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model):
                with precision_context(self.precision, device):
                    exit_logits = self.model(chunk)
                    targets = self.targets[rows].to(device) if self.targets is not None else teacher_logits(self.teacher, chunk)
                loss, metrics = uptrain_loss(exit_logits, chunk, targets, self.config.loss, self.first_exit)
                share = rows.shape[0] / local.shape[0]
                self.accelerator.backward(loss * share)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value * share
        keys = sorted(totals)
        reduced = self.accelerator.reduce(torch.tensor([totals[k] for k in keys], device=device), reduction="mean")
        return dict(zip(keys, reduced.tolist(), strict=True))

    def budget_spent(self) -> bool:
        """Whether the CPU budget is spent, agreed by all processes (their mean CPU time decides)."""
        used = self.accelerator.reduce(torch.tensor([self.budget.used()], device=self.accelerator.device), reduction="mean")
        return float(used) >= self.budget.seconds

    def evaluate(self) -> None:
        """Held-out metrics at the current step, logged as an "eval" record (main process only)."""
        if self.heldout is None or self.log is None:
            return
        cpu_s = self.budget.used()  # read first: the evaluation itself does not count
        model = self.accelerator.unwrap_model(self.model)
        metrics = exit_metrics(model, self.teacher, self.heldout, self.config.micro_batch, self.precision)
        self.log.write({"event": "eval", "step": self.step, "tokens": self.tokens_seen, "cpu_s": cpu_s, **metrics})
        self.evals["eval_before" if self.step == 0 else "eval_after"] = metrics

    def save(self) -> None:
        """An atomic checkpoint of the current step (written by the main process; all processes wait for it)."""
        state = self.accelerator.get_state_dict(self.model)
        if self.accelerator.is_main_process:
            student_state = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
            ensemble_state = {k.removeprefix("ensemble."): v for k, v in state.items() if k.startswith("ensemble.")} or None
            extra = {"config": self.config.to_dict(), "data_sha256": self.data_sha, "world_size": self.accelerator.num_processes}
            extra["cpu_seconds"] = self.budget.used()
            checkpointing.save_checkpoint(
                self.out, self.step, self.tokens_seen, student_state, self.optimizer, self.scheduler, ensemble_state, extra
            )
        self.accelerator.wait_for_everyone()
        self.last_saved = self.step

    def summary(self) -> dict[str, Any]:
        """What ``uptrain`` returns: the plan, the evaluations before and after, speed, tokens, steps, CPU-minutes."""
        plan, num_rows = self.plan, int(self.rows.shape[0])
        summary: dict[str, Any] = {"steps": plan.total_steps, "tokens_per_step": plan.tokens_per_step, "rows": num_rows}
        summary["precision"] = self.precision
        summary["epochs"] = plan.total_steps * plan.rows_per_step / num_rows
        summary.update(self.evals)
        summary["tokens_per_s"] = sum(self.speeds) / len(self.speeds) if self.speeds else 0.0
        summary["tokens_seen"] = self.tokens_seen
        summary["steps_run"] = self.last_saved
        summary["cpu_minutes"] = self.budget.used() / 60
        if self.cache_info is not None:
            summary["teacher_cache"] = self.cache_info
        return summary


def uptrain(config: UptrainConfig) -> dict[str, Any]:
    """Run (or resume) an uptraining run; returns a summary (steps, tokens, tokens/s, evaluations)."""
    from tqdm.auto import tqdm

    run = setup(config)
    plan = run.plan
    try:
        if not run.resumed:
            run.evaluate()
        run.budget.start()
        progress = tqdm(
            total=plan.total_steps * plan.tokens_per_step,
            initial=run.tokens_seen,
            unit="tok",
            unit_scale=True,
            desc="uptrain",
            disable=config.quiet or not run.accelerator.is_main_process,
        )
        with progress:
            done = run.step >= plan.total_steps
            while not done:
                metrics = run.train_step()
                progress.update(plan.tokens_per_step)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                done = run.step == plan.total_steps or (config.cpu_minutes is not None and run.budget_spent())
                with run.budget.paused():
                    if done or _due(run.step, config.eval_every):
                        run.evaluate()
                    if done or _due(run.step, config.save_every):
                        run.save()
    finally:
        if run.log is not None:
            run.log.close()
    return run.summary()


def _due(step: int, every: int) -> bool:
    """Whether a cadence of ``every`` steps (0 = never) falls on ``step``."""
    return every > 0 and step % every == 0


def setup(config: UptrainConfig) -> UptrainRun:
    """Everything before the first step (see the module doc); refuses bad paths and mismatched resumes first."""
    from accelerate import Accelerator

    out = Path(config.out)
    resumed = _resume_point(config, out)
    accelerator = Accelerator()
    device = accelerator.device
    precision = resolve_precision(config.precision, device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    student = load(config.student)
    tokenizer = require_tokenizer(student)
    teacher = open_teacher(config.teacher).to(device) if config.teacher is not None else None
    if teacher is not None:
        check_tokenizers(student, teacher)

    plan = plan_run(config, accelerator.num_processes)
    with accelerator.main_process_first():
        train_tokens = load_tokens(config.data_spec, tokenizer, "train", plan.total_steps * plan.tokens_per_step, config.seed, teacher)
        heldout = heldout_rows(config.data_spec, tokenizer, config.eval_tokens, config.seq_len, config.seed, teacher)
    rows = pack(train_tokens, config.seq_len)
    if rows.shape[0] == 0:
        raise DataError(f"--data {config.data_spec!r} yields {train_tokens.numel()} training tokens, fewer than one --seq-len row")
    data_sha = hashlib.sha256(train_tokens.numpy().tobytes()).hexdigest()
    targets, cache_info = None, None
    if config.teacher_cache and teacher is not None:  # before the CPU budget starts: paid once per data set, reported apart
        with accelerator.main_process_first():
            temperature = config.loss.temperature
            targets, cache_info = teacher_targets(
                teacher, rows, config.teacher_cache, temperature, config.micro_batch, precision, progress=not config.quiet
            )

    ensemble = load_exit_ensemble(config.student, student.loops) if config.exit_ensemble else None
    apply_freeze(student, config.freeze)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    trainable: list[nn.Module] = [student] if ensemble is None else [student, ensemble]
    optimizer = torch.optim.AdamW(param_groups(trainable, config.weight_decay), lr=config.lr, betas=BETAS)
    already_used = resumed.state.get("cpu_seconds", 0.0) if resumed is not None else 0.0
    budget = CpuBudget((config.cpu_minutes or math.inf) * 60, already_used, started=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_schedule(config, plan, budget))
    if resumed is not None:
        _restore(resumed, data_sha, optimizer, scheduler, student, ensemble)
    elif accelerator.is_main_process:
        student.save_pretrained(str(out), overwrite=config.overwrite)
    accelerator.wait_for_everyone()

    start_step, tokens_seen = (resumed.step, resumed.tokens_seen) if resumed is not None else (0, 0)
    first_exit = 1 if config.loss.needs_exits else student.loops
    model = ExitModel(student, ensemble, exits=config.loss.needs_exits).to(device)
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    log = MetricsLog(out, start_step if resumed else None) if accelerator.is_main_process else None
    return UptrainRun(
        config=config, out=out, accelerator=accelerator, plan=plan, precision=precision, model=model, teacher=teacher,
        first_exit=first_exit, rows=rows, data_sha=data_sha, heldout=heldout, optimizer=optimizer, scheduler=scheduler,
        budget=budget, targets=targets, cache_info=cache_info, log=log, resumed=resumed is not None, step=start_step,
        tokens_seen=tokens_seen, last_saved=start_step,
    )  # fmt: skip


def _resume_point(config: UptrainConfig, out: Path) -> checkpointing.TrainingCheckpoint | None:
    """The checkpoint ``--resume`` continues from (None for a fresh run), after refusing what cannot work."""
    if not is_checkpoint(config.student):
        raise CheckpointError(f"{config.student} is not a recursify checkpoint; create one with 'recursify convert' first")
    if not config.resume:
        check_writable(out, config.overwrite)
        return None
    resumed = checkpointing.latest_checkpoint(out)
    mismatches = config.resume_mismatches(resumed.config)
    if mismatches:
        raise ConfigError(f"--resume needs the original run's options; these differ: {'; '.join(mismatches)}")
    return resumed


def _lr_schedule(config: UptrainConfig, plan: RunPlan, budget: CpuBudget) -> Callable[[int], float]:
    """The learning-rate factor per step: over the steps, or, with ``cpu_minutes``, over the share of the budget spent.

    A plain function (not a callable object), so the scheduler's saved state stays JSON.
    """
    if config.cpu_minutes is None:
        return lambda step: lr_factor(step, plan.total_steps, plan.warmup_steps, config.min_lr_ratio)
    return lambda step: budget_lr_factor(budget.fraction(), plan.warmup_steps / plan.total_steps, config.min_lr_ratio)


def _restore(
    resumed: checkpointing.TrainingCheckpoint,
    data_sha: str,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    student: RecursiveModel,
    ensemble: ExitEnsemble | None,
) -> None:
    """Load weights, optimizer, scheduler and RNG states of the checkpoint being resumed, if its data is ours."""
    if resumed.state.get("data_sha256") != data_sha:
        raise ConfigError("--resume found different training data than the original run (the --data source changed)")
    model_state, ensemble_state = checkpointing.restore(resumed, optimizer, scheduler)
    student.load_state_dict(model_state)
    if ensemble is not None and ensemble_state is not None:
        ensemble.load_state_dict(ensemble_state)
