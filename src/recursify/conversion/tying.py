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


def init_sources(schedule: list[DepthSlot], init: str) -> list[list[int]]:
    """For each shared layer, the original depths whose tensors initialise it (empty for random).

    Prelude and coda layers are their own original layer whatever the rule (that is what keeping
    them unique means); the looped block's shared layers follow the rule over the looped depths.
    """
    unique = max(slot.layer for slot in schedule) + 1
    sources: list[list[int]] = [depths_of_layer(schedule, layer) for layer in range(unique)]  # average
    looped = sorted({slot.layer for slot in schedule if slot.part == "loop"})
    depths = [slot.depth for slot in schedule if slot.part == "loop"]
    if init == "random":
        picks: list[list[int]] = [[] for _ in looped]
    elif init == "lower":
        picks = [[depths[0] + j] for j in range(len(looped))]
    elif init == "stepwise":
        picks = [[d] for d in evenly_spread(depths[0], depths[-1], len(looped))]
    else:
        return sources
    for layer, pick in zip(looped, picks, strict=True):
        sources[layer] = pick
    return sources


def tie(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The shared value of tensors from several depths: their mean (the tensor itself for one depth)."""
    return torch.stack(tensors).mean(dim=0) if len(tensors) > 1 else tensors[0]
