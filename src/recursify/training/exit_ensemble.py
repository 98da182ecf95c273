"""Exit ensembles: an early exit at loop b combines the distributions of exits 1..b.

In the spirit of Zero-Time-Waste early exits (Wolczyk et al. 2021), an exit reuses the earlier exits'
predictions instead of discarding them, through a geometric ensemble with a few learned weights:

    log q_b = log_softmax( sum_{j <= b} W[b, j] * log_softmax(z_j) )      for b < B

W is lower-triangular, (B - 1) x (B - 1), initialised to the identity (so q_b is exactly exit b's
own distribution until trained). The last exit (b = B) is always the model's own output, so an
ensemble never changes what the full-depth model predicts.

The weights live beside the checkpoint in ``exit_ensemble.safetensors``; ``recursify.load`` attaches
them (``model.addons.ensemble``, modeling/exit_addons.py) and ``exit_distribution(model, exit_logits, b)``
is then the ensemble at exit b (plain softmax(exit b) without one). The serving engine offers it to
the exit policies as ``ensemble:TAU`` (serving/exit_policy.py, docs/method.md section 6).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from recursify.errors import CheckpointError, ConfigError
from recursify.files import atomic_path

if TYPE_CHECKING:
    from recursify.modeling.model import RecursiveModel

ENSEMBLE_FILE = "exit_ensemble.safetensors"
_KEY = "weights"


class ExitEnsemble(nn.Module):
    """The learnable (B - 1) x (B - 1) lower-triangular ensemble weights of a B-loop model."""

    def __init__(self, num_exits: int):
        super().__init__()
        if num_exits < 1:
            raise ConfigError(f"an exit ensemble needs at least one exit, got {num_exits}")
        self.num_exits = num_exits
        self.weights = nn.Parameter(torch.eye(num_exits - 1))

    def forward(self, exit_logits: list[torch.Tensor]) -> list[torch.Tensor]:
        """Replace exits 1..B-1 by their ensemble log-probabilities; the last exit passes through."""
        if len(exit_logits) != self.num_exits:
            raise ConfigError(f"the ensemble was built for {self.num_exits} exits, got {len(exit_logits)}")
        combined = [ensemble_log_probs(self.weights, exit_logits, b) for b in range(1, self.num_exits)]
        return [*combined, exit_logits[-1]]


def ensemble_log_probs(weights: torch.Tensor, exit_logits: list[torch.Tensor], b: int) -> torch.Tensor:
    """log q_b from exits 1..b (1-based b < B; only the first b entries of ``exit_logits`` are read)."""
    if not 1 <= b <= weights.shape[0]:
        raise ConfigError(f"ensembled exits are 1..{weights.shape[0]}, got {b}")
    row = weights[b - 1, :b].float()
    stacked = torch.stack([F.log_softmax(z.float(), dim=-1) for z in exit_logits[:b]])  # (b, ..., vocab)
    mixed = torch.einsum("j,j...->...", row, stacked)
    return F.log_softmax(mixed, dim=-1)


def exit_distribution(model: RecursiveModel, exit_logits: list[torch.Tensor], b: int) -> torch.Tensor:
    """Next-token probabilities at exit ``b`` (1-based): the attached ensemble, else softmax(exit b).

    ``exit_logits`` holds exits 1..b at least (later ones are not needed); the last loop's exit is
    never ensembled.
    """
    weights = model.addons.ensemble
    if weights is not None and b <= weights.shape[0]:
        return ensemble_log_probs(weights, exit_logits, b).exp()
    return F.softmax(exit_logits[b - 1].float(), dim=-1)


def read_ensemble_weights(directory: str | os.PathLike[str], num_exits: int) -> torch.Tensor | None:
    """The saved (B - 1) x (B - 1) weights of a checkpoint directory, or None when it has none."""
    path = Path(directory) / ENSEMBLE_FILE
    if not path.is_file():
        return None
    try:
        weights = load_file(str(path))[_KEY]
    except (SafetensorError, OSError, KeyError) as err:
        raise CheckpointError(f"{path} is corrupt ({err}); re-run the --exit-ensemble training or delete the file") from err
    if weights.shape != (num_exits - 1, num_exits - 1):
        raise CheckpointError(f"{path} holds weights of shape {tuple(weights.shape)}, but the model has {num_exits} exits")
    return weights


def save_exit_ensemble(ensemble: ExitEnsemble, directory: str | os.PathLike[str]) -> None:
    """Write ``exit_ensemble.safetensors`` into ``directory`` atomically."""
    with atomic_path(Path(directory) / ENSEMBLE_FILE) as tmp:
        save_file({_KEY: ensemble.weights.detach().cpu().contiguous()}, str(tmp))


def load_exit_ensemble(directory: str | os.PathLike[str], num_exits: int) -> ExitEnsemble:
    """An ensemble for ``num_exits`` exits: the one saved in ``directory`` if any, else the identity."""
    ensemble = ExitEnsemble(num_exits)
    weights = read_ensemble_weights(directory, num_exits)
    if weights is not None:
        with torch.no_grad():
            ensemble.weights.copy_(weights)
    return ensemble
