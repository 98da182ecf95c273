"""LoRA factors for one depth: truncated SVD of the residual to the shared weight (METHOD.md section 3).

At full rank ``B @ A`` reproduces the residual exactly, so the relaxed model equals the original.
"""

from __future__ import annotations

import torch

from recursify.errors import ConfigError


def svd_lora(residual: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, in], B [out, rank]) with B @ A the best rank-``rank`` approximation of residual [out, in].

    A residual that is exactly zero (the depth the shared weight was copied from) has no
    singular directions; it gets the standard LoRA init instead, so training can still move it.
    The SVD runs in float64: at full rank the reconstruction error stays ~1e-12, not ~1e-6.
    """
    if not bool(residual.any()):
        return zero_lora(residual.shape[1], residual.shape[0], rank, generator)
    u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
    return vh[:rank].float().contiguous(), (u[:, :rank] * s[:rank]).float().contiguous()


def zero_lora(in_features: int, out_features: int, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard LoRA init: A ~ N(0, 1/in), B = 0, so the delta starts at zero but has a gradient."""
    a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    return a, torch.zeros(out_features, rank)


def resolve_ranks(rank: int | str, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Per-linear LoRA ranks from the user's ``rank``: an int for all linears, or "full".

    "full" gives each linear min(in, out), the rank at which it reproduces every depth exactly.
    """
    if rank == "full":
        return {name: min(fan_in, fan_out) for name, (fan_in, fan_out) in shapes.items()}
    if isinstance(rank, str):
        if not rank.isdigit():
            raise ConfigError(f"rank must be a non-negative integer or 'full', got {rank!r}")
        rank = int(rank)
    if rank < 0:
        raise ConfigError(f"rank must be >= 0, got {rank}")
    for name, (fan_in, fan_out) in shapes.items():
        if rank > min(fan_in, fan_out):
            raise ConfigError(
                f"rank {rank} exceeds min(in, out) = {min(fan_in, fan_out)} of linear '{name}' ({fan_out}x{fan_in}); "
                f"use a rank <= {min(min(s) for s in shapes.values())} or 'full'"
            )
    return {name: rank for name in shapes}
