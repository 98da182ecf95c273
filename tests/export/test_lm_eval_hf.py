"""lm-eval's own ``hf`` model type runs a transformers export unchanged, and scores it as the ``recursify`` type does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'recursify[eval]')")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import recursify.evaluation.lm_eval_adapter  # noqa: E402, F401  registers "recursify"; lm-eval's own types must survive it
from recursify import convert  # noqa: E402
from recursify.export import export_transformers  # noqa: E402
from tiny import save_tiny_checkpoint  # noqa: E402

DOCS = [
    {"question": "the sky is", "choices": ["blue", "green", "made of cheese"], "answer": 0},
    {"question": "cats say", "choices": ["meow", "woof"], "answer": 0},
    {"question": "fire is", "choices": ["cold", "hot", "wet"], "answer": 1},
]
TASKS = {
    "toy_mc": """output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
""",
    "toy_gen": """output_type: generate_until
doc_to_target: "{{choices[answer]}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
}
COMMON = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "Q: {{{{question}}}}\\nA:"
metadata:
  version: 1.0
"""


@pytest.mark.slow  # ~5 s: two full lm-eval runs
def test_hf_model_type_on_the_export_equals_the_recursify_type(tmp_path: Path) -> None:
    save_tiny_checkpoint(tmp_path / "source", "llama", seed=4)
    convert(str(tmp_path / "source"), loops=3, rank=4, init="average", progress=False).save_pretrained(str(tmp_path / "rrt"))
    export_transformers(tmp_path / "rrt", tmp_path / "hf")
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (tmp_path / "tasks").mkdir()
    for name, body in TASKS.items():
        (tmp_path / "tasks" / f"{name}.yaml").write_text(COMMON.format(name=name, data=tmp_path / "toy.jsonl") + body)
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    runs = {}
    for model, args in (("hf", f"pretrained={tmp_path / 'hf'},trust_remote_code=True"), ("recursify", f"path={tmp_path / 'rrt'}")):
        runs[model] = lm_eval.simple_evaluate(
            model=model, model_args=args, tasks=list(TASKS), task_manager=manager, log_samples=True, device="cpu"
        )
    hf, ours = runs["hf"], runs["recursify"]
    assert hf is not None and ours is not None
    assert hf["config"]["model"] == "hf"
    scores = [[[pair[0] for pair in resp] for resp in sample["resps"]] for sample in hf["samples"]["toy_mc"]]
    expected = [[[pair[0] for pair in resp] for resp in sample["resps"]] for sample in ours["samples"]["toy_mc"]]
    assert scores == [[pytest.approx(choice, rel=1e-5) for choice in doc] for doc in expected]
    assert [s["resps"] for s in hf["samples"]["toy_gen"]] == [s["resps"] for s in ours["samples"]["toy_gen"]]
    assert any(resp[0][0] for s in hf["samples"]["toy_gen"] for resp in [s["resps"]])  # something was generated
    assert hf["results"]["toy_mc"]["acc,none"] == ours["results"]["toy_mc"]["acc,none"]
