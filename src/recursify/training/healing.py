"""Local healing: block-wise reconstruction of every depth from the original model, then a short KD.

End-to-end distillation sends one weak signal (the final logits) back through all L depths. Post-
training quantisation methods heal block by block instead, and so does this module: the original
(teacher) model runs once over calibration tokens and its residual stream entering and leaving every
depth is kept. Each depth l of the recursive model, i.e. shared layer s(l) with depth l's LoRA and
norms, is then trained to map the teacher's input h_l to the teacher's output h_{l+1} (teacher
forcing), all depths at once: every depth gets a dense target, nothing backpropagates through the
stack, and the captured states are reused for every pass over the data. A model with low-rank
vocabulary factors (``--embed-rank``) gets two more targets of the same kind: its input embedding
must match the teacher's embedding output (the residual stream entering depth 0) and its head, given
the teacher's last hidden state, the teacher's logits (``vocabulary_losses``). Because per-depth fits
cannot undo error that compounds across depths, an optional end-to-end KD phase (``uptrain``)
follows. Both phases are budgeted in CPU-minutes (``time.process_time``), evaluation excluded, and
checkpoint every ``save_every`` steps so that an interrupted run resumes (``heal_state``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from recursify.checkpoint import check_writable, is_checkpoint
from recursify.data import load_tokens, pack
from recursify.errors import CheckpointError, ConfigError, DataError
from recursify.loading import load
from recursify.modeling.kv_cache import AttentionContext
from recursify.modeling.model import RecursiveModel
from recursify.text import precision_context, require_tokenizer
from recursify.training import heal_state
from recursify.training.budget import CpuBudget, budget_lr_factor
from recursify.training.common import (
    BETAS,
    ExitModel,
    check_tokenizers,
    default_teacher,
    exit_metrics,
    heldout_rows,
    open_teacher,
    resolve_precision,
)
from recursify.training.config import HealConfig, UptrainConfig
from recursify.training.metrics import MetricsLog
from recursify.training.params import apply_freeze
from recursify.training.schedule import batch_rows

HEAL_LOG = "heal.jsonl"
WARMUP_FRACTION = 0.05
# A token whose layer update is tiny must not dominate: its denominator is floored at this share
# of the mean update energy of its depth.
UPDATE_FLOOR = 1e-3


@dataclass
class HealReport:
    """What a healing run did and measured (held-out metrics are KL(teacher || model) and perplexity).

    ``objective_*`` is the block-wise objective on held-out tokens (see ``block_objective``);
    ``per_depth_*`` its value at every depth; ``eval_*`` hold ``kl`` and ``ppl`` (empty without
    ``eval_tokens``); ``kd`` is the uptraining summary of the KD phase.
    """

    local_steps: int = 0
    local_tokens: int = 0
    local_cpu_minutes: float = 0.0
    capture_cpu_minutes: float = 0.0
    objective_before: float = math.nan
    objective_after: float = math.nan
    per_depth_before: list[float] = field(default_factory=list)
    per_depth_after: list[float] = field(default_factory=list)
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_local: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    kd: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def normalised_error(output: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||output - target||^2 / ||target - inputs||^2 ([..., hidden] -> scalar).

    Why this normalisation: the error is measured relative to the teacher's own update at that
    token and depth, so 1.0 means "no better than skipping the layer" and 0 means exact, at every
    depth alike; summing raw squared errors would instead let the few positions with a huge
    residual stream (the first token of a window is ~150x the median norm in SmolLM2) and the
    deepest depths (the stream grows with depth) decide the whole loss.
    """
    error = (output.float() - target.float()).pow(2).sum(-1)
    update = (target.float() - inputs.float()).pow(2).sum(-1)
    return (error / update.clamp_min(UPDATE_FLOOR * float(update.mean()))).mean()


def attention_context(model: RecursiveModel, batch: int, seq_len: int, dtype: torch.dtype) -> AttentionContext:
    """RoPE tables and masks of unpadded [batch, seq_len] rows (what ``model.forward`` builds), no cache."""
    positions = torch.arange(seq_len, device=model.device).expand(batch, seq_len)
    mask = torch.ones(batch, seq_len, dtype=torch.long, device=model.device)
    return model.attention_context(mask, positions, None, dtype)


