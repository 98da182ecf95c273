"""The uptraining loop: KD from the original model (online teacher), early-exit losses, resumable.

One function, ``uptrain(config)``, runs the same on one CPU process and under
``accelerate launch`` (DDP: every process takes an equal slice of each global batch, gradients are
averaged, so the loss curve matches the single-process run with the same global batch).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recursify.checkpoint import check_writable, is_checkpoint, read_config
from recursify.data import load_tokens, pack
from recursify.errors import CheckpointError, ConfigError, DataError, TrainingError
from recursify.loading import load
from recursify.modeling.model import RecursiveModel
from recursify.text import precision_context, require_tokenizer
from recursify.training import checkpointing
from recursify.training.budget import CpuBudget, budget_lr_factor
from recursify.training.config import UptrainConfig
from recursify.training.exit_ensemble import ExitEnsemble, load_exit_ensemble
from recursify.training.losses import kd_divergence, next_token_ce, uptrain_loss
from recursify.training.metrics import MetricsLog
from recursify.training.params import apply_freeze, enable_gradient_checkpointing, param_groups
from recursify.training.schedule import batch_rows, lr_factor

BETAS = (0.9, 0.95)


class ExitModel(nn.Module):
    """The student plus its optional exit ensemble, as one module for DDP: input ids -> exit logits."""

    def __init__(self, student: RecursiveModel, ensemble: ExitEnsemble | None, exits: bool):
        super().__init__()
        self.student, self.ensemble, self.exits = student, ensemble, exits

    def forward(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        out = self.student(input_ids, output_exits=self.exits)
        logits = out.exit_logits if out.exit_logits is not None else [out.logits]
        return self.ensemble(logits) if self.ensemble is not None else logits


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


def open_teacher(spec: str) -> RecursiveModel:
    """A teacher model: a recursify checkpoint as saved, or any --model source as the original (loops=1)."""
    teacher = load(spec)
    teacher.requires_grad_(False)
    return teacher.eval()


def default_teacher(student_dir: str) -> str | None:
    """The model a checkpoint was converted from (its own original is the natural teacher)."""
    return read_config(student_dir).get("source", {}).get("spec") or None


def check_tokenizers(student: RecursiveModel, teacher: RecursiveModel) -> None:
    """Refuse a teacher whose vocabulary differs from the student's: KD over ids would be meaningless."""
    if student.arch.vocab_size != teacher.arch.vocab_size:
        raise ConfigError(
            f"student and teacher vocabularies differ ({student.arch.vocab_size} vs {teacher.arch.vocab_size} ids); "
            "pick the teacher the student was converted from"
        )
    student_tok, teacher_tok = require_tokenizer(student), teacher.tokenizer
    if teacher_tok is not None and (student_tok.get_vocab() != teacher_tok.get_vocab() or student_tok.eos_token != teacher_tok.eos_token):
        raise ConfigError(
            "student and teacher tokenizers differ (vocabulary or EOS token); pick the teacher the student was converted from"
        )


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the hardware computes in bf16 natively, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and _cpu_has_bf16() else "fp32"


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: stay exact
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uptrain(config: UptrainConfig) -> dict[str, Any]:
    """Run (or resume) an uptraining run; returns a summary (steps, tokens, tokens/s, evaluations)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = Path(config.out)
    if not is_checkpoint(config.student):
        raise CheckpointError(f"{config.student} is not a recursify checkpoint; create one with 'recursify convert' first")
    resumed = checkpointing.latest_checkpoint(out) if config.resume else None
    if resumed is not None:
        mismatches = config.resume_mismatches(resumed.config)
        if mismatches:
            raise ConfigError(f"--resume needs the original run's options; these differ: {'; '.join(mismatches)}")
    else:
        check_writable(out, config.overwrite)

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

    ensemble = load_exit_ensemble(config.student, student.loops) if config.exit_ensemble else None
    apply_freeze(student, config.freeze)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    trainable: list[nn.Module] = [student] if ensemble is None else [student, ensemble]
    optimizer = torch.optim.AdamW(param_groups(trainable, config.weight_decay), lr=config.lr, betas=BETAS)
    budget: CpuBudget | None = None  # started when the first step begins

    def schedule(step: int) -> float:
        if config.cpu_minutes is None:
            return lr_factor(step, plan.total_steps, plan.warmup_steps, config.min_lr_ratio)
        fraction = budget.fraction() if budget is not None else 0.0
        return budget_lr_factor(fraction, plan.warmup_steps / plan.total_steps, config.min_lr_ratio)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    start_step, tokens_seen = 0, 0
    if resumed is not None:
        if resumed.state.get("data_sha256") != data_sha:
            raise ConfigError("--resume found different training data than the original run (the --data source changed)")
        model_state, ensemble_state = checkpointing.restore(resumed, optimizer, scheduler)
        student.load_state_dict(model_state)
        if ensemble is not None and ensemble_state is not None:
            ensemble.load_state_dict(ensemble_state)
        start_step, tokens_seen = resumed.step, resumed.tokens_seen
    elif accelerator.is_main_process:
        student.save_pretrained(str(out), overwrite=config.overwrite)
    accelerator.wait_for_everyone()

    first_exit = 1 if config.loss.needs_exits else student.loops  # only the last exit is computed otherwise
    model = ExitModel(student, ensemble, exits=config.loss.needs_exits).to(device)
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    log = MetricsLog(out, start_step if resumed else None) if accelerator.is_main_process else None
    summary: dict[str, Any] = {"steps": plan.total_steps, "tokens_per_step": plan.tokens_per_step, "rows": int(rows.shape[0])}
    summary["precision"] = precision
    summary["epochs"] = plan.total_steps * plan.rows_per_step / rows.shape[0]

    def run_eval(step: int) -> None:
        if heldout is None or log is None:
            return
        cpu_s = budget.used() if budget is not None else 0.0  # read first: the evaluation itself does not count
        metrics = evaluate(accelerator.unwrap_model(model), teacher, heldout, config.micro_batch, precision)
        log.write({"event": "eval", "step": step, "tokens": tokens_seen, "cpu_s": cpu_s, **metrics})
        summary["eval_before" if step == 0 else "eval_after"] = metrics

    def save(step: int) -> None:
        state = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            student_state = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
            ensemble_state = {k.removeprefix("ensemble."): v for k, v in state.items() if k.startswith("ensemble.")} or None
            extra = {"config": config.to_dict(), "data_sha256": data_sha, "world_size": accelerator.num_processes}
            extra["cpu_seconds"] = budget.used() if budget is not None else 0.0
            checkpointing.save_checkpoint(out, step, tokens_seen, student_state, optimizer, scheduler, ensemble_state, extra)
        accelerator.wait_for_everyone()

    if resumed is None:
        run_eval(0)
    last_saved = start_step
    speeds: list[float] = []
    cpu_seconds = (config.cpu_minutes or math.inf) * 60
    budget = CpuBudget(cpu_seconds, resumed.state.get("cpu_seconds", 0.0) if resumed is not None else 0.0)
    bar = tqdm(
        total=plan.total_steps * plan.tokens_per_step,
        initial=tokens_seen,
        unit="tok",
        unit_scale=True,
        desc="uptrain",
        disable=config.quiet or not accelerator.is_main_process,
    )
    try:
        for step in range(start_step, plan.total_steps):
            began = time.perf_counter()
            global_rows = batch_rows(step, plan.rows_per_step, rows.shape[0], config.seed)
            local = global_rows[accelerator.process_index * plan.rows_per_process : (accelerator.process_index + 1) * plan.rows_per_process]
            metrics = _train_step(model, teacher, rows[local].to(device), config, precision, first_exit, accelerator)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.clip if config.clip > 0 else math.inf)
            metrics["grad_norm"] = float(grad_norm)
            if not all(math.isfinite(v) for v in metrics.values()):
                bad = ", ".join(f"{k}={v}" for k, v in metrics.items() if not math.isfinite(v))
                raise TrainingError(
                    f"non-finite values at step {step + 1} ({bad}); stopped without updating. The last good checkpoint "
                    f"(step {last_saved}) is kept in {out}: lower --lr, keep --clip on or use --precision fp32, then --resume"
                )
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += plan.tokens_per_step
            speed = plan.tokens_per_step / (time.perf_counter() - began)
            speeds.append(speed)
            bar.update(plan.tokens_per_step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            if log is not None:
                record = {"event": "train", "step": step + 1, "tokens": tokens_seen, "lr": lr, "tokens_per_s": speed}
                log.write({**record, "cpu_s": budget.used(), **metrics})
            done = step + 1 == plan.total_steps or (config.cpu_minutes is not None and _budget_spent(budget, accelerator))
            with budget.paused():
                if done or (config.eval_every and (step + 1) % config.eval_every == 0):
                    run_eval(step + 1)
                if done or (config.save_every and (step + 1) % config.save_every == 0):
                    save(step + 1)
                    last_saved = step + 1
            if done:
                break
    finally:
        bar.close()
        if log is not None:
            log.close()
    summary["tokens_per_s"] = sum(speeds) / len(speeds) if speeds else 0.0
    summary["tokens_seen"] = tokens_seen
    summary["steps_run"] = last_saved
    summary["cpu_minutes"] = budget.used() / 60
    return summary


def _budget_spent(budget: CpuBudget, accelerator: Any) -> bool:
    """Whether the CPU budget is spent, agreed by all processes (their mean CPU time decides)."""
    used = accelerator.reduce(torch.tensor([budget.used()], device=accelerator.device), reduction="mean")
    return float(used) >= budget.seconds


def _train_step(
    model: nn.Module,
    teacher: RecursiveModel | None,
    batch: torch.Tensor,
    config: UptrainConfig,
    precision: str,
    first_exit: int,
    accelerator: Any,
) -> dict[str, float]:
    """Forward/backward over the micro-batches of this process's rows; metrics averaged over processes."""
    chunks = batch.split(config.micro_batch)
    totals: dict[str, float] = {}
    for index, chunk in enumerate(chunks):
        sync = index == len(chunks) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            with precision_context(precision, batch.device):
                exit_logits = model(chunk)
                teacher_logits = _teacher_logits(teacher, chunk)
            loss, metrics = uptrain_loss(exit_logits, chunk, teacher_logits, config.loss, first_exit)
            share = chunk.shape[0] / batch.shape[0]
            accelerator.backward(loss * share)
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value * share
    keys = sorted(totals)
    reduced = accelerator.reduce(torch.tensor([totals[k] for k in keys], device=batch.device), reduction="mean")
    return dict(zip(keys, reduced.tolist(), strict=True))


