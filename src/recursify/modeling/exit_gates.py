"""Learned exit gates and the hidden-state saturation signal: exit decisions that never run the LM head.

A confidence exit needs the full-vocabulary head after every loop (for SmolLM2 about half a loop's
cost) just to decide; the head should run once per token, on the loop where the token leaves. Two
decisions read only the loop-end hidden state h_b:

- **saturation** (no parameters): the residual stream's relative change over the loop,
  ||h_b - h_{b-1}|| / ||h_{b-1}||, where h_{b-1} is the state entering the loop (the embedding
  for the first loop). A token whose state has stopped moving exits.
- **gates** (a classifier per non-final loop): P(the token this loop would emit equals the final
  loop's), from the RMS-normalised h_b and the log of its relative change. A linear layer or a
  one-hidden-layer MLP of ``width`` units: 578 x 64 multiply-adds per token on SmolLM2 (~0.1% of a
  loop). They are trained on a frozen model from hidden states collected once
  (``recursify train-exits``, training/exit_training.py) and stored beside the checkpoint in
  ``exit_gates.safetensors``; ``recursify.load`` attaches them (``model.addons.gates``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from recursify.errors import CheckpointError, ConfigError
from recursify.files import atomic_path

GATES_FILE = "exit_gates.safetensors"


def relative_change(h: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """||h - previous|| / ||previous|| over the last dim, in float32: [..., hidden] x2 -> [...]."""
    h32, p32 = h.float(), previous.float()
    return (h32 - p32).norm(dim=-1) / p32.norm(dim=-1).clamp_min(1e-12)


def gate_features(h: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """[..., hidden + 1]: the RMS-normalised loop-end state and the log of its relative change (float32)."""
    h32 = h.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)
    change = relative_change(h, previous).clamp_min(1e-6).log()
    return torch.cat([normed, change[..., None]], dim=-1)


class ExitGates(nn.Module):
    """One gate per non-final loop: features [..., hidden + 1] -> exit logit [...].

    ``width`` 0 is a linear gate; otherwise an MLP with ``width`` GELU units. Parameters are stacked
    over loops (first layer [loops - 1, features, width or 1]).
    """

    def __init__(self, hidden: int, loops: int, width: int = 64):
        super().__init__()
        if loops < 2 or width < 0:
            raise ConfigError(f"exit gates need a model with loops >= 2 and a width >= 0, got loops={loops}, width={width}")
        self.hidden, self.loops, self.width = hidden, loops, width
        features, inner = hidden + 1, width or 1
        self.w1 = nn.Parameter(torch.randn(loops - 1, features, inner) * features**-0.5)
        self.b1 = nn.Parameter(torch.zeros(loops - 1, inner))
        self.w2 = nn.Parameter(torch.randn(loops - 1, inner) * inner**-0.5 if width else torch.zeros(loops - 1, 0))
        self.b2 = nn.Parameter(torch.zeros(loops - 1))

    def logits_from_features(self, features: torch.Tensor, loop: int) -> torch.Tensor:
        """Exit logits of features [..., hidden + 1] at (0-based, non-final) ``loop`` -> [...]."""
        if not 0 <= loop < self.loops - 1:
            raise ConfigError(f"gates exist for loops 0..{self.loops - 2}, got loop {loop}")
        x = features @ self.w1[loop] + self.b1[loop]  # (..., width or 1)
        if not self.width:
            return x[..., 0]
        return nn.functional.gelu(x) @ self.w2[loop] + self.b2[loop]

    def forward(self, h: torch.Tensor, previous: torch.Tensor, loop: int) -> torch.Tensor:
        """P(exit token == final token) of loop-end states h [..., hidden] entering from ``previous`` -> [...]."""
        return torch.sigmoid(self.logits_from_features(gate_features(h, previous), loop))

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, loops={self.loops}, width={self.width}"


def save_exit_gates(gates: ExitGates, directory: str | os.PathLike[str], info: dict[str, object] | None = None) -> Path:
    """Write ``exit_gates.safetensors`` (weights + shape and training info as metadata) into ``directory`` atomically."""
    path = Path(directory) / GATES_FILE
    metadata = {"hidden": str(gates.hidden), "loops": str(gates.loops), "width": str(gates.width), "info": json.dumps(info or {})}
    tensors = {name: param.detach().cpu().contiguous() for name, param in gates.named_parameters()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata)
    return path


def read_exit_gates(directory: str | os.PathLike[str], hidden: int, loops: int) -> ExitGates | None:
    """The gates saved in a checkpoint directory (checked against the model's shape), or None when it has none."""
    path = Path(directory) / GATES_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - safe_open is not a dict
        width, saved = int(metadata["width"]), (int(metadata["hidden"]), int(metadata["loops"]))
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt ({err}); re-run 'recursify train-exits' or delete the file") from err
    if saved != (hidden, loops):
        raise CheckpointError(f"{path} was trained for hidden {saved[0]} and {saved[1]} loops, but the model has {hidden} and {loops}")
    gates = ExitGates(hidden, loops, width)
    try:
        gates.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{path} does not match its own metadata ({str(err).splitlines()[0]}); re-run 'recursify train-exits'"
        ) from err
    return gates.eval().requires_grad_(False)
