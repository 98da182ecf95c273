"""Few-shot multiple choice on tasks in BIG-bench's JSON format, scored like lm-evaluation-harness.

A task file holds ``examples``, each with an ``input`` and ``target_scores`` (choice -> score; the
highest-scoring choices are correct), plus optional formatting keys that BIG-bench defines with
these defaults: ``task_prefix`` "", ``example_input_prefix`` "\\nQ: ", ``example_output_prefix``
"\\nA: ", ``choice_prefix`` "\\n  choice: ", ``append_choices_to_input`` true and
``few_shot_example_separator`` "\\n".

A k-shot prompt is ``task_prefix`` + k other examples (formatted input + their best answer) joined
by the separator + the separator + the formatted question. Shots and the order of appended choices
come from a generator seeded by (seed, example index), so prompts are reproducible and independent
of ``limit`` or batch size.

Metrics (lm-evaluation-harness's multiple-choice definitions): ``acc`` counts the argmax of the
continuation log-likelihoods; ``acc_norm`` the argmax of log-likelihood divided by the choice's
length in UTF-8 bytes (lm-eval describes acc_norm as byte-length normalisation; its code divides by
``len(str)``, identical for ASCII choices, and calls the byte version ``acc_bytes``).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recursify.errors import DataError
from recursify.evaluation.loglikelihood import continuation_logprobs, encode_pair, prefix_token_id
from recursify.modeling.model import RecursiveModel
from recursify.text import require_tokenizer


@dataclass(frozen=True)
class Example:
    """One question: its raw input text and its choices with their BIG-bench scores."""

    input: str
    choices: list[str]
    scores: list[float]

    @property
    def gold(self) -> set[int]:
        """Indices of the correct choices (those with the highest score)."""
        best = max(self.scores)
        return {index for index, score in enumerate(self.scores) if score == best}

    @property
    def answer(self) -> str:
        """The first best choice: what a few-shot example shows as its answer (BIG-bench's rule)."""
        return self.choices[min(self.gold)]


@dataclass(frozen=True)
class Task:
    """A multiple-choice task with BIG-bench's formatting fields."""

    name: str
    examples: list[Example]
    task_prefix: str = ""
    input_prefix: str = "\nQ: "
    output_prefix: str = "\nA: "
    choice_prefix: str = "\n  choice: "
    append_choices: bool = True
    separator: str = "\n"


@dataclass(frozen=True)
class Question:
    """A formatted prompt, its candidate continuations and the indices of the correct ones."""

    context: str
    choices: list[str]
    gold: set[int]


@dataclass
class TaskResult:
    """Accuracy of one task (the ``tasks.<name>`` entry of the JSON report)."""

    acc: float
    acc_norm: float
    n: int
    shots: int


def load_task(path: str | Path, name: str | None = None) -> Task:
    """Read a BIG-bench ``task.json`` file.

    Raises:
        DataError: unreadable JSON, a task with subtasks instead of examples, or examples
            without ``input``/``target_scores``.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"cannot read task file {path} ({err}); give a BIG-bench task.json") from err
    if not isinstance(data, dict):
        raise DataError(f"task file {path} must hold a JSON object with an 'examples' list")
    name = name or str(data.get("name") or path.parent.name or path.stem)
    if not isinstance(data.get("examples"), list) or not data["examples"]:
        subtasks = [sub.get("name", "?") for sub in data.get("subtasks", []) if isinstance(sub, dict)]
        hint = f"; it has subtasks ({', '.join(subtasks)}): name one of their task.json files" if subtasks else ""
        raise DataError(f"task file {path} has no 'examples' list{hint}")
    examples = [_example(path, number, raw) for number, raw in enumerate(data["examples"])]
    return Task(
        name=name,
        examples=examples,
        task_prefix=str(data.get("task_prefix", "")),
        input_prefix=str(data.get("example_input_prefix", "\nQ: ")),
        output_prefix=str(data.get("example_output_prefix", "\nA: ")),
        choice_prefix=str(data.get("choice_prefix", "\n  choice: ")),
        append_choices=bool(data.get("append_choices_to_input", True)),
        separator=str(data.get("few_shot_example_separator", "\n")),
    )


def _example(path: Path, number: int, raw: Any) -> Example:
    if not isinstance(raw, dict) or not isinstance(raw.get("input"), str) or not isinstance(raw.get("target_scores"), dict):
        raise DataError(f"{path}: example {number} needs an 'input' string and a 'target_scores' object (multiple choice)")
    scores = raw["target_scores"]
    if len(scores) < 2 or not all(isinstance(v, int | float) for v in scores.values()):
        raise DataError(f"{path}: example {number} needs at least two numeric target_scores")
    return Example(input=raw["input"], choices=[str(c) for c in scores], scores=[float(v) for v in scores.values()])


def build_questions(task: Task, shots: int = 0, seed: int = 0, limit: int | None = None) -> list[Question]:
    """The k-shot prompts of the first ``limit`` examples (all by default), deterministically.

    Raises:
        DataError: fewer than ``shots + 1`` examples.
    """
    if shots < 0:
        raise DataError(f"shots must be >= 0, got {shots}")
    if len(task.examples) < shots + 1:
        raise DataError(f"task {task.name!r} has {len(task.examples)} examples, too few for {shots} shots plus the question")
    count = len(task.examples) if limit is None else min(limit, len(task.examples))
    questions = []
    for index in range(count):
        rng = random.Random(f"{seed}:{index}")
        others = [i for i in range(len(task.examples)) if i != index]
        shown = [task.examples[i] for i in rng.sample(others, shots)]
        parts = [_formatted_input(task, example, rng) + example.answer for example in shown]
        example = task.examples[index]
        parts.append(_formatted_input(task, example, rng))
        questions.append(Question(task.task_prefix + task.separator.join(parts), example.choices, example.gold))
    return questions


def _formatted_input(task: Task, example: Example, rng: random.Random) -> str:
    text = example.input
    if task.append_choices:
        listed = sorted(example.choices)
        rng.shuffle(listed)
        text += task.choice_prefix + task.choice_prefix.join(listed)
    return task.input_prefix + text + task.output_prefix


def chance_accuracy(questions: list[Question]) -> tuple[float, float]:
    """(mean, standard error) of the accuracy that uniform random guessing scores on these questions.

    A guess is right on a question with probability #gold / #choices, so the mean is the average of
    those probabilities and the variance of the average is sum p(1 - p) / n^2 (independent questions;
    the plain binomial sqrt(p(1 - p) / n) when every question has the same p). acc and acc_norm share
    this baseline: a random guess does not depend on how the log-likelihoods are normalised.

    Raises:
        DataError: no questions.
    """
    if not questions:
        raise DataError("chance accuracy needs at least one question")
    odds = [len(question.gold) / len(question.choices) for question in questions]
    variance = sum(p * (1 - p) for p in odds) / len(odds) ** 2
    return sum(odds) / len(odds), variance**0.5


def constant_answer_accuracy(questions: list[Question]) -> tuple[float, str]:
    """(accuracy, answer) of always giving the answer text that is correct most often.

    The baseline a model biased towards one label ("True", "Yes") reaches without reading the
    question: a task whose first questions are mostly "True" is not above chance for a model that
    always says "True", however far its accuracy is from #gold / #choices.

    Raises:
        DataError: no questions.
    """
    if not questions:
        raise DataError("constant-answer accuracy needs at least one question")
    counts = Counter(question.choices[index] for question in questions for index in question.gold)
    answer, count = max(counts.items(), key=lambda item: (item[1], item[0]))
    return count / len(questions), answer


def choice_metrics(logprobs: list[float], choices: list[str], gold: set[int]) -> tuple[float, float]:
    """(acc, acc_norm) of one question; ties go to the first choice, as numpy's argmax does."""
    best = max(range(len(choices)), key=lambda i: (logprobs[i], -i))
    normalised = [lp / max(len(choice.encode("utf-8")), 1) for lp, choice in zip(logprobs, choices, strict=True)]
    best_norm = max(range(len(choices)), key=lambda i: (normalised[i], -i))
    return float(best in gold), float(best_norm in gold)


def evaluate_task(
    model: RecursiveModel,
    task: Task,
    shots: int = 0,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
    max_length: int | None = None,
    progress: bool = False,
) -> TaskResult:
    """Score every choice of every question in batches and average acc / acc_norm."""
    tokenizer = require_tokenizer(model)
    prefix = prefix_token_id(model, tokenizer)
    questions = build_questions(task, shots, seed, limit)
    pairs = [encode_pair(tokenizer, q.context, choice, prefix) for q in questions for choice in q.choices]
    scores = continuation_logprobs(model, pairs, max_length=max_length, batch_size=batch_size, precision=precision, progress=progress)
    acc = acc_norm = 0.0
    offset = 0
    for question in questions:
        logprobs = [score for score, _ in scores[offset : offset + len(question.choices)]]
        offset += len(question.choices)
        hit, hit_norm = choice_metrics(logprobs, question.choices, question.gold)
        acc, acc_norm = acc + hit, acc_norm + hit_norm
    return TaskResult(acc=acc / len(questions), acc_norm=acc_norm / len(questions), n=len(questions), shots=shots)
