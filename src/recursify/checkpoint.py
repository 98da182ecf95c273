"""Checkpoint directories: config.json + model.safetensors + tokenizer files, written atomically.

Loading reads only JSON and safetensors (no pickle), so a checkpoint from anywhere is safe to open.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from recursify.config import ArchConfig, RecursionConfig
from recursify.errors import CheckpointError, RecursifyError
from recursify.files import staged_directory
from recursify.modeling.model import RecursiveModel, SourceInfo

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


def save_pretrained(model: RecursiveModel, directory: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Write the model to ``directory`` atomically: a sibling temp dir renamed into place."""
    path = check_writable(directory, overwrite)
    with staged_directory(path) as staging:
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": dataclasses.asdict(model.arch),
            "recursion": dataclasses.asdict(model.recursion),
            "source": dataclasses.asdict(model.source),
            "params": model.param_counts(),
            "report": model.report,
        }
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
        tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(staging))


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


def load(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> RecursiveModel:
    """Load a checkpoint written by ``save_pretrained`` (weights via safetensors only)."""
    path = Path(directory)
    config = read_config(path)
    try:
        arch = ArchConfig(**config["architecture"])
        recursion = RecursionConfig(**config["recursion"])
        source = SourceInfo(**config.get("source", {}))
        model = RecursiveModel(arch, recursion, source)  # validates loops against the layers, too
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path / CONFIG_FILE} is incomplete or malformed ({err}); re-create the checkpoint") from err
    except RecursifyError as err:
        raise CheckpointError(f"{path / CONFIG_FILE} holds an invalid configuration: {err}") from err
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}; the checkpoint is incomplete, re-create it")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is corrupt ({err}); re-create the checkpoint") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first_line = str(err).splitlines()[0]
        raise CheckpointError(f"{weights} does not match its config.json ({first_line}); re-create the checkpoint") from err
    model.report = config.get("report", {})
    model.tokenizer = _load_tokenizer(path)
    return model.to(device).eval()


def _load_tokenizer(path: Path) -> Any:
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
