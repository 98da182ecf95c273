"""The uptraining recipe: KD from the original model (online teacher), early-exit losses, resumable.

``uptrain(config)`` runs the same on one process and under ``accelerate launch``: DDP (every process
takes an equal slice of each global batch, gradients are averaged, so the loss curve matches the
single-process run with the same global batch) or FSDP2 (``configs/fsdp.yaml``: parameters,
gradients and AdamW state sharded, one unit per shared layer). DeepSpeed is refused (see
``_check_launch``).

The recipe is a few phases over one explicit state, an ``UptrainRun``:

- ``setup(config)`` does everything before the first step: checks the output directory (a fresh
  run, or ``--resume`` with the same options and data) and the launch, starts accelerate, picks the
  precision, loads student, teacher and data, builds optimizer and learning-rate scheduler, and
  restores them from the checkpoint being resumed. The run it returns is complete: no phase builds
  state later.
- ``UptrainRun.train_step()`` is one optimizer step over one global batch: this process's rows in
  micro-batches (gradients synchronised on the last), clipping, a finite check (a non-finite loss
  or gradient stops the run before the update, keeping the last good checkpoint), the log record
  (loss, tokens/s and, where the device's peak is known, model FLOPs utilisation).
- ``UptrainRun.evaluate()`` and ``UptrainRun.save()``: held-out metrics and an atomic checkpoint
  (``checkpointing``: the consolidated model plus each process's optimizer shard), each on its own
  cadence and after the last step. Every process takes part in both (a sharded model only runs
  with all of its shards); the main process writes.
- ``uptrain(config)`` drives them: setup, the evaluation before training, then steps until the
  token budget is covered, the CPU budget (``budget``) is spent or a streamed data share runs out.
  The CPU budget starts with the first step and is paused while evaluating and saving, so it
  measures training alone.

Resume is exact because every input of a step is either a pure function of (step, seed) (the batch
rows, ``batches``) or saved in the checkpoint (weights, optimizer, scheduler, RNG states, CPU
seconds used).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from recursify.checkpoint import check_writable, is_checkpoint
from recursify.data import load_tokens, stream_rows
from recursify.errors import CheckpointError, ConfigError, TrainingError
from recursify.loading import load
from recursify.modeling.model import RecursiveModel
from recursify.planning import count_params, model_flops_per_token, peak_flops
from recursify.text import precision_context, require_tokenizer
from recursify.training import checkpointing
from recursify.training.batches import MemoryBatches, StreamBatches
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
from recursify.training.exit_ensemble import load_exit_ensemble
from recursify.training.losses import SparseTargets, uptrain_loss
from recursify.training.metrics import MetricsLog
from recursify.training.params import apply_freeze, compile_layers, enable_gradient_checkpointing, param_groups
from recursify.training.schedule import lr_factor
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

    ``model`` and ``optimizer`` are as ``accelerator.prepare`` returned them (DDP- or FSDP-wrapped
    under a multi-process launch). ``log`` is None on processes other than the main one, which do not
    write. ``step`` counts optimizer steps done; ``last_saved`` is the step of the newest checkpoint.
    ``flops_per_token`` counts the student's training step and the teacher's forward (``planning``);
    ``peak_flops`` is one device's peak (None: unknown, MFU not logged).
    """

    config: UptrainConfig
    out: Path
    accelerator: Accelerator
    plan: RunPlan
    precision: str
    model: nn.Module
    teacher: RecursiveModel | None
    first_exit: int  # the first exit the loss reads (only the last is computed without exit losses)
    batches: MemoryBatches | StreamBatches
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
    flops_per_token: float
    peak_flops: float | None
    speeds: list[float] = field(default_factory=list)  # tokens/s of every step of this process
    evals: dict[str, dict[str, float]] = field(default_factory=dict)  # "eval_before" / "eval_after" -> metrics
    data_exhausted: bool = False  # a streamed share ran out before the token budget was covered

    def train_step(self) -> dict[str, float] | None:
        """One optimizer step over global batch ``step``; its metrics (averaged over processes).

        None, with nothing updated, when a streamed data share has run out on any process: the
        processes agree on it (all-reduced), so they all stop at the same step.
        """
        began = time.perf_counter()
        local = self.batches.local(self.step)
        if self.batches.streamed and self._any_process(local is None):
            self.data_exhausted = True
            return None
        assert local is not None  # in-memory batches never run short
        targets = None
        if self.targets is not None:  # the cached teacher's rows of this batch (--teacher-cache: in-memory batches only)
            assert isinstance(self.batches, MemoryBatches)
            targets = self.targets[self.batches.local_index(self.step)]
        metrics = self._forward_backward(local.to(self.accelerator.device), targets)
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
        self.tokens_seen += self.plan.tokens_per_step
        speed = self.plan.tokens_per_step / (time.perf_counter() - began)
        self.speeds.append(speed)
        if self.log is not None:
            record = {"event": "train", "step": self.step, "tokens": self.tokens_seen, "lr": lr, "tokens_per_s": speed}
            mfu = self.mfu(speed)
            self.log.write({**record, **({"mfu": mfu} if mfu is not None else {}), "cpu_s": self.budget.used(), **metrics})
        return metrics

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation of all processes at ``tokens_per_s`` (global tokens per second); None without a peak."""
        if self.peak_flops is None:
            return None
        return tokens_per_s * self.flops_per_token / (self.peak_flops * self.accelerator.num_processes)

    def _any_process(self, flag: bool) -> bool:
        total = self.accelerator.reduce(torch.tensor([float(flag)], device=self.accelerator.device), reduction="sum")
        return bool(total.item() > 0)

    def _forward_backward(self, batch: torch.Tensor, targets: SparseTargets | None) -> dict[str, float]:
        """Forward/backward over the micro-batches of this process's rows; metrics averaged over processes.

        ``targets``: the cached teacher's top-k for the same rows (--teacher-cache), else the teacher runs.
        """
        device = self.accelerator.device
        chunks = batch.split(self.config.micro_batch)
        totals: dict[str, float] = {}
        for index, chunk in enumerate(chunks):
            sync = index == len(chunks) - 1  # DDP all-reduces (FSDP reduce-scatters) gradients once, after the last micro-batch
            with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model):
                with precision_context(self.precision, device):
                    exit_logits = self.model(chunk)
                    if targets is not None:
                        start = index * self.config.micro_batch
                        target: torch.Tensor | SparseTargets | None = targets[start : start + chunk.shape[0]].to(device)
                    else:
                        target = teacher_logits(self.teacher if self.config.needs_teacher_to_train else None, chunk)
                loss, metrics = uptrain_loss(exit_logits, chunk, target, self.config.loss, self.first_exit, self.config.trains_final_exit)
                share = chunk.shape[0] / batch.shape[0]
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
        """Held-out metrics at the current step, logged as an "eval" record by the main process.

        Every process evaluates the same rows: a sharded model computes only with all its shards,
        and under DDP the other processes would wait for the main one anyway.
        """
        if self.heldout is None:
            return
        cpu_s = self.budget.used()  # read first: the evaluation itself does not count
        model = self.accelerator.unwrap_model(self.model)
        metrics = exit_metrics(model, self.teacher, self.heldout, self.config.micro_batch, self.precision)
        if self.log is not None:
            self.log.write({"event": "eval", "step": self.step, "tokens": self.tokens_seen, "cpu_s": cpu_s, **metrics})
        self.evals["eval_before" if self.step == 0 else "eval_after"] = metrics

    def save(self) -> None:
        """An atomic checkpoint of the current step (every process writes its optimizer shard; the main one the rest)."""
        extra = {"config": self.config.to_dict(), "data_sha256": self.batches.fingerprint, "world_size": self.accelerator.num_processes}
        extra["cpu_seconds"] = self.budget.used()
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # the torch optimizer inside accelerate's wrapper
        checkpointing.save_checkpoint(self.out, self.step, self.tokens_seen, self.model, optimizer, self.scheduler, extra)
        self.last_saved = self.step

    def summary(self) -> dict[str, Any]:
        """What ``uptrain`` returns: the plan, the evaluations before and after, speed, MFU, tokens, steps, CPU-minutes."""
        plan = self.plan
        summary: dict[str, Any] = {"steps": plan.total_steps, "tokens_per_step": plan.tokens_per_step}
        summary.update(self.batches.describe(plan.total_steps))
        summary["precision"] = self.precision
        summary["streamed"] = self.batches.streamed
        summary["fused_adamw"] = bool(self.optimizer.param_groups[0].get("fused"))
        summary.update(self.evals)
        summary["tokens_per_s"] = sum(self.speeds) / len(self.speeds) if self.speeds else 0.0
        summary["flops_per_token"] = self.flops_per_token
        summary["peak_flops"] = self.peak_flops
        summary["mfu"] = self.mfu(summary["tokens_per_s"]) if self.speeds else None
        summary["tokens_seen"] = self.tokens_seen
        summary["steps_run"] = self.last_saved
        summary["data_exhausted"] = self.data_exhausted
        summary["cpu_minutes"] = self.budget.used() / 60
        summary["process"] = {"index": self.accelerator.process_index, "count": self.accelerator.num_processes}
        if self.cache_info is not None:
            summary["teacher_cache"] = self.cache_info
        return summary


def uptrain(config: UptrainConfig) -> dict[str, Any]:
    """Run (or resume) an uptraining run; returns a summary (steps, tokens, tokens/s, MFU, evaluations)."""
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
                if metrics is not None:
                    progress.update(plan.tokens_per_step)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                done = metrics is None or run.step == plan.total_steps or (config.cpu_minutes is not None and run.budget_spent())
                with run.budget.paused():
                    if done or _due(run.step, config.eval_every):
                        run.evaluate()
                    if (done or _due(run.step, config.save_every)) and run.step != run.last_saved:
                        run.save()
        if run.data_exhausted and run.accelerator.is_main_process:
            print(
                f"uptrain: a process's share of --data {config.data_spec!r} ran out after {run.step} of {plan.total_steps} steps; "
                "stopped there (give more data or fewer --tokens)",
                flush=True,
            )
    finally:
        if run.log is not None:
            run.log.close()
    return run.summary()


def _due(step: int, every: int) -> bool:
    """Whether a cadence of ``every`` steps (0 = never) falls on ``step``."""
    return every > 0 and step % every == 0


def setup(config: UptrainConfig) -> UptrainRun:
    """Everything before the first step (see the module doc); refuses bad paths, launches and mismatched resumes first."""
    from accelerate import Accelerator

    out = Path(config.out)
    resumed = _resume_point(config, out)
    accelerator = Accelerator()
    _check_launch(accelerator)
    device = accelerator.device
    precision = resolve_precision(config.precision, device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    student = load(config.student)
    tokenizer = require_tokenizer(student)
    teacher = _place_teacher(open_teacher(config.teacher), device, precision) if config.teacher is not None else None
    if teacher is not None:
        check_tokenizers(student, teacher)

    plan = plan_run(config, accelerator.num_processes)
    start_step, tokens_seen = (resumed.step, resumed.tokens_seen) if resumed is not None else (0, 0)
    rank, world = accelerator.process_index, accelerator.num_processes
    batches: MemoryBatches | StreamBatches
    with accelerator.main_process_first():
        if config.streamed:
            rows = stream_rows(config.data_spec, tokenizer, config.seq_len, "train", config.seed, teacher, rank=rank, world_size=world)
            batches = StreamBatches(rows, plan.rows_per_step, world, start_step)
        else:
            tokens = load_tokens(config.data_spec, tokenizer, "train", plan.total_steps * plan.tokens_per_step, config.seed, teacher)
            batches = MemoryBatches(tokens, config.seq_len, plan.rows_per_step, rank, world, config.seed, config.data_spec)
        heldout = heldout_rows(config.data_spec, tokenizer, config.eval_tokens, config.seq_len, config.seed, teacher)
    targets, cache_info = None, None
    if (
        config.teacher_cache and teacher is not None and config.needs_teacher_to_train
    ):  # before the CPU budget starts: paid once per data set, reported apart
        assert isinstance(batches, MemoryBatches)  # the config refuses a cache on streamed data
        with accelerator.main_process_first():
            targets, cache_info = teacher_targets(
                teacher,
                batches.rows,
                config.teacher_cache,
                config.loss.temperature,
                config.micro_batch,
                precision,
                progress=not config.quiet,
            )

    ensemble = load_exit_ensemble(config.student, student.loops) if config.exit_ensemble else None
    _add_exit_heads(student, config.exit_heads)  # before a resumed state dict (which holds them) is loaded
    if resumed is not None:
        _check_resumed_data(resumed, batches, world)
        model_state, ensemble_state = checkpointing.read_weights(resumed)
        student.load_state_dict(model_state)
        if ensemble is not None and ensemble_state is not None:
            ensemble.load_state_dict(ensemble_state)
    elif accelerator.is_main_process:
        student.save_pretrained(str(out), overwrite=config.overwrite)
    accelerator.wait_for_everyone()

    flops = model_flops_per_token(student.arch, count_params(student.arch, student.recursion), config.seq_len, training=True)
    if teacher is not None:
        flops += model_flops_per_token(teacher.arch, count_params(teacher.arch, teacher.recursion), config.seq_len, training=False)
    apply_freeze(student, config.freeze)
    if config.freeze_model:
        for name, param in student.named_parameters():  # only the exit heads train: the last loop's output is fixed
            param.requires_grad_(param.requires_grad and name.startswith("exit_heads."))
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    if config.compile:
        compile_layers(student)
    trainable: list[nn.Module] = [student] if ensemble is None else [student, ensemble]
    fused = config.fused_adamw if config.fused_adamw is not None else device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(trainable, config.weight_decay), lr=config.lr, betas=BETAS, fused=fused or None)
    already_used = resumed.state.get("cpu_seconds", 0.0) if resumed is not None else 0.0
    budget = CpuBudget((config.cpu_minutes or math.inf) * 60, already_used, started=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_schedule(config, plan, budget))

    first_exit = 1 if config.loss.needs_exits else student.loops
    model = ExitModel(student, ensemble, exits=config.loss.needs_exits).to(device)
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    if resumed is not None:  # after prepare: the optimizer state is restored shard by shard into the prepared parameters
        checkpointing.restore_training_state(resumed, model, getattr(optimizer, "optimizer", optimizer), scheduler)
    log = MetricsLog(out, start_step if resumed else None) if accelerator.is_main_process else None
    return UptrainRun(
        config=config, out=out, accelerator=accelerator, plan=plan, precision=precision, model=model, teacher=teacher,
        first_exit=first_exit, batches=batches, heldout=heldout, optimizer=optimizer, scheduler=scheduler, budget=budget,
        targets=targets, cache_info=cache_info, log=log, resumed=resumed is not None, step=start_step, tokens_seen=tokens_seen,
        last_saved=start_step, flops_per_token=float(flops), peak_flops=_peak_flops(config, device, precision),
    )  # fmt: skip


def _check_launch(accelerator: Accelerator) -> None:
    """Refuse launches that would not train as asked, before anything heavy loads.

    accelerate 1.x enables FSDP only for GPU-like devices: on the CPU an FSDP config silently trains
    unsharded (DDP), and without ``ACCELERATE_USE_CPU=1`` a machine without GPUs starts every process
    as a world of one (each would train alone and write the same directory). DeepSpeed is refused:
    its engine owns the optimizer, gradient accumulation and clipping, and its checkpoints are not
    ``torch.distributed.checkpoint``'s, so the checkpoint and step logic here would not apply.
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise ConfigError(
            "uptrain does not run under DeepSpeed (its engine owns optimizer, accumulation, clipping and checkpoints); "
            "launch with configs/fsdp.yaml: FSDP2 shards weights, gradients and AdamW state as ZeRO-3 does"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and kind != DistributedType.FSDP:
        raise ConfigError(
            f"the accelerate config asks for FSDP but accelerate started {kind.value}: accelerate runs FSDP on GPUs only "
            "(on the CPU it would train unsharded); on the CPU launch with configs/cpu-2proc.yaml"
        )
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError("uptrain shards with FSDP2 only: set fsdp_version: 2 in the accelerate config (as configs/fsdp.yaml does)")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(
            f"launched as {launched} processes but accelerate runs {accelerator.num_processes} (no GPU was found): "
            "on the CPU set ACCELERATE_USE_CPU=1 and launch with configs/cpu-2proc.yaml"
        )


def _place_teacher(teacher: RecursiveModel, device: torch.device, precision: str) -> RecursiveModel:
    """The teacher on the training device; on a GPU training in bf16 its weights are bf16 too (half the memory).

    ``plan-train`` counts a bf16 teacher. On the CPU the weights stay fp32 (bf16 autocast casts them
    per matmul), so CPU runs keep their numbers. Buffers (RoPE frequencies) stay fp32 either way.
    """
    teacher = teacher.to(device)
    if device.type == "cuda" and precision == "bf16":
        for param in teacher.parameters():
            param.data = param.data.to(torch.bfloat16)
    return teacher


def _peak_flops(config: UptrainConfig, device: torch.device, precision: str) -> float | None:
    """One device's peak FLOP/s for MFU: ``--peak-flops``, else the GPU model's known bf16 peak, else None."""
    if config.peak_flops is not None:
        return config.peak_flops
    return peak_flops(torch.cuda.get_device_name(device), precision) if device.type == "cuda" else None


def _add_exit_heads(student: RecursiveModel, rank: int) -> None:
    """``--exit-heads R``: add exit heads of rank R unless the student already has them (of that rank)."""
    if rank == 0:
        return
    if student.exit_heads is None:
        student.add_exit_heads(rank)
    elif student.recursion.exit_head_rank != rank:
        have = student.recursion.exit_head_rank
        raise ConfigError(f"the student already has exit heads of rank {have}; pass --exit-heads {have} (or 0)")


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


def _check_resumed_data(resumed: checkpointing.TrainingCheckpoint, batches: MemoryBatches | StreamBatches, world_size: int) -> None:
    """Refuse a resume whose data would differ: other tokens in memory, or a stream split over another process count."""
    if resumed.state.get("data_sha256") != batches.fingerprint:
        raise ConfigError("--resume found different training data than the original run (the --data source changed)")
    saved_world = resumed.state.get("world_size")
    if batches.streamed and saved_world != world_size:
        raise ConfigError(
            f"a streamed run resumes with the number of processes it ran with ({saved_world}, now {world_size}): "
            "each process's share of the stream depends on it"
        )


def _lr_schedule(config: UptrainConfig, plan: RunPlan, budget: CpuBudget) -> Callable[[int], float]:
    """The learning-rate factor per step: over the steps, or, with ``cpu_minutes``, over the share of the budget spent.

    A plain function (not a callable object), so the scheduler's saved state stays JSON.
    """
    if config.cpu_minutes is None:
        return lambda step: lr_factor(step, plan.total_steps, plan.warmup_steps, config.min_lr_ratio)
    return lambda step: budget_lr_factor(budget.fraction(), plan.warmup_steps / plan.total_steps, config.min_lr_ratio)
