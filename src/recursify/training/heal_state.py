"""The on-disk state of a healing run, so that an interrupted run continues where it stopped (``--resume``).

While ``heal`` writes ``OUT``, the hidden sibling ``.OUT.heal/`` holds:

    state.json          the phase ("local" or "kd"), the local phase's CPU seconds and schedule, the report
                        so far, the run's options (a resume must repeat them) and the newest checkpoint's name
    local-NNNNNNNN/     the student after local step N (a recursify checkpoint) + optimizer.safetensors
                        (AdamW's moments and step counts: tensors only, nothing is unpickled)
    staged/             the student the KD phase starts from, once the local phase has ended
    metrics.jsonl       the local phase's log (records after the resumed checkpoint are dropped)

The KD phase checkpoints inside ``OUT`` itself (uptraining's ``training/`` directory, every ``save_every``
steps) and continues with uptraining's own resume. A checkpoint is written in full before state.json
(replaced atomically) names it, and older ones are removed only after that, so a kill at any moment leaves
a usable state. The directory is removed when the run completes.

The local phase's batches are a function of the step (``schedule.batch_rows``) and the teacher's states
are recomputed deterministically, so a resumed run takes the same steps from the same weights and
optimizer state as the uninterrupted one would; its learning rate, a function of the CPU-time spent,
continues from the saved CPU seconds (recomputing the teacher's states on resume is not charged).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from recursify.errors import CheckpointError, ConfigError
from recursify.files import atomic_path, write_json
from recursify.training.config import HEAL_OPERATIONAL_FIELDS, HealConfig, option_mismatches

if TYPE_CHECKING:
    from recursify.modeling.model import RecursiveModel

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STAGED_DIR = "staged"


def work_dir(out: str | Path) -> Path:
    """Where the run writing ``out`` keeps its state until it completes."""
    path = Path(out)
    return path.parent / f".{path.name}.heal"


def interrupted(out: str | Path) -> bool:
    """Whether an interrupted healing run of ``out`` can be resumed."""
    return (work_dir(out) / STATE_FILE).is_file()


def open_state(config: HealConfig) -> tuple[Path, dict[str, Any] | None]:
    """The work directory and, with ``config.resume``, the saved state; refuses what would lose or mix up work."""
    work = work_dir(config.out)
    state_file = work / STATE_FILE
    if config.resume:
        if not state_file.is_file():
            raise CheckpointError(f"nothing to resume: no interrupted healing run of {config.out} (in {work}); run without --resume")
        state = json.loads(state_file.read_text())
        mismatches = option_mismatches(options(config), state["options"], HEAL_OPERATIONAL_FIELDS)
        if mismatches:
            raise ConfigError(f"--resume needs the interrupted run's options; these differ: {'; '.join(mismatches)}")
        return work, state
    if state_file.is_file() and not config.overwrite:
        raise CheckpointError(
            f"{work} holds an interrupted healing run of {config.out}: pass --resume to continue it or --overwrite to start over"
        )
    if work.exists():  # replaced (--overwrite), or left by a run that stopped before its first checkpoint
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work, None


def options(config: HealConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save(work: Path, state: dict[str, Any]) -> None:
    """Replace state.json atomically."""
    write_json(work / STATE_FILE, state)


def save_local(work: Path, state: dict[str, Any], student: RecursiveModel, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    """Checkpoint the local phase at ``step``: the student, AdamW's state, then ``state`` naming them; older ones go."""
    name = f"local-{step:08d}"
    directory = work / name
    student.save_pretrained(directory, overwrite=True)
    tensors = {f"{index}.{key}": value for index, entry in optimizer.state_dict()["state"].items() for key, value in entry.items()}
    with atomic_path(directory / OPTIMIZER_FILE) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
    state = {**state, "checkpoint": name}
    save(work, state)
    for old in work.glob("local-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return state


def restore_optimizer(work: Path, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Load the checkpointed AdamW state into ``optimizer`` (built over the same parameters, in the same order)."""
    saved: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(work / state["checkpoint"] / OPTIMIZER_FILE)).items():
        index, _, name = key.partition(".")
        saved.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": saved, "param_groups": optimizer.state_dict()["param_groups"]})


def checkpoint_path(work: Path, state: dict[str, Any] | None) -> Path | None:
    """The local checkpoint a resume starts from (None: start from the converted student)."""
    if state is None or "checkpoint" not in state:
        return None
    return work / state["checkpoint"]
