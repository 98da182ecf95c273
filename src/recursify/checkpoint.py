"""Checkpoint directories on disk: config.json + model.safetensors + tokenizer files, written atomically.

This module knows files, not models: ``RecursiveModel.save_pretrained`` / ``from_pretrained``
(modeling/model.py) build the config and tensors and call it, so the model depends on its storage and
not the other way round. Reading uses only JSON and safetensors (no pickle), so a checkpoint from
anywhere is safe to open.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from recursify.errors import CheckpointError
from recursify.files import staged_directory

FORMAT = "recursify"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory written by ``save_pretrained``."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def check_writable(directory: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse to replace an existing directory unless asked; call before any long work."""
    path = Path(directory)
    if path.exists() and not overwrite:
        raise CheckpointError(f"output directory {path} already exists; pass --overwrite (overwrite=True) to replace it")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"output path {path} exists and is not a directory")
    return path


def write_checkpoint(
    directory: str | os.PathLike[str], config: dict[str, Any], tensors: dict[str, torch.Tensor], tokenizer: Any, overwrite: bool = False
) -> None:
    """Write config.json (stamped with the format), model.safetensors and the tokenizer atomically.

    Everything goes to a sibling temp directory that is renamed into place, so an interrupted
    write leaves the previous checkpoint (or none), never a half-written one.
    """
    path = check_writable(directory, overwrite)
    with staged_directory(path) as staging:
        stamped = {"format": FORMAT, "format_version": FORMAT_VERSION, **config}
        (staging / CONFIG_FILE).write_text(json.dumps(stamped, indent=2, default=str))
        save_file({name: t.detach().contiguous() for name, t in tensors.items()}, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed config.json of a checkpoint, with clear errors for what is missing or wrong."""
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no {CONFIG_FILE}; is it a directory written by 'recursify convert'?")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err}); re-create the checkpoint") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a recursify checkpoint (config.json lacks format={FORMAT!r}); convert it first with 'recursify convert'"
        )
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer recursify (format {config['format_version']}); upgrade recursify")
    return config


def read_weights(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's model.safetensors (never a pickle)."""
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}; the checkpoint is incomplete, re-create it")
    try:
        return load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is corrupt ({err}); re-create the checkpoint") from err


def load_tokenizer(directory: str | os.PathLike[str]) -> Any:
    """The tokenizer saved beside the weights, or None when the checkpoint has none."""
    path = Path(directory)
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
