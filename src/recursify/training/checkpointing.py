"""Atomic, exactly resumable training checkpoints inside an uptrain output directory, sharded or not.

Layout of ``out``:
    config.json, model.safetensors, tokenizer files    the latest weights: a normal recursify checkpoint
    exit_ensemble.safetensors                          with --exit-ensemble
    training/LATEST                                    name of the newest complete step directory
    training/step-00000100/                            model.safetensors (consolidated), exit ensemble,
                                                       optimizer/ (each process's shard of the AdamW
                                                       state), rng.safetensors, state.json (step,
                                                       scheduler, optimizer hyper-parameters, config)

One path for every launch (one process, DDP, FSDP2): the state dicts come from
``torch.distributed.checkpoint.state_dict``, which sees through the wrappers. The model is gathered
into one full safetensors file (what ``recursify.load`` opens on one machine) and loaded back before
``accelerator.prepare`` shards it again; the optimizer state is never gathered: every process writes
its own shard with ``torch.distributed.checkpoint`` into safetensors files that record each shard's
offsets, and reads back whatever slices its parameters need (so a resume may even use another
process count). Tensors go to safetensors and everything else to JSON: nothing is ever unpickled.

Each step directory is written under a hidden staging name and renamed; LATEST is replaced atomically
afterwards, so a kill at any moment leaves the previous checkpoint intact. The top-level weights are
hard links to the newest step's files, swapped in with ``os.replace``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from recursify.checkpoint import WEIGHTS_FILE
from recursify.errors import CheckpointError
from recursify.files import write_text
from recursify.training.exit_ensemble import ENSEMBLE_FILE

TRAINING_DIR = "training"
LATEST_FILE = "LATEST"
STATE_FILE = "state.json"
OPTIMIZER_DIR = "optimizer"
RNG_FILE = "rng.safetensors"
STUDENT_PREFIX, ENSEMBLE_PREFIX = "student.", "ensemble."  # ExitModel's children

# Optimizer state keyed by parameter name ("state.student.layers.0.q.weight.exp_avg"), one flat level:
# the form torch.distributed.checkpoint reshards, and names survive every wrapper.
_FLAT = StateDictOptions(full_state_dict=False, flatten_optimizer_state_dict=True)


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
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra: dict[str, Any],
) -> Path:
    """Write ``out/training/step-N`` atomically, point LATEST at it, refresh the top-level weights.

    Called by every process (gathering the model and writing the optimizer shards are collective);
    process 0 writes everything else. ``model`` is the ``ExitModel`` as prepared (DDP / FSDP2 / plain),
    ``optimizer`` the torch optimizer inside accelerate's wrapper.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    training = out / TRAINING_DIR
    name = f"step-{step:08d}"
    staging = training / f".{name}.partial"
    if rank == 0:
        training.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    _barrier()
    # Full weights on process 0 only (moved to the CPU as they are gathered); every process must take part.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    hyper = _save_optimizer_shards(model, optimizer, staging / OPTIMIZER_DIR)
    target = training / name
    if rank == 0:
        try:
            student = {k.removeprefix(STUDENT_PREFIX): _cpu(v) for k, v in full.items() if k.startswith(STUDENT_PREFIX)}
            ensemble = {k.removeprefix(ENSEMBLE_PREFIX): _cpu(v) for k, v in full.items() if k.startswith(ENSEMBLE_PREFIX)}
            save_file(student, str(staging / WEIGHTS_FILE), {"format": "pt"})
            if ensemble:
                save_file(ensemble, str(staging / ENSEMBLE_FILE))
            save_file({"torch": torch.get_rng_state()}, str(staging / RNG_FILE))
            state = {
                "step": step,
                "tokens_seen": tokens_seen,
                "optimizer": hyper,
                "scheduler": scheduler.state_dict(),
                "python_rng": _python_rng_to_json(random.getstate()),
                **extra,
            }
            (staging / STATE_FILE).write_text(json.dumps(state, indent=1))
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
    _barrier()
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
    if not (directory / OPTIMIZER_DIR).is_dir():
        raise CheckpointError(f"{directory} has no {OPTIMIZER_DIR}/ (written by an older recursify); restart the run without --resume")
    return TrainingCheckpoint(step=int(state["step"]), tokens_seen=int(state["tokens_seen"]), directory=directory, state=state)


def read_weights(checkpoint: TrainingCheckpoint) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The full model (and exit ensemble) tensors of a checkpoint: loaded before ``accelerator.prepare`` shards them."""
    directory = checkpoint.directory
    try:
        model_state = load_file(str(directory / WEIGHTS_FILE))
        ensemble_path = directory / ENSEMBLE_FILE
        return model_state, load_file(str(ensemble_path)) if ensemble_path.is_file() else None
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {directory} is damaged ({err}); restart the run without --resume") from err


def restore_training_state(
    checkpoint: TrainingCheckpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Load optimizer (this process's shard), scheduler and RNG states in place, after ``accelerator.prepare``.

    Every process calls it. The optimizer state is read into tensors laid out as this process's
    parameters are (``get_optimizer_state_dict`` allocates them with a zero-learning-rate step that
    leaves the weights untouched), so each process reads exactly its slices.
    """
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint import load as dcp_load

    directory = checkpoint.directory
    template = get_optimizer_state_dict(model, optimizer, options=_FLAT)
    tensors = {key: value for key, value in template.items() if isinstance(value, torch.Tensor)}
    try:
        with _one_process_quiet():
            dcp_load(tensors, storage_reader=HuggingFaceStorageReader(str(directory / OPTIMIZER_DIR)), no_dist=not dist.is_initialized())
        rng = load_file(str(directory / RNG_FILE))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {directory} is damaged ({str(err).splitlines()[0]}); restart the run without --resume") from err
    hyper = {key: tuple(value) if key.endswith(".betas") else value for key, value in checkpoint.state["optimizer"].items()}
    flat: Any = {**hyper, **tensors}
    set_optimizer_state_dict(model, optimizer, flat, options=_FLAT)
    scheduler.load_state_dict(checkpoint.state["scheduler"])
    torch.set_rng_state(rng["torch"])
    random.setstate(_python_rng_from_json(checkpoint.state["python_rng"]))


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


def _save_optimizer_shards(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> dict[str, Any]:
    """Write this process's optimizer tensors (collective); return the hyper-parameters (the same on every process)."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint import save as dcp_save

    flat = get_optimizer_state_dict(model, optimizer, options=_FLAT)
    tensors = {key: value for key, value in flat.items() if isinstance(value, torch.Tensor)}
    writer = HuggingFaceStorageWriter(str(directory), save_distributed=True)
    with _one_process_quiet():
        dcp_save(tensors, storage_writer=writer, no_dist=not dist.is_initialized())
    return {key: value for key, value in flat.items() if not isinstance(value, torch.Tensor)}


def _cpu(tensor: Any) -> torch.Tensor:
    return tensor.detach().cpu().contiguous()


@contextlib.contextmanager
def _one_process_quiet() -> Iterator[None]:
    """Silence torch.distributed.checkpoint's warning that it runs in a single process: one process is a normal launch here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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
