"""``recursify demo``: the whole pipeline on a tiny model, its report, resume and option checks."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import numbers
from recursify.cli import main
from recursify.demo.plan import GRID, DemoOptions, Shape, Speeds, plan_budget
from recursify.demo.report import HEADLINE_KEYS, PLOTS
from recursify.errors import ConfigError
from tiny import tiny_model, tiny_tokenizer

TASK = {"name": "tiny_mc", "examples": [{"input": f"is {w} a word", "target_scores": {"yes": 1, "no": 0}} for w in ("cat", "xq", "dog")]}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama wide enough for the grid's ranks 64 and 128 (min(in, out) of the MLP = 128)."""
    directory = tmp_path_factory.mktemp("tiny-wide")
    tiny_model("llama", hidden_size=128, intermediate_size=256, head_dim=32).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    (directory / "tiny_mc").mkdir()
    (directory / "tiny_mc" / "task.json").write_text(json.dumps(TASK))
    return directory


@pytest.fixture(scope="module")
def first_run(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One quick demo run (the expensive part, done once): its run directory and a pristine copy of it."""
    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RECURSIFY_CACHE", str(root / "cache"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert main(demo_argv(source, root / "run")) == 0
        finally:
            torch.set_num_threads(threads)
    shutil.copytree(root / "run", root / "pristine")
    return root / "run", root / "pristine"


@pytest.fixture
def finished(first_run: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The run directory as the first run left it, restored before every test.

    Tests rerun the demo in place and change the directory; a run cannot be continued from a copy elsewhere
    (its records hold absolute paths), so each test gets the same path restored from the pristine copy. Reruns
    use the first run's cache (teacher-sampled data) and one thread, like the first run.
    """
    run, pristine = first_run
    shutil.rmtree(run)
    shutil.copytree(pristine, run)
    monkeypatch.setenv("RECURSIFY_CACHE", str(run.parent / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield run
    torch.set_num_threads(threads)


def demo_argv(source: Path, out: Path) -> list[str]:
    return ["demo", "--quick", "--model", str(source), "--out", str(out), "--tasks", str(source / "tiny_mc" / "task.json")]


@pytest.mark.slow  # runs recursify demo --quick (once per module)
def test_quick_demo_writes_a_complete_finite_report(finished: Path) -> None:
    report = json.loads((finished / "report.json").read_text())
    expected = {"original", *(spec.name for spec in GRID), "relaxed-l3-asvd-r64-exits"}
    assert set(report["models"]) == expected
    for name, entry in report["models"].items():
        assert entry["commands"] and all(c.startswith("recursify ") for c in entry["commands"]), name
        assert entry["eval"]["ppl"]["value"] > 1
        assert "tiny_mc" in entry["eval"]["tasks"]
    assert [row["model"] for row in report["headline"]] == list(report["models"])
    assert all(set(HEADLINE_KEYS) <= set(row) for row in report["headline"])
    exits = report["models"]["relaxed-l3-asvd-r64-exits"]
    assert any("--freeze-model" in command for command in exits["commands"])
    assert any(command.startswith("recursify train-exits") for command in exits["commands"])
    assert len(exits["eval"]["per_loop"]) == 3
    base = report["models"]["relaxed-l3-asvd-r64"]["eval"]["per_loop"]
    assert exits["eval"]["per_loop"][-1]["kl_teacher"] == pytest.approx(base[-1]["kl_teacher"], abs=1e-6)  # the last loop is untouched
    names = {row["name"] for row in report["serving"]["rows"]}
    assert {name[0] for name in names} >= {"1", "2", "5", "7"} and "5g recursive depthwise+gate" in names
    assert all(row["identical_output"] for row in report["serving"]["rows"] if row["name"].startswith("7 "))
    assert all(math.isfinite(n) for n in numbers(report))
    for path in PLOTS.values():
        assert (finished / path).stat().st_size > 1000
    markdown = (finished / "report.md").read_text()
    assert "| model |" in markdown and "recursify convert" in markdown


@pytest.mark.slow  # runs recursify demo --quick (once per module)
def test_rerun_reuses_every_step(finished: Path, source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (finished / "report.json").read_text()
    assert main(demo_argv(source, finished)) == 0
    err = capsys.readouterr().err
    assert "reused" in err and "continuing the run" in err
    after = json.loads((finished / "report.json").read_text())
    assert after["models"] == json.loads(before)["models"]


@pytest.mark.slow  # runs recursify demo --quick (once per module)
def test_interrupted_uptraining_resumes_from_its_checkpoint(finished: Path, source: Path) -> None:
    """A kill after the last checkpoint but before the step's marker: the rerun resumes, it does not retrain."""
    key = "uptrain--relaxed-l3-svd-r64"
    (finished / "state" / f"{key}.json").unlink()
    assert main(demo_argv(source, finished)) == 0
    last_command = (finished / "logs" / f"{key}.log").read_text().splitlines()
    assert [line for line in last_command if line.startswith("$ ")][-1].endswith("--resume")
    marker = json.loads((finished / "state" / f"{key}.json").read_text())
    assert marker["command"].endswith(str(finished / "uptrain" / "relaxed-l3-svd-r64"))  # recorded without --resume


@pytest.mark.slow  # runs recursify demo --quick (once per module)
def test_changed_options_are_refused_in_one_line(finished: Path, source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quick", "--model", str(source), "--out", str(finished), "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recursify: error: ") and "--fresh" in err and len(err.strip().splitlines()) == 1


def test_foreign_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(tmp_path), "--fresh"]) == 2
    assert "not a demo run directory" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_out_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recursify: error: --out") and len(err.strip().splitlines()) == 1
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_budget_grows_with_minutes_and_speed() -> None:
    shape = Shape(hidden=576, intermediate=1536, q_out=576, kv_out=192)
    slow, fast = Speeds(forward=500, train=120, sample=150), Speeds(forward=1000, train=240, sample=300)
    assert plan_budget(20, fast, shape).train_tokens > plan_budget(20, slow, shape).train_tokens
    assert plan_budget(40, slow, shape).train_tokens > plan_budget(20, slow, shape).train_tokens
    budget = plan_budget(20, slow, shape)
    assert budget.train_tokens % budget.batch_tokens == 0 and sum(budget.estimate_s.values()) <= 20 * 60


def test_lora_overhead_closed_form() -> None:
    shape = Shape(hidden=4, intermediate=8, q_out=4, kv_out=2)
    dense = 16 + 8 + 8 + 16 + 32 + 32 + 32
    assert shape.lora_overhead(0) == 0
    assert shape.lora_overhead(1) == pytest.approx((8 + 6 + 6 + 8 + 12 + 12 + 12) / dense)
    assert shape.lora_overhead(100) == pytest.approx((4 * 8 + 2 * 6 * 2 + 4 * 8 + 4 * 12 * 3) / dense)  # capped at min(in, out)


def test_minutes_are_validated() -> None:
    with pytest.raises(ConfigError, match="--minutes"):
        DemoOptions(minutes=0.5)