@torch.no_grad()
def capture_states(teacher: RecursiveModel, rows: torch.Tensor, micro_batch: int, precision: str) -> torch.Tensor:
    """The teacher's residual stream [L + 1, rows, seq, hidden] (float32): embedding output, then after each depth."""
    chunks = []
    for chunk in rows.split(micro_batch):
        with precision_context(precision, teacher.device):
            out = teacher(chunk.to(teacher.device), output_hidden_states=True, logits_to_keep=1)
        assert out.hidden_states is not None
        chunks.append(torch.stack([h.float() for h in out.hidden_states]))
    return torch.cat(chunks, dim=1)


def teacher_spans(student: RecursiveModel, teacher_depths: int) -> list[tuple[int, int]]:
    """For every depth of the student, the (input, target) indices into the teacher's residual stream [L + 1].

    A converted model's depth l stands for the original's layer l: (l, l + 1). After layer dropping
    (``RecursionConfig.kept_layers``) a kept layer also stands for the dropped ones after it, up to
    the next kept layer (the first kept layer also for any dropped before it): it is taught to map
    the stream entering its span to the stream leaving it.
    """
    kept = student.recursion.kept_layers or list(range(student.num_depths))
    starts = [0, *kept[1:], teacher_depths]
    return list(zip(starts[:-1], starts[1:], strict=True))


def depth_losses(student: RecursiveModel, states: torch.Tensor, precision: str, backward: bool = False) -> list[float]:
    """The normalised error of every depth on teacher-forced ``states`` [L + 1, batch, seq, hidden] (``teacher_spans``).

    With ``backward`` each depth's loss (divided by L, so gradients are those of the mean over
    depths) is backpropagated right away, freeing that depth's graph before the next is built.
    """
    ctx = attention_context(student, states.shape[1], states.shape[2], states.dtype)
    spans = teacher_spans(student, states.shape[0] - 1)
    losses = []
    for slot in student.schedule:
        begin, end = spans[slot.depth]
        inputs, target = states[begin], states[end]
        with precision_context(precision, student.device):
            output = student.shared_layer(slot.layer)(inputs, slot.visit, slot.depth, ctx)
        loss = normalised_error(output, target, inputs)
        if backward and loss.requires_grad:  # a layer --freeze keeps whole has nothing to learn here
            (loss / student.num_depths).backward()
        losses.append(float(loss.detach()))
    return losses


def vocabulary_losses(
    student: RecursiveModel, teacher: RecursiveModel, ids: torch.Tensor, states: torch.Tensor, precision: str, backward: bool = False
) -> dict[str, float]:
    """The targets of low-rank vocabulary factors on teacher-forced ``states`` [L + 1, batch, seq, hidden] of ``ids`` [batch, seq].

    "embedding": mean over tokens of ||e_student - e_teacher||^2 / ||e_teacher||^2 (the embedding
    output against the teacher's, 0 = exact, 1 = all signal lost); "head": KL(teacher || student)
    in nats per token of the logits both heads give the teacher's last hidden state. Each term
    weighs like one depth (divided by L, as in ``depth_losses``), so neither swamps the others.
    Empty for a model whose embedding and head are the original dense matrices.
    """
    if not student.embedding_layout.factorized:
        return {}
    ids = ids.to(student.device)
    with precision_context(precision, student.device):
        embedded = student.embed_tokens(ids)
        log_probs = torch.log_softmax(student.head(states[-1]).float(), dim=-1)
        with torch.no_grad():
            target = torch.log_softmax(teacher.head(states[-1]).float(), dim=-1)
    losses = {
        "embedding": normalised_error(embedded, states[0], torch.zeros_like(states[0])),
        "head": (target.exp() * (target - log_probs)).sum(-1).mean(),
    }
    total = (losses["embedding"] + losses["head"]) / student.num_depths
    if backward and total.requires_grad:
        total.backward()
    return {name: float(loss.detach()) for name, loss in losses.items()}


@torch.no_grad()
def block_objective(student: RecursiveModel, states: torch.Tensor, micro_batch: int, precision: str) -> list[float]:
    """Per-depth normalised error of the student on all of ``states``, averaged over row chunks."""
    was_training = student.training
    student.eval()
    totals = [0.0] * student.num_depths
    for chunk in states.split(micro_batch, dim=1):
        share = chunk.shape[1] / states.shape[1]
        totals = [t + loss * share for t, loss in zip(totals, depth_losses(student, chunk, precision), strict=True)]
    student.train(was_training)
    return totals


