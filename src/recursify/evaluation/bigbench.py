"""Resolve ``--tasks`` specs to BIG-bench task files, fetching the real BIG-bench tasks from PyPI once.

A spec is a ``task.json`` path, a glob of them, or ``bigbench:<task>`` (``bigbench:<task>/<subtask>``
for tasks split into subtasks), e.g. ``bigbench:general_knowledge``, ``bigbench:hindu_knowledge``,
``bigbench:logical_deduction/three_objects``.

The tasks ship in the source archive of PyPI's ``bigbench==1.0.0``. It is fetched with pip (no hub
access needed) but never installed: modern pip refuses to finish downloading it, because its
metadata declares a ``file://`` dependency, after it has unpacked it; so pip runs with
``--no-clean`` in a private temp directory and only the ``task.json`` files are copied out of the
unpacked tree (or out of the archive, should a pip version save it), into
``cache_root()/data/bigbench/benchmark_tasks``. The copy is published by an atomic rename.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from recursify.errors import DataError, SourceError

BIGBENCH_PREFIX = "bigbench:"
BIGBENCH_PACKAGE = "bigbench"
BIGBENCH_VERSION = "1.0.0"
EXAMPLE_TASKS = ("general_knowledge", "hindu_knowledge", "logical_deduction/three_objects")
_TASKS_DIR = "benchmark_tasks"


def bigbench_root() -> Path:
    """Where the fetched ``benchmark_tasks`` tree lives."""
    from recursify.sources import cache_root

    return cache_root() / "data" / "bigbench" / f"{BIGBENCH_PACKAGE}-{BIGBENCH_VERSION}" / _TASKS_DIR


def resolve_tasks(specs: list[str]) -> list[tuple[str, Path]]:
    """(name, task.json path) for every spec, in order, without duplicates.

    Raises:
        DataError: a path or glob that matches nothing, or an unknown BIG-bench task name.
    """
    resolved: dict[Path, str] = {}
    for spec in specs:
        if spec.startswith(BIGBENCH_PREFIX):
            name = spec.removeprefix(BIGBENCH_PREFIX).strip("/")
            resolved.setdefault(bigbench_task_path(name), name)
            continue
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True)) if glob.has_magic(spec) else [spec]
        files = [Path(m) for m in matches if Path(m).is_file()]
        if not files:
            raise DataError(
                f"--tasks {spec!r} matches no file; give task.json paths, a glob, or bigbench:<task> (e.g. bigbench:{EXAMPLE_TASKS[0]})"
            )
        for file in files:
            resolved.setdefault(file, _task_name(file))
    return [(name, path) for path, name in resolved.items()]


def _task_name(path: Path) -> str:
    return path.stem if path.name != "task.json" else path.parent.name


def bigbench_task_path(name: str) -> Path:
    """The cached ``task.json`` of a BIG-bench task, fetching the task collection on first use."""
    root = fetch_bigbench()
    path = root / name / "task.json"
    if ".." in Path(name).parts or not path.is_file():
        nearby = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(name[:3]))[:8]
        hint = f" (similar: {', '.join(nearby)})" if nearby else ""
        raise DataError(f"unknown BIG-bench task {name!r}{hint}; task names are the folders under {root}")
    return path


def fetch_bigbench() -> Path:
    """The ``benchmark_tasks`` directory of BIG-bench, fetched from PyPI on first use.

    Raises:
        SourceError: pip could not fetch the archive, or it held no task files.
    """
    root = bigbench_root()
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching BIG-bench tasks ({BIGBENCH_PACKAGE}=={BIGBENCH_VERSION} source archive) from PyPI ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".fetch-") as tmp:
        work = Path(tmp)
        staging = work / _TASKS_DIR
        pip_tail = _pip_download_sdist(work)
        copied = _copy_from_archive(work / "dist", staging) or _copy_from_unpacked(work / "tmp", staging)
        if copied == 0:
            raise SourceError(
                f"pip fetched no BIG-bench task files ({pip_tail or 'no output'}); check network access to PyPI "
                f"(proxy, PIP_INDEX_URL), or pass task.json files to --tasks instead"
            )
        if not root.is_dir():  # another process may have finished first
            os.replace(staging, root)
    return root


def _pip_download_sdist(work: Path) -> str:
    """Run pip; return the tail of its stderr (it exits non-zero even when the tree was unpacked)."""
    (work / "tmp").mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-clean", "--progress-bar", "off"]
    cmd += ["-d", str(work / "dist"), f"{BIGBENCH_PACKAGE}=={BIGBENCH_VERSION}"]
    env = {**os.environ, "TMPDIR": str(work / "tmp")}
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    except OSError as err:
        raise SourceError(f"cannot run pip to fetch BIG-bench ({err}); install pip in this environment") from err
    return " | ".join(result.stderr.strip().splitlines()[-2:])


def _copy_from_archive(dist: Path, staging: Path) -> int:
    archives = sorted(dist.glob("*.tar.gz")) if dist.is_dir() else []
    if not archives:
        return 0
    copied = 0
    with tarfile.open(archives[0]) as tar:
        for member in tar:
            relative = _task_relative(Path(member.name))
            if relative is None or not member.isfile():
                continue
            source = tar.extractfile(member)
            if source is None:
                continue
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with source, target.open("wb") as out:
                shutil.copyfileobj(source, out)
            copied += 1
    return copied


def _copy_from_unpacked(tmp: Path, staging: Path) -> int:
    copied = 0
    for file in tmp.glob(f"pip-*/*/bigbench/{_TASKS_DIR}/**/task.json"):
        relative = _task_relative(file)
        if relative is None or file.is_symlink():
            continue
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
        copied += 1
    return copied


def _task_relative(path: Path) -> Path | None:
    """``<task>[/<subtask>]/task.json`` below ``bigbench/benchmark_tasks``, or None for other files."""
    parts = path.parts
    for index in range(len(parts) - 1):
        if parts[index : index + 2] == ("bigbench", _TASKS_DIR) and path.name == "task.json":
            relative = Path(*parts[index + 2 :])
            return relative if ".." not in relative.parts and len(relative.parts) >= 2 else None
    return None
