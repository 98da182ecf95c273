"""Spend a LoRA parameter budget where it retains the most (whitened) spectral energy.

Each (shared layer, linear) pair gets one rank shared by the depths it serves (so its factors
stay stacked tensors). Its i-th rank unit costs visits * (in + out) parameters and retains the
sum over those depths of the i-th squared singular value of the (whitened) residual. Those gains
fall with i, so taking units greedily by gain per parameter gives each pair a prefix of ranks.
"""

from __future__ import annotations

import torch

from recursify.errors import ConfigError


def allocate_ranks(gains: dict[str, torch.Tensor], costs: dict[str, int], budget: int) -> dict[str, int]:
    """Ranks per key maximising retained energy with sum(rank * cost) <= budget.

    Args:
        gains: per key, the energy each further rank unit retains, non-increasing.
        costs: per key, parameters one rank unit costs.
        budget: parameter budget for all LoRA factors.
    """
    if budget < 0:
        raise ConfigError(f"the LoRA parameter budget must be >= 0, got {budget}")
    units = [(float(gain) / costs[key], key) for key, values in gains.items() for gain in values.tolist()]
    units.sort(key=lambda unit: unit[0], reverse=True)
    ranks = dict.fromkeys(gains, 0)
    blocked: set[str] = set()
    left = budget
    for _, key in units:
        if key in blocked:
            continue
        if costs[key] > left:
            blocked.add(key)  # later units of this key cost the same and cannot fit either
            continue
        ranks[key] += 1
        left -= costs[key]
    return ranks


def parse_budget(text: str | int, flag: str = "--lora-params") -> int:
    """'8M', '500k', '1.5M' or an int -> parameters; ``flag`` names the option in the error."""
    if isinstance(text, int):
        value: float = text
    else:
        scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1:].lower(), 1)
        number = text[:-1] if scale > 1 else text
        try:
            value = float(number) * scale
        except ValueError:
            value = float("nan")
    if not value >= 0:  # also refuses NaN
        raise ConfigError(f"cannot read {flag} {text!r}: give a parameter count, e.g. 8M, 500k or 2000000")
    return int(value)
