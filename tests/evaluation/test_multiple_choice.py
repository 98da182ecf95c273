"""Few-shot multiple choice: prompt construction, batched continuation scoring and acc / acc_norm.

References: transformers' model scoring each (context, continuation) alone, hand-written prompts
in BIG-bench's format, and hand-picked log-likelihoods where byte and character lengths disagree.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch

import recursify
from recursify.errors import ConfigError, DataError
from recursify.evaluation.loglikelihood import continuation_logprobs, encode_pair
from recursify.evaluation.multiple_choice import (
    Example,
    Question,
    Task,
    build_questions,
    chance_accuracy,
    choice_metrics,
    constant_answer_accuracy,
    evaluate_task,
    load_task,
)
from recursify.modeling.model import RecursiveModel
from tiny import tiny_model, tiny_tokenizer

TOY = {
    "name": "toy",
    "task_prefix": "Pick one.\n",
    "example_input_prefix": "Q: ",
    "example_output_prefix": "\nA: ",
    "append_choices_to_input": False,
    "few_shot_example_separator": "\n\n",
    "examples": [
        {"input": "sky color", "target_scores": {"blue": 1, "green": 0, "red": 0}},
        {"input": "grass color", "target_scores": {"blue": 0, "green": 1}},
        {"input": "two plus two", "target_scores": {"four": 1, "five": 0, "three": 0}},
        {"input": "cats say", "target_scores": {"meow": 1, "woof": 0}},
        {"input": "fire is", "target_scores": {"hot": 1, "cold": 0, "wet": 0}},
    ],
}


@cache
def _pair() -> tuple[torch.nn.Module, RecursiveModel]:
    reference = tiny_model("llama", seed=11)
    model = recursify.convert(reference, loops=1, progress=False)
    model.tokenizer = tiny_tokenizer()
    return reference, model


def _write(tmp_path: Path, data: object, name: str = "task.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _reference_logprob(reference: torch.nn.Module, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = reference(ids[:, :-1]).logits[0].log_softmax(-1)
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    return sum(float(logp[p, t]) for p, t in zip(positions, continuation, strict=True))


def test_zero_shot_prompt_follows_bigbench_format(tmp_path: Path) -> None:
    task = load_task(_write(tmp_path, TOY))
    [first, *_] = build_questions(task)
    assert first.context == "Pick one.\nQ: sky color\nA: "
    assert first.choices == ["blue", "green", "red"] and first.gold == {0}


def test_bigbench_defaults_append_shuffled_choices(tmp_path: Path) -> None:
    data = {"examples": [{"input": "x?", "target_scores": {"b": 0, "a": 1}}, {"input": "y?", "target_scores": {"c": 1, "d": 0}}]}
    task = load_task(_write(tmp_path, data))
    assert task.name == tmp_path.name  # no "name": the task folder
    context = build_questions(task)[0].context
    assert context in ("\nQ: x?\n  choice: a\n  choice: b\nA: ", "\nQ: x?\n  choice: b\n  choice: a\nA: ")


def test_k_shot_prompts_are_deterministic_and_never_show_the_question(tmp_path: Path) -> None:
    task = load_task(_write(tmp_path, TOY))
    questions = build_questions(task, shots=2, seed=3)
    assert questions == build_questions(task, shots=2, seed=3)
    assert build_questions(task, shots=2, seed=3, limit=2) == questions[:2]
    for example, question in zip(task.examples, questions, strict=True):
        body = question.context.removeprefix(task.task_prefix)
        blocks = body.split("\n\n")
        assert len(blocks) == 3 and blocks[-1] == f"Q: {example.input}\nA: "
        shown = [block.split("\n")[0].removeprefix("Q: ") for block in blocks[:2]]
        assert example.input not in shown and len(set(shown)) == 2
        for block in blocks[:2]:  # a shot shows its best answer
            shot = next(e for e in task.examples if block.startswith(f"Q: {e.input}\n"))
            assert block == f"Q: {shot.input}\nA: {shot.answer}"
    assert any(a != b for a, b in zip(questions, build_questions(task, shots=2, seed=4), strict=True))


def test_too_few_examples_for_the_shots(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="too few"):
        build_questions(load_task(_write(tmp_path, TOY)), shots=5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "parent", "subtasks": [{"name": "a"}, {"name": "b"}]}, "subtasks"),
        ({"examples": [{"input": "x", "target": "y"}]}, "target_scores"),
        ({"examples": [{"input": "x", "target_scores": {"only": 1}}]}, "two"),
        ([1, 2], "examples"),
    ],
)
def test_bad_task_files(tmp_path: Path, data: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_task(_write(tmp_path, data))


def test_unreadable_task_file(tmp_path: Path) -> None:
    path = tmp_path / "task.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="cannot read"):
        load_task(path)


def test_encode_pair_moves_trailing_space_to_the_continuation() -> None:
    tokenizer = tiny_tokenizer()
    context, continuation = encode_pair(tokenizer, "ab ", "cd", prefix_token=1)
    assert tokenizer.decode(context) == "ab" and tokenizer.decode(continuation) == " cd"
    assert encode_pair(tokenizer, "", "cd", prefix_token=1) == ([1], tokenizer("cd", add_special_tokens=False)["input_ids"])


def test_batched_continuation_scores_equal_one_by_one_references() -> None:
    reference, model = _pair()
    generator = torch.Generator().manual_seed(0)
    pairs = [
        (torch.randint(3, 97, (n,), generator=generator).tolist(), torch.randint(3, 97, (m,), generator=generator).tolist())
        for n, m in [(1, 1), (9, 3), (4, 6), (15, 1), (2, 2)]
    ]
    scores = continuation_logprobs(model, pairs, batch_size=3)
    for (context, continuation), (logprob, greedy) in zip(pairs, scores, strict=True):
        assert logprob == pytest.approx(_reference_logprob(reference, context, continuation), rel=1e-5, abs=1e-5)
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            argmax = reference(ids[:, :-1]).logits[0, len(context) - 1 :].argmax(-1).tolist()
        assert greedy == (argmax == continuation)


def test_greedy_flag_is_true_for_the_models_own_continuation() -> None:
    reference, model = _pair()
    context = [5, 6, 7]
    with torch.no_grad():
        continuation = reference.generate(torch.tensor([context]), max_new_tokens=3, do_sample=False)[0, 3:].tolist()
    [(_, greedy)] = continuation_logprobs(model, [(context, continuation)])
    assert greedy


def test_long_inputs_lose_context_from_the_left() -> None:
    reference, model = _pair()
    context, continuation = list(range(10, 40)), [50, 51]
    [(logprob, _)] = continuation_logprobs(model, [(context, continuation)], max_length=8)
    assert logprob == pytest.approx(_reference_logprob(reference, context[-7:], continuation), rel=1e-5)


def test_empty_continuation_is_an_error() -> None:
    with pytest.raises(ConfigError, match="zero tokens"):
        continuation_logprobs(_pair()[1], [([5], [])])


def test_acc_norm_divides_by_utf8_bytes_not_characters() -> None:
    choices = ["é", "ab"]  # 1 character / 2 bytes, 2 characters / 2 bytes
    logprobs = [-1.5, -2.0]
    # by bytes: -0.75 vs -1.0 -> choice 0; by characters it would be -1.5 vs -1.0 -> choice 1
    assert choice_metrics(logprobs, choices, {0}) == (1.0, 1.0)
    assert choice_metrics(logprobs, choices, {1}) == (0.0, 0.0)
    # raw argmax and normalised argmax can disagree
    assert choice_metrics([-3.0, -4.0], ["a", "bbbb"], {1}) == (0.0, 1.0)
    # ties go to the first choice; several correct choices all count
    assert choice_metrics([-1.0, -1.0], ["a", "b"], {1}) == (0.0, 0.0)
    assert choice_metrics([-1.0, -2.0, -3.0], ["a", "b", "c"], {0, 2}) == (1.0, 1.0)


def test_task_accuracy_equals_a_hand_computation(tmp_path: Path) -> None:
    reference, model = _pair()
    tokenizer = model.tokenizer
    task = load_task(_write(tmp_path, TOY))
    result = evaluate_task(model, task, shots=1, seed=0, batch_size=4)
    hits = hits_norm = 0
    for question in build_questions(task, shots=1, seed=0):
        logprobs = []
        for choice in question.choices:
            # lm-eval's split by hand: the prompt's trailing space belongs to the answer
            context_ids = tokenizer(question.context.rstrip(" "), add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            logprobs.append(_reference_logprob(reference, context_ids, answer_ids))
        best = max(range(len(logprobs)), key=lambda i: logprobs[i])
        best_norm = max(range(len(logprobs)), key=lambda i: logprobs[i] / len(question.choices[i].encode()))
        hits += best in question.gold
        hits_norm += best_norm in question.gold
    assert result.n == 5 and result.shots == 1
    assert result.acc == pytest.approx(hits / 5) and result.acc_norm == pytest.approx(hits_norm / 5)


def test_gold_is_every_best_scored_choice() -> None:
    example = Example(input="q", choices=["a", "b", "c"], scores=[0.5, 1.0, 1.0])
    assert example.gold == {1, 2} and example.answer == "b"
    task = Task(name="t", examples=[example, example])
    assert build_questions(task)[0].gold == {1, 2}


def test_chance_accuracy_of_the_toy_task_by_hand(tmp_path: Path) -> None:
    questions = build_questions(load_task(_write(tmp_path, TOY)))
    # 3, 2, 3, 2, 3 choices with one gold each: (1/3 + 1/2 + 1/3 + 1/2 + 1/3) / 5 = 2/5
    mean, se = chance_accuracy(questions)
    assert mean == pytest.approx(2 / 5)
    # variance of the mean: (3 * (1/3)(2/3) + 2 * (1/2)(1/2)) / 25 = (2/3 + 1/2) / 25 = 7/150
    assert se == pytest.approx((7 / 150) ** 0.5)
    # several gold choices raise the odds; equal odds give the plain binomial standard error
    same = [Question("q", ["a", "b", "c", "d"], {0, 2})] * 4
    assert chance_accuracy(same) == pytest.approx((0.5, (0.25 / 4) ** 0.5))


def test_constant_answer_accuracy_counts_the_most_common_gold_text() -> None:
    questions = [
        Question("q1", ["True", "False"], {0}),
        Question("q2", ["False", "True"], {1}),
        Question("q3", ["True", "False"], {1}),
        Question("q4", ["yes", "True", "no"], {0, 1}),
    ]
    assert constant_answer_accuracy(questions) == (0.75, "True")
    with pytest.raises(DataError, match="at least one"):
        constant_answer_accuracy([])
    with pytest.raises(DataError, match="at least one"):
        chance_accuracy([])
