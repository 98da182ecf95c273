"""The lm-eval model type ``recursify``: lm-eval's own evaluator on local task YAMLs reading local JSON.

References: our batched scorer for the expected accuracy, transformers' model (over lm-eval's own
rolling windows) for rolling log-likelihoods and word perplexity, and for greedy generation.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'recursify[eval]')")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from recursify.evaluation.lm_eval_adapter import RecursifyLM  # noqa: E402
from recursify.evaluation.loglikelihood import continuation_logprobs, encode_pair  # noqa: E402
from tiny import save_tiny_checkpoint  # noqa: E402

DOCS = [
    {"question": "the sky is", "choices": ["blue", "green", "made of cheese"], "answer": 0},
    {"question": "cats say", "choices": ["meow", "woof"], "answer": 0},
    {"question": "fire is", "choices": ["cold", "hot", "wet"], "answer": 1},
    {"question": "two and two make", "choices": ["three", "four"], "answer": 1},
]
MC_YAML = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""
ROLLING_YAML = """task: toy_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}}"
metric_list:
  - metric: word_perplexity
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lm_eval")
    reference = save_tiny_checkpoint(root / "model", "llama", seed=4)
    data = root / "toy.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "toy_mc.yaml").write_text(MC_YAML.format(data=data))
    (tasks / "toy_rolling.yaml").write_text(ROLLING_YAML.format(data=data))
    lm = RecursifyLM(path=str(root / "model"), batch_size=3)
    return {"root": root, "reference": reference, "tasks": tasks, "lm": lm}


def test_registered_under_recursify() -> None:
    assert get_model("recursify") is RecursifyLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own types survive our registration (it fills an empty registry only)


def test_multiple_choice_task_through_lm_evals_evaluator(setup: dict[str, Any]) -> None:
    lm: RecursifyLM = setup["lm"]
    results = lm_eval.simple_evaluate(
        model="recursify",
        model_args=f"path={setup['root'] / 'model'},batch_size=2",
        tasks=["toy_mc"],
        task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False),
        log_samples=False,
    )
    assert results is not None
    metrics = results["results"]["toy_mc"]
    hits = hits_norm = 0
    for doc in DOCS:
        context = f"Q: {doc['question']}\nA:"
        pairs = [encode_pair(lm.tokenizer, context, " " + choice, lm.prefix_token) for choice in doc["choices"]]
        scores = [score for score, _ in continuation_logprobs(lm.model, pairs)]
        hits += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
        norm = [s / len(c) for s, c in zip(scores, doc["choices"], strict=True)]
        hits_norm += max(range(len(norm)), key=norm.__getitem__) == doc["answer"]
    assert metrics["acc,none"] == pytest.approx(hits / len(DOCS))
    assert metrics["acc_norm,none"] == pytest.approx(hits_norm / len(DOCS))


def test_rolling_task_through_lm_evals_evaluator(setup: dict[str, Any]) -> None:
    results = lm_eval.simple_evaluate(
        model="recursify",
        model_args=f"path={setup['root'] / 'model'}",
        tasks=["toy_rolling"],
        task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False),
        log_samples=False,
    )
    assert results is not None
    texts = [doc["question"] for doc in DOCS]
    words = sum(len(re.split(r"\s+", text)) for text in texts)  # lm-eval's word count
    lm: RecursifyLM = setup["lm"]
    loglikelihood = sum(reference_rolling(setup["reference"], lm, text, lm.max_length) for text in texts)
    assert results["results"]["toy_rolling"]["word_perplexity,none"] == pytest.approx(math.exp(-loglikelihood / words), rel=1e-5)


def reference_rolling(reference: Any, lm: RecursifyLM, text: str, max_length: int) -> float:
    """log P(text) as lm-eval's HF model scores it: its rolling disjoint windows, each through transformers' model."""
    tokens = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    total = 0.0
    for context, targets in map(make_disjoint_window, get_rolling_token_windows(tokens, lm.prefix_token, max_length, 1)):
        inputs = (context + targets)[:-1]
        with torch.no_grad():
            logp = reference(torch.tensor([inputs])).logits[0, -len(targets) :].log_softmax(-1)
        total += float(logp.gather(-1, torch.tensor(targets)[:, None]).sum())
    return total


def test_loglikelihood_rolling_equals_the_reference(setup: dict[str, Any]) -> None:
    lm: RecursifyLM = setup["lm"]
    text = "the quick brown fox jumps over the lazy dog " * 3
    request = Instance("loglikelihood_rolling", {}, (text,), 0)
    short = RecursifyLM(model=lm.model, max_length=16)  # forces several windows
    for adapter in (lm, short):
        [value] = adapter.loglikelihood_rolling([request])
        assert value == pytest.approx(reference_rolling(setup["reference"], lm, text, adapter.max_length), rel=1e-5)
    assert lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("",), 0)]) == [0.0]


def test_generate_until_is_greedy_and_stops_at_the_stop_string(setup: dict[str, Any]) -> None:
    lm: RecursifyLM = setup["lm"]
    prompt = "once upon a time"
    ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        greedy = setup["reference"].generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    full = lm.tokenizer.decode(greedy[0, len(ids) :].tolist(), skip_special_tokens=True)
    [free] = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 12}), 0)])
    assert full.startswith(free) and len(free) > 0
    stop = free[len(free) // 2]
    [cut] = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12}), 0)])
    assert cut == free[: free.index(stop)]


def test_needs_exactly_one_model_source(setup: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        RecursifyLM()
    with pytest.raises(ValueError, match="exactly one"):
        RecursifyLM(path="x", model=setup["lm"].model)
