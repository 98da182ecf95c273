"""What the demo runs: its options, the grid of conversions, and a token budget sized to ``--minutes``.

Pure data and arithmetic (no torch), so the plan can be tested and printed before anything slow runs.
The budget is derived once from measured speeds (see ``recursify.demo.probe``) and stored with the run,
so a resumed demo replays exactly the commands the first run planned.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from recursify.errors import ConfigError

DEFAULT_TASKS = ("bigbench:general_knowledge",)


@dataclass
class DemoOptions:
    """The user's choices (the ``recursify demo`` flags that change results).

    Attributes:
        out: run directory; every artefact of the demo lives below it.
        minutes: wall-clock budget of the whole default run (ignored by ``quick``).
        quick: tiny fixed budgets, a smoke run of every stage (2.7 minutes measured on 2 idle cores, in CI).
        model: the source model (the embedded default ``smollm2-135m`` unless a user points elsewhere).
        data: ``--data`` spec to train and evaluate on; None = text sampled from the model (``teacher:N``).
        tasks: multiple-choice task specs; None = ``DEFAULT_TASKS`` when already cached (never fetched by ``quick``).
        seed: data order and sampling seed.
    """

    out: str = "runs/demo"
    minutes: float = 20.0
    quick: bool = False
    model: str = "smollm2-135m"
    data: str | None = None
    tasks: list[str] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.minutes) or self.minutes < 2:
            raise ConfigError(f"--minutes must be at least 2 (conversion and evaluation alone need that), got {self.minutes}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelSpec:
    """One conversion of the grid; ``name`` is its key in the report and its directory name.

    ``prelude`` / ``coda`` keep that many first / last original layers unique; ``keep_fraction`` > 0 makes
    the layer-dropping baseline instead (that share of the original layers, by block influence on the
    training data; ``loops`` must be 1).
    """

    name: str
    loops: int
    init: str
    rank: int
    lora_init: str = "svd"
    calibrated: bool = False
    prelude: int = 0
    coda: int = 0
    keep_fraction: float = 0.0

    @property
    def description(self) -> str:
        if self.keep_fraction:
            return f"baseline: layer dropping to {self.keep_fraction:.0%} of the layers (most influential kept)"
        relax = "recursive (no LoRA)" if self.rank == 0 else f"relaxed, {self.lora_init.upper()} LoRA rank {self.rank}"
        plan = f", prelude {self.prelude} + coda {self.coda} unique" if self.prelude or self.coda else ""
        return f"loops {self.loops}{plan}, {self.init} init, {relax}"


# The trade-off the demo shows: plain recursion at two depths, the paper's relaxation at two ranks, the
# data-aware conversion (activation-aware SVD, calibrated on the training data), the best sharing plan
# measured by benchmarks/quality_frontier.py (a prelude and a coda kept unique around the loops), and the
# model a user would otherwise make at about that size: the original with half its layers dropped.
GRID: tuple[ModelSpec, ...] = (
    ModelSpec("recursive-l2-stepwise", loops=2, init="stepwise", rank=0),
    ModelSpec("recursive-l3-stepwise", loops=3, init="stepwise", rank=0),
    ModelSpec("relaxed-l3-svd-r64", loops=3, init="average", rank=64),
    ModelSpec("relaxed-l3-svd-r128", loops=3, init="average", rank=128),
    ModelSpec("relaxed-l3-asvd-r64", loops=3, init="average", rank=64, lora_init="asvd", calibrated=True),
    ModelSpec("plan-l3-p2-c1-asvd-r64", loops=3, init="average", rank=64, lora_init="asvd", calibrated=True, prelude=2, coda=1),
    ModelSpec("baseline-drop-half", loops=1, init="stepwise", rank=0, calibrated=True, keep_fraction=0.5),
)
EXIT_MODEL = "relaxed-l3-asvd-r64"  # gets early-exit post-training and is served in the serving stage
EXITS_SUFFIX = "-exits"


@dataclass(frozen=True)
class Speeds:
    """Measured throughput of the source model on this machine, tokens per second.

    Attributes:
        forward: no-grad forward (evaluation's cost).
        train: one whole KD step of the source model as its own student (teacher forward, student
            forward + backward, KL over the vocabulary, AdamW); a loops-B student has the same depth, plus LoRA.
        sample: batched sampling (the teacher-written training corpus).
    """

    forward: float
    train: float
    sample: float


@dataclass(frozen=True)
class Shape:
    """The linear layer shapes of one depth, enough to price LoRA in FLOPs."""

    hidden: int
    intermediate: int
    q_out: int
    kv_out: int

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of q, k, v, o, gate, up, down."""
        h, i = self.hidden, self.intermediate
        return [(h, self.q_out), (h, self.kv_out), (h, self.kv_out), (self.q_out, h), (h, i), (h, i), (i, h)]

    def lora_overhead(self, rank: int) -> float:
        """LoRA multiply-adds per token relative to the dense ones (ranks capped at min(in, out), as conversion does)."""
        dense = sum(a * b for a, b in self.linears())
        return sum(min(rank, a, b) * (a + b) for a, b in self.linears()) / dense


@dataclass
class Budget:
    """Every size the demo's commands use; stored in the run so a resume repeats them exactly."""

    train_tokens: int
    exit_tokens: int
    calib_tokens: int
    eval_tokens: int
    uptrain_eval_tokens: int
    seq_len: int
    batch_tokens: int
    micro_batch: int
    lr: float
    ctx: int
    task_limit: int
    requests: int
    prompt_tokens: tuple[int, int]
    new_tokens: tuple[int, int]
    max_batch: int
    estimate_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        fields = {**data, "prompt_tokens": tuple(data["prompt_tokens"]), "new_tokens": tuple(data["new_tokens"])}
        return cls(**fields)


QUICK_BUDGET = Budget(
    train_tokens=256,
    exit_tokens=128,
    calib_tokens=512,
    eval_tokens=256,
    uptrain_eval_tokens=128,
    seq_len=64,
    batch_tokens=128,
    micro_batch=2,
    lr=5e-4,
    ctx=128,
    task_limit=8,
    requests=4,
    prompt_tokens=(8, 16),
    new_tokens=(4, 8),
    max_batch=4,
)

# Shares of the wall-clock budget; training takes what the others leave.
EVAL_SHARE, SERVE_SHARE, FIXED_SHARE = 0.15, 0.10, 0.15
UPTRAIN_EVALS = 3  # held-out evaluations per uptraining run: before, halfway, after


def corpus_tokens(train_tokens: int) -> int:
    """Tokens a ``teacher:N`` corpus samples: N for training plus its held-out split (see ``recursify.data``)."""
    from recursify.data import HELDOUT_BUCKETS, MIN_HELDOUT_TOKENS

    return train_tokens + max(math.ceil(train_tokens / HELDOUT_BUCKETS), min(train_tokens, MIN_HELDOUT_TOKENS))


def plan_budget(minutes: float, speeds: Speeds, shape: Shape, grid: tuple[ModelSpec, ...] = GRID) -> Budget:
    """Size the default run so it fits ``minutes`` on a machine with ``speeds``.

    Cost model: sampling the corpus once; per model and training token one measured KD step's share,
    scaled up by the LoRA overhead, plus the run's own held-out evaluations; early-exit post-training
    adds half the tokens again for one model. Evaluation scores ``eval_tokens`` with the model and the
    teacher for every model and the original. Conversion, loading and the serving benchmark get fixed shares.
    """
    total_s = minutes * 60.0
    seq_len, batch_tokens, micro_batch = 128, 1024, 4
    evaluated = len(grid) + 2  # the grid, the exit-trained model and the original
    eval_tokens = int(total_s * EVAL_SHARE * 0.6 * speeds.forward / (2 * evaluated))  # 40% left for tasks
    eval_tokens = min(16_384, max(1024, eval_tokens // 256 * 256))
    uptrain_eval_tokens = min(1024, eval_tokens)
    runs = len(grid) + 1
    per_token_model = [(1.0 + shape.lora_overhead(spec.rank)) / speeds.train for spec in grid]
    per_token = sum(per_token_model) + 0.5 * max(per_token_model)
    fixed_train_s = runs * UPTRAIN_EVALS * 2 * uptrain_eval_tokens / speeds.forward
    train_s = total_s * (1.0 - EVAL_SHARE - SERVE_SHARE - FIXED_SHARE) - fixed_train_s
    train_tokens = batch_tokens
    while _train_cost(train_tokens + batch_tokens, per_token, speeds.sample) <= train_s:
        train_tokens += batch_tokens
    estimate = {
        "train": _train_cost(train_tokens, per_token, speeds.sample) + fixed_train_s,
        "eval": 2 * evaluated * eval_tokens / speeds.forward / 0.6,
        "serve": total_s * SERVE_SHARE,
        "fixed": total_s * FIXED_SHARE,
    }
    return Budget(
        train_tokens=train_tokens,
        exit_tokens=max(batch_tokens, train_tokens // 2 // batch_tokens * batch_tokens),
        calib_tokens=min(16_384, train_tokens),
        eval_tokens=eval_tokens,
        uptrain_eval_tokens=uptrain_eval_tokens,
        seq_len=seq_len,
        batch_tokens=batch_tokens,
        micro_batch=micro_batch,
        lr=5e-4,
        ctx=512,
        task_limit=40,
        requests=16,
        prompt_tokens=(8, 48),
        new_tokens=(16, 32),
        max_batch=16,
        estimate_s={k: round(v, 1) for k, v in estimate.items()},
    )


def _train_cost(train_tokens: int, per_token_s: float, sample_speed: float) -> float:
    return corpus_tokens(train_tokens) / sample_speed + train_tokens * per_token_s
