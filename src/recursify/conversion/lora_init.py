"""LoRA factors for one depth: truncated SVD of the residual to the shared weight (docs/method.md section 3).

At full rank ``B @ A`` reproduces the residual exactly, so the relaxed model equals the original.
"""

from __future__ import annotations

import torch

from recursify.errors import ConfigError


def svd_lora(residual: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, in], B [out, rank]) with B @ A the best rank-``rank`` approximation of residual [out, in].

    A = V_r^T (top right singular vectors) and B = R V_r = U_r S_r, as a truncated SVD gives them.
    A residual that is exactly zero (the depth the shared weight was copied from) has no
    singular directions; it gets the standard LoRA init instead, so training can still move it.
    """
    if not bool(residual.any()):
        return zero_lora(residual.shape[1], residual.shape[0], rank, generator)
    a, b = truncated_factors(residual.double(), rank)
    return a.float().contiguous(), b.float().contiguous()


def asvd_lora(
    residual: torch.Tensor, rank: int, whitening: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware factors: minimise ||(R - B A) X||_F for calibration inputs with C = X^T X / n = S S^T.

    ||(R - BA) X||^2 = n ||(R - BA) S||^2, so truncate R S and map A back through S^-1. With C = I
    this is plain SVD; at full rank it is exact like plain SVD.
    """
    if not bool(residual.any()):
        return zero_lora(residual.shape[1], residual.shape[0], rank, generator)
    sqrt_c, inv_sqrt_c = whitening
    a_white, b = truncated_factors(residual.double() @ sqrt_c, rank)
    return (a_white @ inv_sqrt_c).float().contiguous(), b.float().contiguous()


def truncated_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of a float64 matrix [out, in] as (V_r^T [rank, in], U_r S_r [out, rank]).

    Computed from the eigendecomposition of the smaller Gram matrix, several times faster than a
    full SVD; at full rank V_r V_r^T = I, so B A reproduces the matrix exactly.
    """
    if matrix.shape[0] >= matrix.shape[1]:
        _, right = torch.linalg.eigh(matrix.T @ matrix)
        a = right[:, -rank:].flip(-1).T  # (rank, in), largest singular value first
    else:
        _, left = torch.linalg.eigh(matrix @ matrix.T)
        scaled = left[:, -rank:].flip(-1).T @ matrix  # (rank, in): row i = s_i v_i^T
        a = scaled / scaled.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return a, matrix @ a.T


def squared_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Squared singular values of a float64 matrix, largest first (from the smaller Gram matrix)."""
    gram = matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)


def zero_lora(in_features: int, out_features: int, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard LoRA init: A ~ N(0, 1/in), B = 0, so the delta starts at zero but has a gradient."""
    a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    return a, torch.zeros(out_features, rank)


def resolve_ranks(rank: int | str, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Per-linear LoRA ranks from the user's ``rank``: an int for all linears, or "full".

    "full" gives each linear min(in, out), the rank at which it reproduces every depth exactly.
    An int above a linear's min(in, out) is capped there (that linear is then exact, e.g. the
    narrow k/v projections of GQA models); an int above every linear's min(in, out) is an error.
    """
    full = {name: min(fan_in, fan_out) for name, (fan_in, fan_out) in shapes.items()}
    if rank == "full":
        return full
    if isinstance(rank, str):
        if not rank.isdigit():
            raise ConfigError(f"rank must be a non-negative integer or 'full', got {rank!r}")
        rank = int(rank)
    if rank < 0:
        raise ConfigError(f"rank must be >= 0, got {rank}")
    if rank > max(full.values()):
        widest = max(full, key=lambda name: full[name])
        raise ConfigError(
            f"rank {rank} exceeds min(in, out) = {full[widest]} of every linear (largest: '{widest}'); "
            f"use a rank <= {full[widest]}, or 'full' for exact reproduction"
        )
    return {name: min(rank, cap) for name, cap in full.items()}
