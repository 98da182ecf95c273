"""One model, every requested metric: the work behind ``recursify eval`` and ``recursify compare``."""

from __future__ import annotations

from dataclasses import dataclass, field

from recursify.evaluation.bigbench import resolve_tasks
from recursify.evaluation.multiple_choice import evaluate_task, load_task
from recursify.evaluation.perplexity import evaluate_perplexity
from recursify.evaluation.report import EvalReport
from recursify.modeling.model import RecursiveModel
from recursify.text import require_tokenizer


@dataclass
class EvalOptions:
    """What to measure and how (the CLI's flags).

    Attributes:
        ppl_data: a ``--data`` spec (see ``recursify.data``) to measure perplexity on; None = skip.
        split: which split of ``ppl_data`` ("heldout" by default: never trained on).
        max_tokens: cap on the evaluated token stream.
        ctx, stride: the sliding window (stride None = ctx).
        per_loop: per-loop exit metrics and oracle exits.
        tasks: ``--tasks`` specs (task.json paths, globs, ``bigbench:<task>``).
        shots, limit: few-shot examples per prompt; questions per task (None = all).
        batch_size: windows (perplexity) or continuations (tasks) per forward.
        precision: "fp32" or "bf16".
        seed: data order and few-shot sampling.
    """

    ppl_data: str | None = None
    split: str = "heldout"
    max_tokens: int | None = None
    ctx: int = 512
    stride: int | None = None
    per_loop: bool = False
    tasks: list[str] = field(default_factory=list)
    shots: int = 0
    limit: int | None = None
    batch_size: int = 4
    precision: str = "fp32"
    seed: int = 0
    progress: bool = True


def evaluate_model(model: RecursiveModel, name: str, options: EvalOptions, teacher: RecursiveModel | None = None) -> EvalReport:
    """Measure ``model`` as ``options`` ask; ``teacher`` adds KL/agreement columns to the per-loop table."""
    from recursify.data import load_tokens

    model.eval()
    report = EvalReport(model=name, params=model.param_counts(), loops=model.loops)
    task_files = resolve_tasks(options.tasks)  # fail on a bad spec before any slow work
    if options.ppl_data is not None:
        tokens = load_tokens(options.ppl_data, require_tokenizer(model), options.split, options.max_tokens, options.seed, teacher)
        report.ppl = evaluate_perplexity(
            model,
            tokens,
            ctx=options.ctx,
            stride=options.stride,
            batch_size=options.batch_size,
            precision=options.precision,
            per_loop=options.per_loop,
            teacher=teacher,
            progress=options.progress,
        )
    for task_name, path in task_files:
        report.tasks[task_name] = evaluate_task(
            model,
            load_task(path, task_name),
            shots=options.shots,
            seed=options.seed,
            limit=options.limit,
            batch_size=options.batch_size,
            precision=options.precision,
            progress=options.progress,
        )
    return report
