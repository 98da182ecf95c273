"""Training options: uptraining (UptrainConfig, LossConfig) and healing (HealConfig), validated before anything heavy loads.

Kept free of torch, like ``recursify.config``, so the CLI states and checks these options without importing it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from recursify.config import PRECISIONS
from recursify.errors import ConfigError

KD_KINDS: tuple[str, ...] = ("forward-kl", "reverse-kl", "jsd", "tvd")
EXIT_TARGETS: tuple[str, ...] = ("teacher", "final")

# Options that may differ between a run and its --resume without changing the result.
# options a resumed run may change: how often it saves, evaluates and reports, not what it trains
OPERATIONAL_FIELDS = ("resume", "overwrite", "quiet", "save_every", "eval_every", "eval_tokens", "peak_flops")
HEAL_OPERATIONAL_FIELDS = ("resume", "overwrite", "quiet", "save_every", "eval_every_minutes", "kd_eval_every", "eval_tokens")


def parse_exit_loss(spec: str) -> tuple[str, float]:
    """``"none"`` | ``"weighted"`` | ``"aggressive:C"`` -> (mode, C); C is 0 unless aggressive."""
    mode, _, value = spec.partition(":")
    if mode in ("none", "weighted") and not value:
        return mode, 0.0
    if mode == "aggressive":
        try:
            coefficient = float(value)
        except ValueError:
            coefficient = -1.0
        if coefficient >= 0 and math.isfinite(coefficient):
            return mode, coefficient
    raise ConfigError(f"unknown exit loss {spec!r}; use none, weighted or aggressive:C with C >= 0 (e.g. aggressive:0.1)")


@dataclass(frozen=True)
class LossConfig:
    """How the per-exit losses are built and mixed.

    Attributes:
        kd: divergence used against the teacher (one of KD_KINDS).
        kd_weight: w in (1 - w) * CE + w * KD; 0 trains on CE only (no teacher needed).
        temperature: softmax temperature of every KD term.
        exit_loss: how exits are weighted (see ``exit_loss_weights``).
        self_distill: earlier exits also learn KD from the detached last-exit distribution.
        early_exit_target: what exits before the last learn from: "teacher" (CE / KD from the
            teacher, as the last exit, plus ``self_distill``) or "final" (only KD from the detached
            last exit: the agreement with the final loop that early exits and self-speculative
            drafts are judged by).
    """

    kd: str = "forward-kl"
    kd_weight: float = 1.0
    temperature: float = 1.0
    exit_loss: str = "none"
    self_distill: bool = False
    early_exit_target: str = "teacher"

    def __post_init__(self) -> None:
        if self.kd not in KD_KINDS:
            raise ConfigError(f"unknown KD loss {self.kd!r}; choose one of: {', '.join(KD_KINDS)}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ConfigError(f"--kd-weight must be in [0, 1], got {self.kd_weight}")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")
        mode, _ = parse_exit_loss(self.exit_loss)
        if self.self_distill and mode == "none":
            raise ConfigError("--self-distill trains earlier exits: pick --exit-loss weighted or aggressive:C as well")
        if self.early_exit_target not in EXIT_TARGETS:
            raise ConfigError(f"unknown --early-exit-target {self.early_exit_target!r}; choose one of: {', '.join(EXIT_TARGETS)}")
        if self.early_exit_target == "final" and mode == "none":
            raise ConfigError("--early-exit-target final trains earlier exits: pick --exit-loss weighted or aggressive:C as well")

    @property
    def needs_exits(self) -> bool:
        """Whether the loss looks at exits before the last one."""
        return parse_exit_loss(self.exit_loss)[0] != "none"


@dataclass
class UptrainConfig:
    """An uptraining run.

    Attributes:
        student: checkpoint directory written by ``recursify convert`` (or a previous uptrain).
        out: output checkpoint directory (training state goes to ``out/training``).
        teacher: model spec run online as the KD teacher with loops=1; None = no teacher.
        data: ``--data`` spec (see ``recursify.data``); default ``teacher:<tokens>``.
        tokens: training budget in tokens; steps = ceil(tokens / tokens per step).
        cpu_minutes: also stop once training has used this many CPU-minutes of this process
            (``time.process_time``; evaluation excluded); the learning-rate schedule then runs
            over the fraction of this budget spent, and ``tokens`` is only an upper bound.
        seq_len: tokens per packed row.
        batch_tokens: tokens per optimizer step (rounded down to whole rows, at least one row per process).
        micro_batch: rows per forward pass; gradients accumulate over micro-batches.
        lr: peak learning rate; min_lr_ratio: the cosine floor as a fraction of it.
        warmup_steps: linear warmup steps; None = 5% of the steps.
        weight_decay: AdamW decay on weight matrices.
        clip: gradient-norm clipping threshold (0 = off).
        loss: how losses are built (KD kind and weight, temperature, exit weights, self-distillation).
        exit_ensemble: also learn exit-ensemble weights (saved as exit_ensemble.safetensors).
        exit_heads: give the student per-loop exit heads of this rank (modeling/exit_heads.py) if it
            has none yet (0 = no change).
        freeze_model: train only the exit heads (and the exit ensemble): every parameter the last
            loop depends on stays frozen, so its output cannot change; the last exit's loss (and
            the teacher, when early exits learn from the final loop) is then skipped.
        freeze: fnmatch patterns of parameters to freeze (``!pattern`` keeps them trainable).
        precision: "auto" (bf16 autocast where the hardware has bf16 units: CUDA GPUs that support it,
            CPUs with AVX512-BF16/AMX; fp32 elsewhere, since emulated bf16 is many times slower),
            "bf16" or "fp32".
        gradient_checkpointing: recompute each shared-layer visit's activations in the backward pass.
        compile: ``torch.compile`` each shared layer's forward (one compiled graph per visit).
        fused_adamw: AdamW's fused kernel; None = on CUDA devices, off elsewhere.
        stream: read the training data as a stream, each process its own share, rows in stream order
            (one pass, nothing held in memory); None = stream ``hf:`` datasets and load other sources
            in memory, where each step's rows are a seeded draw over the packed budget.
        peak_flops: peak FLOP/s of one device, for the MFU logged per step; None = the known
            bf16 peak of the GPU model (``planning.peak_flops``), else MFU is not logged.
        save_every: checkpoint every N optimizer steps (0 = only at the end).
        eval_every: held-out evaluation every N steps (0 = only before and after training).
        eval_tokens: held-out tokens per evaluation (0 = no evaluation).
        seed: data order (and teacher-corpus sampling).
        resume: continue the run in ``out`` from its last checkpoint.
        overwrite: replace ``out`` when starting a fresh run.
        quiet: no progress bar.
        teacher_cache: k > 0: KD against the teacher's top-k log-probabilities on the training rows,
            computed once and cached per data set (``training/teacher_cache.py``), instead of a teacher
            forward in every step; 0 = the online teacher.
    """

    student: str
    out: str
    teacher: str | None = None
    data: str | None = None
    tokens: int = 1_000_000
    cpu_minutes: float | None = None
    seq_len: int = 512
    batch_tokens: int = 16_384
    micro_batch: int = 4
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    clip: float = 1.0
    loss: LossConfig = field(default_factory=LossConfig)
    exit_ensemble: bool = False
    exit_heads: int = 0
    freeze_model: bool = False
    freeze: list[str] = field(default_factory=list)
    precision: str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    fused_adamw: bool | None = None
    stream: bool | None = None
    peak_flops: float | None = None
    save_every: int = 200
    eval_every: int = 0
    eval_tokens: int = 16_384
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    teacher_cache: int = 0

    def __post_init__(self) -> None:
        positive = {"tokens": self.tokens, "seq_len": self.seq_len, "batch_tokens": self.batch_tokens, "micro_batch": self.micro_batch}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.seq_len < 2:
            raise ConfigError("--seq-len must be at least 2 (a row needs a token and its successor)")
        if self.cpu_minutes is not None and not self.cpu_minutes > 0:
            raise ConfigError(f"--cpu-minutes must be positive, got {self.cpu_minutes}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.peak_flops is not None and not (self.peak_flops > 0 and math.isfinite(self.peak_flops)):
            raise ConfigError(f"--peak-flops must be a positive number of FLOP/s (e.g. 989e12), got {self.peak_flops}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        nonnegative = {"weight_decay": self.weight_decay, "clip": self.clip, "save_every": self.save_every}
        nonnegative |= {"eval_every": self.eval_every, "eval_tokens": self.eval_tokens, "warmup_steps": self.warmup_steps or 0}
        for name, number in nonnegative.items():
            if number < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {number}")
        if self.precision not in ("auto", *PRECISIONS):
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of: auto, {', '.join(PRECISIONS)}")
        if self.exit_ensemble and not self.loss.needs_exits:
            raise ConfigError("--exit-ensemble trains early exits: pick --exit-loss weighted or aggressive:C as well")
        if self.exit_heads < 0:
            raise ConfigError(f"--exit-heads must be >= 0, got {self.exit_heads}")
        if self.freeze_model and not self.loss.needs_exits:
            raise ConfigError("--freeze-model trains early exits only: pick --exit-loss weighted or aggressive:C as well")
        if self.teacher is None and self.loss.kd_weight > 0 and self.needs_teacher_to_train:
            raise ConfigError("KD needs a teacher: pass --teacher, or --kd-weight 0 to train on cross-entropy only")
        if self.data is None and self.teacher is None:
            raise ConfigError("without a teacher there is no default data: pass --data (a file, directory or dataset)")
        check_teacher_cache(self.teacher_cache, self.teacher is not None and self.loss.kd_weight > 0)
        if self.teacher_cache and self.streamed:
            raise ConfigError(
                "--teacher-cache scores the training rows once, in memory; a streamed data source has no fixed rows: "
                "drop --stream (or use a file or teacher:N data), or drop --teacher-cache"
            )

    @property
    def trains_final_exit(self) -> bool:
        """Whether the last exit's loss has a gradient to give (not with ``freeze_model``)."""
        return not self.freeze_model

    @property
    def needs_teacher_to_train(self) -> bool:
        """Whether a training step reads the teacher: some trained exit learns from it."""
        return self.trains_final_exit or self.loss.early_exit_target == "teacher"

    @property
    def data_spec(self) -> str:
        """The data source; ``teacher:<tokens>`` (sequence-level distillation data) by default."""
        return self.data if self.data is not None else f"teacher:{self.tokens}"

    @property
    def streamed(self) -> bool:
        """Whether the training rows are streamed (``stream``, or by default for ``hf:`` datasets)."""
        return self.stream if self.stream is not None else self.data_spec.startswith("hf:")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resume_mismatches(self, saved: dict[str, Any]) -> list[str]:
        """Options of this config that differ from a saved run's, ignoring operational ones."""
        return option_mismatches(self.to_dict(), saved, OPERATIONAL_FIELDS)


