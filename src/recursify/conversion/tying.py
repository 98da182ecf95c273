"""Initialising shared layers from the original ones: Stepwise, Average, Lower, Random (docs/method.md section 2).

``init_sources`` says which original depths feed each shared layer; ``tie`` combines their tensors.
"""

from __future__ import annotations

import math

import torch

from recursify.modeling.schedule import DepthSlot, depths_of_layer


def evenly_spread(low: int, high: int, count: int) -> list[int]:
    """``count`` indices from low..high inclusive, first and last kept, halves rounded down.

    Rounding halves down reproduces the paper's pick for L=6, K=3: layers 0, 2, 5.
    """
    if count == 1:
        return [low]
    return [low + math.ceil(j * (high - low) / (count - 1) - 0.5) for j in range(count)]


def init_sources(schedule: list[DepthSlot], init: str, strategy: str) -> list[list[int]]:
    """For each shared layer, the original depths whose tensors initialise it (empty for random)."""
    num_layers = len(schedule)
    unique = max(slot.layer for slot in schedule) + 1
    if init == "average":
        return [depths_of_layer(schedule, layer) for layer in range(unique)]
    if init == "random":
        return [[] for _ in range(unique)]
    if strategy != "middle-cycle":
        picks = list(range(unique)) if init == "lower" else evenly_spread(0, num_layers - 1, unique)
        return [[d] for d in picks]
    # middle-cycle: the first and last layers stay themselves; the middle ones follow the rule
    middle = list(range(1, unique - 1)) if init == "lower" else evenly_spread(1, num_layers - 2, unique - 2)
    return [[0]] + [[d] for d in middle] + [[num_layers - 1]]


def tie(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The shared value of tensors from several depths: their mean (the tensor itself for one depth)."""
    return torch.stack(tensors).mean(dim=0) if len(tensors) > 1 else tensors[0]
