"""--tasks resolution: paths, globs, bigbench:<name> from the cache, and task extraction from an archive."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from recursify.errors import DataError, SourceError
from recursify.evaluation import bigbench
from recursify.evaluation.bigbench import bigbench_root, resolve_tasks

TASK = {"examples": [{"input": "q", "target_scores": {"a": 1, "b": 0}}]}


@pytest.fixture
def cached_bigbench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A pre-fetched task tree in a private cache, so nothing touches the network."""
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    root = bigbench_root()
    for name in ("general_knowledge", "logical_deduction/three_objects"):
        (root / name).mkdir(parents=True)
        (root / name / "task.json").write_text(json.dumps(TASK))
    return root


def test_paths_globs_and_bigbench_names(tmp_path: Path, cached_bigbench: Path) -> None:
    for name in ("one", "two"):
        (tmp_path / "tasks" / name).mkdir(parents=True)
        (tmp_path / "tasks" / name / "task.json").write_text(json.dumps(TASK))
    (tmp_path / "tasks" / "flat.json").write_text(json.dumps(TASK))
    resolved = resolve_tasks(
        [str(tmp_path / "tasks" / "*" / "task.json"), str(tmp_path / "tasks" / "flat.json"), "bigbench:logical_deduction/three_objects"]
    )
    assert [name for name, _ in resolved] == ["one", "two", "flat", "logical_deduction/three_objects"]
    assert resolved[-1][1] == cached_bigbench / "logical_deduction" / "three_objects" / "task.json"
    # duplicates collapse
    assert len(resolve_tasks(["bigbench:general_knowledge", "bigbench:general_knowledge"])) == 1


@pytest.mark.parametrize("spec", ["missing/task.json", "nothing/*.json"])
def test_missing_files_are_data_errors(spec: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="matches no file"):
        resolve_tasks([str(tmp_path / spec)])


@pytest.mark.usefixtures("cached_bigbench")
@pytest.mark.parametrize("name", ["general_knowledg", "logical_deduction", "../general_knowledge"])
def test_unknown_bigbench_tasks_are_data_errors(name: str) -> None:
    with pytest.raises(DataError, match="unknown BIG-bench task"):
        resolve_tasks([f"bigbench:{name}"])


def test_fetch_extracts_only_task_files_from_an_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    members = {
        "bigbench-1.0.0/bigbench/benchmark_tasks/toy/task.json": json.dumps(TASK).encode(),
        "bigbench-1.0.0/bigbench/benchmark_tasks/toy/README.md": b"readme",
        "bigbench-1.0.0/bigbench/benchmark_tasks/task.json": b"{}",  # not inside a task folder
        "bigbench-1.0.0/setup.py": b"print('never run')",
    }

    def fake_pip(work: Path) -> str:
        (work / "tmp").mkdir()
        (work / "dist").mkdir()
        with tarfile.open(work / "dist" / "bigbench-1.0.0.tar.gz", "w:gz") as tar:
            for name, payload in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        return ""

    monkeypatch.setattr(bigbench, "_pip_download_sdist", fake_pip)
    root = bigbench.fetch_bigbench()
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == ["toy/task.json"]
    assert resolve_tasks(["bigbench:toy"]) == [("toy", root / "toy" / "task.json")]
    assert not list(root.parent.glob(".fetch-*"))  # the staging directory is gone


def test_fetch_copies_task_files_from_the_tree_pip_unpacked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))

    def fake_pip(work: Path) -> str:
        tasks = work / "tmp" / "pip-download-x" / "bigbench_abc" / "bigbench" / "benchmark_tasks"
        (tasks / "toy" / "sub").mkdir(parents=True)
        (tasks / "toy" / "sub" / "task.json").write_text(json.dumps(TASK))
        (tasks / "toy" / "data.txt").write_text("x")
        return "ERROR: Distributions from PyPI cannot declare direct URL dependencies."

    monkeypatch.setattr(bigbench, "_pip_download_sdist", fake_pip)
    root = bigbench.fetch_bigbench()
    assert [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()] == ["toy/sub/task.json"]


def test_fetch_failure_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))

    def failing_pip(work: Path) -> str:
        (work / "tmp").mkdir()
        return "ERROR: No matching distribution found for bigbench==1.0.0"

    monkeypatch.setattr(bigbench, "_pip_download_sdist", failing_pip)
    with pytest.raises(SourceError, match="No matching distribution"):
        bigbench.fetch_bigbench()
    assert not bigbench_root().exists()
