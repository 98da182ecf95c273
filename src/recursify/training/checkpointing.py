"""Atomic, exactly resumable training checkpoints inside an uptrain output directory.

Layout of ``out``:
    config.json, model.safetensors, tokenizer files    the latest weights: a normal recursify checkpoint
    exit_ensemble.safetensors                          with --exit-ensemble
    training/LATEST                                    name of the newest complete step directory
    training/step-00000100/                            model, optimizer, exit ensemble (safetensors),
                                                       state.json (step, scheduler, RNG, config)
Each step directory is written under a temporary name and renamed; LATEST is replaced atomically
afterwards, so a kill at any moment leaves the previous checkpoint intact. The top-level weights
are hard links to the newest step's files, swapped in with ``os.replace``. Tensors go to
safetensors and everything else to JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from recursify.checkpoint import WEIGHTS_FILE
from recursify.errors import CheckpointError
from recursify.files import write_text
from recursify.training.exit_ensemble import ENSEMBLE_FILE

TRAINING_DIR = "training"
LATEST_FILE = "LATEST"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"


@dataclass
class TrainingCheckpoint:
    """What a resumed run needs besides the model: read back from ``training/step-N``."""

    step: int
    tokens_seen: int
    directory: Path
    state: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.state["config"])


def save_checkpoint(
    out: Path,
    step: int,
    tokens_seen: int,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ensemble_state: dict[str, torch.Tensor] | None,
    extra: dict[str, Any],
) -> Path:
    """Write ``out/training/step-N`` atomically, point LATEST at it, refresh the top-level weights."""
    training = out / TRAINING_DIR
    training.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=training))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(staging / WEIGHTS_FILE), {"format": "pt"})
        if ensemble_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ensemble_state.items()}, str(staging / ENSEMBLE_FILE))
        optimizer_tensors, optimizer_json = _split_optimizer_state(optimizer.state_dict())
        save_file(optimizer_tensors, str(staging / OPTIMIZER_FILE))
        save_file({"torch": torch.get_rng_state()}, str(staging / RNG_FILE))
        state = {
            "step": step,
            "tokens_seen": tokens_seen,
            "optimizer": optimizer_json,
            "scheduler": scheduler.state_dict(),
            "python_rng": _python_rng_to_json(random.getstate()),
            **extra,
        }
        (staging / STATE_FILE).write_text(json.dumps(state, indent=1))
        target = training / name
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_text(training / LATEST_FILE, name)
    for file in (WEIGHTS_FILE, ENSEMBLE_FILE):
        if (target / file).is_file():
            _link_atomic(target / file, out / file)
    remove_stale(out)
    return target


def latest_checkpoint(out: Path) -> TrainingCheckpoint:
    """The newest complete checkpoint of a run, for ``--resume``."""
    pointer = out / TRAINING_DIR / LATEST_FILE
    if not pointer.is_file():
        raise CheckpointError(f"{out} has no training checkpoint to resume ({pointer} is missing); start without --resume")
    directory = out / TRAINING_DIR / pointer.read_text().strip()
    try:
        state = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory / STATE_FILE} is unreadable ({err}); the checkpoint is damaged, restart the run") from err
    return TrainingCheckpoint(step=int(state["step"]), tokens_seen=int(state["tokens_seen"]), directory=directory, state=state)


def restore(
    checkpoint: TrainingCheckpoint, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Load optimizer, scheduler and RNG states in place; return the model (and ensemble) tensors."""
    directory = checkpoint.directory
    try:
        model_state = load_file(str(directory / WEIGHTS_FILE))
        ensemble_path = directory / ENSEMBLE_FILE
        ensemble_state = load_file(str(ensemble_path)) if ensemble_path.is_file() else None
        optimizer_tensors = load_file(str(directory / OPTIMIZER_FILE))
        rng = load_file(str(directory / RNG_FILE))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {directory} is damaged ({err}); restart the run without --resume") from err
    optimizer.load_state_dict(_join_optimizer_state(optimizer_tensors, checkpoint.state["optimizer"]))
    scheduler.load_state_dict(checkpoint.state["scheduler"])
    torch.set_rng_state(rng["torch"])
    random.setstate(_python_rng_from_json(checkpoint.state["python_rng"]))
    return model_state, ensemble_state


def remove_stale(out: Path) -> None:
    """Delete step directories other than LATEST's and leftovers of interrupted writes."""
    training = out / TRAINING_DIR
    pointer = training / LATEST_FILE
    keep = pointer.read_text().strip() if pointer.is_file() else None
    for entry in training.iterdir():
        if entry.is_dir() and entry.name != keep:
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file() and entry.name.startswith("."):
            entry.unlink(missing_ok=True)
    for entry in out.iterdir():
        if entry.is_file() and entry.name.startswith(".") and entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state dict -> (tensors keyed ``param.name``, JSON of the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], saved: dict[str, Any]) -> dict[str, Any]:
    slots: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = tensor
    for index, values in saved["scalars"].items():
        slots.setdefault(int(index), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in saved["param_groups"]]
    return {"state": slots, "param_groups": groups}


def _python_rng_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(saved: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)


def _link_atomic(source: Path, target: Path) -> None:
    """Make ``target`` name the same file as ``source`` (hard link; a copy where links fail)."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