def option_mismatches(current: dict[str, Any], saved: dict[str, Any], operational: tuple[str, ...]) -> list[str]:
    """ "name: saved X, now Y" for every option but the ``operational`` ones that differs between a saved run and this one."""
    keys = sorted((set(current) | set(saved)) - set(operational))
    return [f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if _jsonish(saved.get(k)) != _jsonish(current.get(k))]


def _jsonish(value: Any) -> Any:
    """Normalise tuples to lists so a config read back from JSON compares equal."""
    if isinstance(value, (list, tuple)):
        return [_jsonish(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonish(v) for k, v in value.items()}
    return value


def check_teacher_cache(k: int, distils: bool) -> None:
    """Refuse a negative top-k, and a teacher cache for a run that does no KD."""
    if k < 0:
        raise ConfigError(f"--teacher-cache takes a top-k >= 1 (or 0 for the online teacher), got {k}")
    if k and not distils:
        raise ConfigError("--teacher-cache caches the KD teacher: it needs a teacher and --kd-weight > 0")


@dataclass
class HealConfig:
    """A healing run.

    Attributes:
        student: checkpoint directory written by ``recursify convert``.
        out: output checkpoint directory (the healed model, ``heal.jsonl``; after KD also uptrain's files).
        teacher: the original model (any ``--model`` source or checkpoint, run with loops=1);
            None = the model the student was converted from.
        calib: data spec whose train split feeds both phases and whose held-out split evaluates.
        calib_tokens: training tokens read from ``calib`` (the local phase keeps the teacher's
            residual stream at every depth for all of them: (L + 1) x hidden x 4 bytes per token).
        minutes: CPU-minutes of local reconstruction, teacher capture included (0 = skip it).
        kd_minutes: CPU-minutes of end-to-end KD afterwards (0 = none).
        seq_len: tokens per packed row, in both phases and in evaluation.
        micro_batch: rows per local step (and per KD forward).
        lr, kd_lr: peak AdamW learning rates of the two phases (warmup, then cosine over the budget).
        kd_batch_tokens: tokens per KD optimizer step.
        min_lr_ratio: cosine floor as a fraction of the peak rate.
        eval_tokens: held-out tokens for KL / perplexity / objective before and after each phase (0 = none).
        eval_every_minutes: also evaluate after every this many CPU-minutes of the local phase (0 = no).
        kd_eval_every: also evaluate every this many KD steps (0 = no; uptrain's ``eval_every``).
        precision: "auto", "bf16" or "fp32", as in uptraining.
        seed: data order.
        overwrite: replace ``out`` if it exists.
        quiet: no progress bars.
        teacher_cache: the KD phase's ``UptrainConfig.teacher_cache`` (0 = online teacher).
        freeze: fnmatch patterns of parameters neither phase trains (``!pattern`` keeps them
            trainable; ``UptrainConfig.freeze``), e.g. ``["*", "!*lora*", "!*norm*"]``: LoRA and norms only.
        save_every: checkpoint every N steps of either phase (local steps, KD optimizer steps; 0 = only
            when the local phase ends), so that ``resume`` loses at most N steps (``training/heal_state.py``).
        resume: continue the interrupted run of ``out`` from its last checkpoint (same options).
    """

    student: str
    out: str
    calib: str
    teacher: str | None = None
    calib_tokens: int = 16_384
    minutes: float = 5.0
    kd_minutes: float = 0.0
    seq_len: int = 128
    micro_batch: int = 4
    lr: float = 5e-4
    kd_lr: float = 5e-4
    kd_batch_tokens: int = 1024
    min_lr_ratio: float = 0.1
    eval_tokens: int = 4096
    eval_every_minutes: float = 0.0
    kd_eval_every: int = 0
    precision: str = "auto"
    seed: int = 0
    overwrite: bool = False
    quiet: bool = False
    teacher_cache: int = 0
    freeze: list[str] = field(default_factory=list)
    save_every: int = 100
    resume: bool = False

    def __post_init__(self) -> None:
        check_teacher_cache(self.teacher_cache, distils=True)
        for name in ("minutes", "kd_minutes", "eval_every_minutes", "eval_tokens", "kd_eval_every"):
            value = getattr(self, name)
            if not value >= 0:  # also refuses NaN
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.minutes + self.kd_minutes <= 0:
            raise ConfigError("nothing to do: give --minutes and/or --kd-minutes a positive CPU-minute budget")
        if self.save_every < 0:
            raise ConfigError(f"--save-every must be >= 0, got {self.save_every}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite starts it over: pass one of them")
        for name in ("calib_tokens", "micro_batch", "kd_batch_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len must be at least 2, got {self.seq_len}")
        for name in ("lr", "kd_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.precision not in ("auto", *PRECISIONS):
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of: auto, {', '.join(PRECISIONS)}")


@dataclass
class TrainExitsConfig:
    """``recursify train-exits``: exit gates and the agreement calibration of a frozen checkpoint.

    Attributes:
        checkpoint: a recursify checkpoint directory with loops >= 2; the gates
            (``exit_gates.safetensors``) and the calibration (``exit_calibration.json``) are written into it.
        data: ``--data`` spec; its train split trains the gates, its held-out split calibrates.
            Default ``teacher:<tokens>`` (text sampled from ``teacher``).
        teacher: samples ``teacher:N`` data; None = the model the checkpoint was converted from.
        tokens: training tokens read (hidden states of every loop are kept for all of them).
        calib_tokens: held-out tokens for the calibration curves.
        window: tokens per forward pass (teacher forcing, no overlap).
        gate_width: hidden units of each gate's MLP; 0 = a linear gate; None = no gates (calibrate
            the parameter-free signals only).
        steps: AdamW steps over minibatches of ``batch`` (position, loop) samples.
        lr: AdamW learning rate.
        seed: data order, gate initialisation and minibatches.
        quiet: no progress bars.
    """

    checkpoint: str
    data: str | None = None
    teacher: str | None = None
    tokens: int = 16_384
    calib_tokens: int = 4096
    window: int = 256
    gate_width: int | None = 64
    steps: int = 400
    batch: int = 1024
    lr: float = 2e-3
    seed: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        for name in ("tokens", "calib_tokens", "window", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.gate_width is not None and self.gate_width < 0:
            raise ConfigError(f"--gate-width must be >= 0 (0 = linear), got {self.gate_width}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")

    @property
    def data_spec(self) -> str:
        return self.data if self.data is not None else f"teacher:{self.tokens}"
