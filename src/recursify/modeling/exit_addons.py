"""What a checkpoint directory may hold beside its weights for early exits, attached by ``recursify.load``.

- ``exit_gates.safetensors``: learned exit gates (modeling/exit_gates.py, ``recursify train-exits``);
- ``exit_ensemble.safetensors``: ZTW-style exit-ensemble weights (training/exit_ensemble.py,
  ``uptrain --exit-ensemble``);
- ``exit_calibration.json``: per-signal agreement curves measured on held-out data, from which
  ``--exit agreement:TARGET`` picks its thresholds (evaluation/calibration.py, ``train-exits``).

They are not part of the model's state dict: adding or retraining them never rewrites the weights,
and a checkpoint without them loads as before. The model keeps them in ``model.addons``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from recursify.errors import CheckpointError
from recursify.modeling.exit_gates import ExitGates, read_exit_gates

if TYPE_CHECKING:
    from recursify.modeling.model import RecursiveModel

CALIBRATION_FILE = "exit_calibration.json"


@dataclass
class ExitAddons:
    """Exit components read from beside a checkpoint; every field is None when absent."""

    gates: ExitGates | None = None
    ensemble: torch.Tensor | None = None  # (loops - 1, loops - 1) ensemble weights
    calibration: dict[str, Any] | None = None  # exit_calibration.json as written by evaluation/calibration.py


def read_calibration(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``exit_calibration.json`` of a checkpoint directory, or None when it has none."""
    path = Path(directory) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt ({err}); re-run 'recursify train-exits' or delete the file") from err
    if not isinstance(data, dict) or "signals" not in data:
        raise CheckpointError(f"{path} has no 'signals'; re-run 'recursify train-exits'")
    return data


def attach_exit_addons(model: RecursiveModel, directory: str | os.PathLike[str]) -> ExitAddons:
    """Read the gates, ensemble and calibration saved in ``directory`` into ``model.addons`` (on the model's device)."""
    from recursify.training.exit_ensemble import read_ensemble_weights

    gates = read_exit_gates(directory, model.arch.hidden_size, model.loops) if model.loops > 1 else None
    ensemble = read_ensemble_weights(directory, model.loops) if model.loops > 1 else None
    model.addons = ExitAddons(
        gates=gates.to(model.device) if gates is not None else None,
        ensemble=ensemble.to(model.device) if ensemble is not None else None,
        calibration=read_calibration(directory),
    )
    return model.addons