def _teacher_logits(teacher: RecursiveModel | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    if teacher is None:
        return None
    with torch.no_grad():
        return teacher(input_ids).logits


def heldout_rows(
    spec: str, tokenizer: Any, eval_tokens: int, seq_len: int, seed: int, teacher: RecursiveModel | None
) -> torch.Tensor | None:
    """The held-out split of ``spec`` packed into rows of ``seq_len`` for evaluation; None when ``eval_tokens`` is 0."""
    if eval_tokens == 0:
        return None
    try:
        tokens = load_tokens(spec, tokenizer, "heldout", eval_tokens, seed, teacher)
    except DataError as err:
        raise DataError(f"{err}; or pass --eval-tokens 0 to skip held-out evaluation") from err
    return pack(tokens, min(seq_len, tokens.numel()))


@torch.no_grad()
def evaluate(model: ExitModel, teacher: RecursiveModel | None, rows: torch.Tensor, micro_batch: int, precision: str) -> dict[str, float]:
    """Held-out CE and perplexity per exit, and KL(teacher || student) per exit when there is a teacher."""
    was_training, exits = model.training, model.exits
    model.eval()
    model.exits = True
    sums: dict[str, float] = {}
    device = next(model.parameters()).device
    for chunk in rows.split(micro_batch):
        chunk = chunk.to(device)
        with precision_context(precision, device):
            exit_logits = model(chunk)
            teacher_logits = _teacher_logits(teacher, chunk)
        share = chunk.shape[0] / rows.shape[0]
        for b, logits in enumerate(exit_logits, start=1):
            sums[f"ce/exit{b}"] = sums.get(f"ce/exit{b}", 0.0) + float(next_token_ce(logits, chunk)) * share
            if teacher_logits is not None:
                sums[f"kl/exit{b}"] = sums.get(f"kl/exit{b}", 0.0) + float(kd_divergence(logits, teacher_logits)) * share
    model.train(was_training)
    model.exits = exits
    last = len([k for k in sums if k.startswith("ce/")])
    sums["ppl"] = math.exp(sums[f"ce/exit{last}"])
    if teacher is not None:
        sums["kl"] = sums[f"kl/exit{last}"]
    return sums