@dataclass
class _Healing:
    """The state a healing run's evaluations and local phase share: models, data, the log, the report being filled."""

    config: HealConfig
    student: RecursiveModel
    teacher: RecursiveModel
    precision: str
    train_rows: torch.Tensor  # [rows, seq_len] calibration tokens
    heldout: torch.Tensor | None  # [rows, seq_len] held-out tokens; None without evaluation
    heldout_states: torch.Tensor | None  # the teacher's residual stream on them, [L + 1, rows, seq_len, hidden]
    log: MetricsLog
    report: HealReport

    def measure(self, cpu_s: float) -> tuple[dict[str, float], list[float]]:
        """Held-out KL, perplexity and block-wise objective, logged as an "eval" record."""
        metrics: dict[str, float] = {}
        per_depth: list[float] = []
        if self.heldout is not None and self.heldout_states is not None:
            metrics = _kl_ppl(self.student, self.teacher, self.heldout, self.config.micro_batch, self.precision)
            per_depth = block_objective(self.student, self.heldout_states, self.config.micro_batch, self.precision)
            metrics["objective"] = sum(per_depth) / len(per_depth)
            metrics.update(self.vocabulary_objective())
        record = {"event": "eval", "step": self.report.local_steps, "tokens": self.report.local_tokens, "cpu_s": cpu_s}
        self.log.write({**record, **metrics, "per_depth": per_depth})
        return metrics, per_depth

    @torch.no_grad()
    def vocabulary_objective(self) -> dict[str, float]:
        """``vocabulary_losses`` on the held-out rows (empty for dense vocabulary matrices), averaged over row chunks."""
        assert self.heldout is not None and self.heldout_states is not None
        totals: dict[str, float] = {}
        size = self.config.micro_batch
        for ids, chunk in zip(self.heldout.split(size), self.heldout_states.split(size, dim=1), strict=True):
            for name, loss in vocabulary_losses(self.student, self.teacher, ids, chunk, self.precision).items():
                totals[name] = totals.get(name, 0.0) + loss * ids.shape[0] / self.heldout.shape[0]
        return totals


