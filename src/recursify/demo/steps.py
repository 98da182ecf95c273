"""Resumable steps: each demo step is a real ``recursify`` command, run in-process and recorded.

Running the CLI's own commands (instead of calling library functions with the same arguments) makes
the report's "commands to reproduce" exactly what ran. The library does not import the CLI: whoever
starts the demo (``recursify demo``) hands in ``execute``, the function that runs ``recursify ARGV``.
A step is done when its marker file exists; markers are written atomically after the command finished,
so a Ctrl-C mid-step reruns that step on the next invocation (uptraining picks up its own last
checkpoint with ``--resume``).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recursify.files import write_json

STAGES = ("model", "convert", "uptrain", "evaluate", "serve", "report")

Execute = Callable[[list[str]], None]
"""Runs ``recursify ARGV`` in this process; a user error raises the command's own ``RecursifyError``."""


@dataclass
class StepLog:
    """Where a run keeps its step markers and command logs, and how it runs a command."""

    root: Path
    execute: Execute

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def marker(self, key: str) -> Path:
        return self.state_dir / f"{key.replace('/', '--')}.json"

    def done(self, key: str) -> dict[str, Any] | None:
        path = self.marker(key)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def record(self, key: str, payload: dict[str, Any]) -> dict[str, Any]:
        write_json(self.marker(key), payload)
        return payload


def command_line(argv: list[str]) -> str:
    """The shell command a user types to repeat ``argv``."""
    return "recursify " + shlex.join(argv)


def run_command(execute: Execute, argv: list[str], log_path: Path) -> None:
    """Run ``recursify ARGV`` in this process; its stdout goes to ``log_path``, progress bars (stderr) stay visible.

    Errors propagate as the command's own ``RecursifyError`` so the demo stops with that message.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        print(f"$ {command_line(argv)}", flush=True)
        execute(argv)


class Progress:
    """Stage k/n headers and one line per step, on stderr beside the commands' own progress bars."""

    def __init__(self, stream: Any = None):
        self.stream = stream if stream is not None else sys.stderr
        self.began = time.perf_counter()

    def stage(self, name: str) -> None:
        index = STAGES.index(name) + 1
        self.say(f"\n[stage {index}/{len(STAGES)}] {name}  ({self.elapsed() / 60:.1f} min elapsed)")

    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.began


def run_step(
    steps: StepLog,
    progress: Progress,
    key: str,
    argv: list[str],
    restart: Callable[[], list[str]] = list,
) -> dict[str, Any]:
    """Run one command unless it already finished; returns its marker (command, seconds).

    ``restart()`` gives the flags that let an interrupted attempt continue or be replaced
    (``--resume`` / ``--overwrite``); they are not part of the recorded command.
    """
    finished = steps.done(key)
    if finished is not None:
        progress.say(f"  {key}: done earlier ({finished['seconds']:.0f} s), reused")
        return finished
    progress.say(f"  {key}: {command_line(argv)}")
    began = time.perf_counter()
    run_command(steps.execute, argv + restart(), steps.log_dir / f"{key.replace('/', '--')}.log")
    return steps.record(key, {"command": command_line(argv), "seconds": round(time.perf_counter() - began, 2)})