def heal(config: HealConfig) -> HealReport:
    """Heal a converted model: local block-wise reconstruction, then optional end-to-end KD (see module doc).

    With ``config.resume`` an interrupted run of ``config.out`` continues from its last checkpoint
    (``heal_state``); otherwise an interrupted run left there is refused unless ``config.overwrite``.
    """
    if not is_checkpoint(config.student):
        raise CheckpointError(f"{config.student} is not a recursify checkpoint; create one with 'recursify convert' first")
    out = Path(config.out) if config.resume else check_writable(config.out, config.overwrite)
    if out.resolve() == Path(config.student).resolve():
        raise ConfigError("--out must differ from the student directory (the healed model replaces --out)")
    teacher_spec = config.teacher or default_teacher(config.student)
    if teacher_spec is None:
        raise ConfigError(f"{config.student} does not record its source model; pass --teacher")
    work, state = heal_state.open_state(config)
    if state is None:
        state = {"phase": "local", "options": heal_state.options(config), "report": HealReport().to_dict()}
    report = HealReport(**state["report"])
    student = _local_part(config, teacher_spec, work, state, report) if state["phase"] == "local" else None
    if config.kd_minutes > 0:
        del student  # uptrain loads its own copies
        report.kd = _kd_phase(config, str(work / heal_state.STAGED_DIR), teacher_spec)
        report.eval_after = {k: report.kd["eval_after"][k] for k in ("kl", "ppl")} if "eval_after" in report.kd else {}
    else:
        assert student is not None
        student.save_pretrained(str(out), overwrite=True)  # check_writable allowed it, or a resume is rewriting its own run
        report.eval_after = {k: v for k, v in report.eval_local.items() if k in ("kl", "ppl")}
    shutil.copyfile(work / "metrics.jsonl", out / HEAL_LOG)
    (out / "heal_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return report


def _local_part(config: HealConfig, teacher_spec: str, work: Path, state: dict[str, Any], report: HealReport) -> RecursiveModel:
    """Everything before KD: evaluation, the local phase (resumed from ``state``'s checkpoint if it names one), evaluation;
    the student is staged for KD (``state`` then enters the "kd" phase) and returned."""
    torch.manual_seed(config.seed)
    resumed = heal_state.checkpoint_path(work, state)
    student = load(resumed or config.student)
    if config.freeze:
        apply_freeze(student, config.freeze)
    teacher = open_teacher(teacher_spec)
    _check_teacher(student, teacher)
    precision = resolve_precision(config.precision, student.device)
    tokenizer = require_tokenizer(student)
    train_rows = pack(load_tokens(config.calib, tokenizer, "train", config.calib_tokens, config.seed, teacher), config.seq_len)
    if train_rows.shape[0] == 0:
        raise DataError(f"--calib {config.calib!r} yields fewer than one --seq-len ({config.seq_len}) row of training tokens")
    # packed exactly as uptraining packs them, so both phases report comparable numbers
    heldout = heldout_rows(config.calib, tokenizer, config.eval_tokens, config.seq_len, config.seed, teacher)
    heldout_states = capture_states(teacher, heldout, config.micro_batch, precision) if heldout is not None else None
    log = MetricsLog(work, resume_step=report.local_steps if resumed else None, tensorboard=False)
    run = _Healing(config, student, teacher, precision, train_rows, heldout, heldout_states, log=log, report=report)
    if resumed is None:
        report.eval_before, report.per_depth_before = run.measure(0.0)
    if config.minutes > 0:
        _local_phase(run, work, state)
        report.eval_local, report.per_depth_after = run.measure(report.local_cpu_minutes * 60)
    else:
        report.eval_local, report.per_depth_after = report.eval_before, report.per_depth_before
    report.objective_before = report.eval_before.get("objective", math.nan)
    report.objective_after = report.eval_local.get("objective", math.nan)
    run.log.close()
    if config.kd_minutes > 0:
        student.save_pretrained(str(work / heal_state.STAGED_DIR), overwrite=True)
        heal_state.save(work, {**state, "phase": "kd", "report": report.to_dict()})
    return student


def _check_teacher(student: RecursiveModel, teacher: RecursiveModel) -> None:
    """Refuse a teacher that is not the student's original: the local phase pairs depth l of one with depth l of the other."""
    check_tokenizers(student, teacher)
    kept = student.recursion.kept_layers
    depths_match = teacher.num_depths > kept[-1] if kept else teacher.num_depths == student.num_depths
    if teacher.loops != 1 or not depths_match or teacher.arch.hidden_size != student.arch.hidden_size:
        raise ConfigError(
            f"the teacher must be the original of the student: {student.num_depths} depths x {student.arch.hidden_size} hidden "
            f"at loops=1, got loops={teacher.loops}, {teacher.num_depths} depths x {teacher.arch.hidden_size}"
        )


def local_optimizer(student: RecursiveModel, lr: float) -> torch.optim.AdamW:
    """AdamW over what the local phase trains: the shared layers (LoRA and norms included) and, for low-rank
    vocabulary factors, the embedding, final norm and head (their own targets: see ``vocabulary_losses``).

    One learning rate serves all of them because every parameter is stored at the scale of what it
    represents: AdamW moves each entry by about lr per step, so a factor stored far below that
    scale would be rewritten by one step (``LowRankFit.factors`` splits the fitted product so
    that its table carries the original matrix's scale for this reason).
    """
    trained = list(student.layers)
    if student.embedding_layout.factorized:
        trained += [student.embed, student.final_norm] + ([student.lm_head] if student.lm_head is not None else [])
    params = [p for module in trained for p in module.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("--freeze leaves the local phase nothing to train: keep some layer or vocabulary parameters trainable")
    return torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=0.0)


def _local_phase(run: _Healing, work: Path, state: dict[str, Any]) -> None:
    """Capture the teacher's states, then train every depth on them until the CPU budget is spent, checkpointing
    every ``save_every`` steps (a resumed run continues ``state``'s step, optimizer, CPU seconds and schedule)."""
    from tqdm.auto import tqdm

    config, student, report = run.config, run.student, run.report
    local = state.get("local", {})
    total = CpuBudget(config.minutes * 60, already_used=local.get("cpu_s", 0.0))
    if local:  # recomputing the states is the interruption's cost, not the training's
        with total.paused():
            states = capture_states(run.teacher, run.train_rows, config.micro_batch, run.precision)
    else:
        states = capture_states(run.teacher, run.train_rows, config.micro_batch, run.precision)
        report.capture_cpu_minutes = total.used() / 60
    # The schedule spans what is left after the capture; the capture still counts against --minutes.
    budget = CpuBudget(local.get("schedule_s", max(total.seconds - total.used(), 1e-9)), already_used=local.get("schedule_used", 0.0))
    optimizer = local_optimizer(student, config.lr)
    if local:
        heal_state.restore_optimizer(work, state, optimizer)
    student.train()
    every = config.eval_every_minutes * 60
    next_eval = local.get("next_eval", every if every > 0 else math.inf)
    bar = tqdm(total=round(total.seconds), initial=round(total.used()), unit="cpu-s", desc="local heal", disable=config.quiet)
    try:
        while report.local_steps == 0 or not total.spent():  # total, not the schedule: it bounds local_cpu_minutes below
            rows = batch_rows(report.local_steps, config.micro_batch, states.shape[1], config.seed)
            lr = config.lr * budget_lr_factor(budget.fraction(), WARMUP_FRACTION, config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = depth_losses(student, states[:, rows], run.precision, backward=True)
            vocabulary = vocabulary_losses(student, run.teacher, run.train_rows[rows], states[:, rows], run.precision, backward=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            report.local_steps += 1
            report.local_tokens += rows.numel() * states.shape[2]
            loss = sum(losses) / len(losses)
            if not math.isfinite(loss):
                raise ConfigError(f"the local objective became {loss} at step {report.local_steps}; lower --lr")
            cpu_s = total.used()
            run.log.write(
                {"event": "local", "step": report.local_steps, "tokens": report.local_tokens, "lr": lr, "cpu_s": cpu_s, "loss": loss}
                | vocabulary
            )
            bar.update(round(cpu_s) - bar.n)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            evaluate = budget.used() >= next_eval
            save = config.save_every > 0 and report.local_steps % config.save_every == 0 and not total.spent()
            if evaluate or save:
                with total.paused(), budget.paused():
                    if evaluate:
                        run.measure(cpu_s)
                        next_eval += every
                    if save:
                        report.local_cpu_minutes = cpu_s / 60
                        counters = {"cpu_s": cpu_s, "schedule_s": budget.seconds, "schedule_used": budget.used(), "next_eval": next_eval}
                        saved = {**state, "local": counters, "report": report.to_dict()}
                        state.update(heal_state.save_local(work, saved, student, optimizer, report.local_steps))
    finally:
        bar.close()
    report.local_cpu_minutes = total.used() / 60
    student.eval()


def _kd_phase(config: HealConfig, student_dir: str, teacher_spec: str) -> dict[str, Any]:
    """End-to-end forward-KL distillation by ``uptrain`` on the same data, for ``kd_minutes`` CPU-minutes; a resumed
    run continues uptraining's last checkpoint in ``out`` (or starts KD over if it saved none yet)."""
    from recursify.training.checkpointing import LATEST_FILE, TRAINING_DIR
    from recursify.training.uptrain import uptrain

    resume = config.resume and (Path(config.out) / TRAINING_DIR / LATEST_FILE).is_file()

    kd = UptrainConfig(
        student=student_dir,
        out=config.out,
        teacher=teacher_spec,
        data=config.calib,
        tokens=config.calib_tokens * 1000,  # an upper bound: the CPU budget ends the phase
        cpu_minutes=config.kd_minutes,
        seq_len=config.seq_len,
        batch_tokens=config.kd_batch_tokens,
        micro_batch=config.micro_batch,
        lr=config.kd_lr,
        min_lr_ratio=config.min_lr_ratio,
        precision=config.precision,
        save_every=config.save_every,
        eval_tokens=config.eval_tokens,
        seed=config.seed,
        eval_every=config.kd_eval_every,
        resume=resume,
        overwrite=not resume,  # a fresh run's --out was checked at the start (or is this run's own)
        quiet=config.quiet,
        teacher_cache=config.teacher_cache,
        freeze=list(config.freeze),
    )
    return uptrain(kd)


def _kl_ppl(student: RecursiveModel, teacher: RecursiveModel, rows: torch.Tensor, micro_batch: int, precision: str) -> dict[str, float]:
    metrics = exit_metrics(ExitModel(student, None, exits=False), teacher, rows, micro_batch, precision)
    return {"kl": metrics["kl"], "ppl": metrics["ppl"]}
