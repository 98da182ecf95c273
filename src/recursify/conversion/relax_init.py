"""Initial values of the cheaper relaxations (``--relax lora-xs`` and ``--relax bias``), and their option rules.

LoRA-XS design. LoRA-XS (Balazy et al., 2024) freezes A and B from an SVD of a weight matrix and
trains only an r x r matrix R between them. Here every visit (depth) of a shared layer has its own
residual W_d - W', so there are two ways to place the frozen factors:

- per visit (chosen): each depth keeps its own (a)svd factors, frozen; R_v is that depth's core.
  With A_v = V_r^T (asvd: the whitened right singular vectors mapped back), B_v = U_r and
  R_v = diag(S_r), B_v R_v A_v is exactly the rank-r (a)svd LoRA, so the converted model equals
  the plain LoRA model at init: no quality is given up at conversion, and on a CPU the init
  decides most of the outcome (README.md "Results": after the same KD the asvd conversion keeps
  its lead over plain SVD). The frozen factors cost storage like LoRA, but no
  gradients or optimizer state; trainable parameters are r^2 per linear per depth, independent
  of width.
- shared across visits (one SVD of the stacked residuals, R_v fitted by least squares): stores
  the factors once per linear, but R_v can then only reproduce the part of each depth's residual
  inside a common subspace, so the model at init is worse than the LoRA model of the same rank.

B is stored with orthonormal columns and the scale lives in R, so a step on R moves the weight
by a step of the same size (||B dR A|| = ||dR|| for plain svd): the core is as well conditioned
as a full weight. A residual with no singular directions (a depth the shared weight was copied
from, or ``--lora-init zero``) gets random unit directions and R = 0: the delta is zero at init
but R still has a gradient.

Bias design. ``--relax bias`` keeps only a bias vector per depth on every linear (plus the
per-depth norm gains of ``--norms per-depth``). The bias that best absorbs a depth's residual in
least squares, min_b E||(W_d - W') x - b||^2, is b = (W_d - W') E[x]: with ``--calib`` that mean
is taken over the calibration inputs of that depth; without calibration data E[x] is unknown and
the bias starts at zero (the tied model). Families with their own biases add b_d - b'.
"""

from __future__ import annotations

import torch

from recursify.errors import ConfigError


def check_relax_options(kind: str, rank: int | str, lora_params: int | str | None) -> None:
    """Reject option combinations a relaxation cannot use, before any weights are loaded."""
    if kind == "lora-xs" and (rank == 0 or lora_params is not None):
        raise ConfigError("--relax lora-xs needs a positive --rank (its r x r cores are sized by it; --lora-params is not supported)")
    if kind in ("prefix", "bias") and (rank != 0 or lora_params is not None):
        raise ConfigError(f"--relax {kind} has no LoRA: drop --rank / --lora-params (or use --relax lora)")


def xs_factors(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r] with unit columns, R [r, r] diagonal) such that B R A == b a.

    ``a``, ``b`` are one visit's (a)svd LoRA factors, whose columns of ``b`` are U_r S_r.
    """
    scale = b.norm(dim=0)  # (r,)
    empty = scale == 0
    fixed_b = b / scale.clamp_min(torch.finfo(b.dtype).tiny)
    if bool(empty.any()):
        random = torch.randn(b.shape[0], int(empty.sum()), generator=generator)
        fixed_b[:, empty] = random / random.norm(dim=0)
    return a, fixed_b.contiguous(), torch.diag(scale)


def bias_init(weight: torch.Tensor, shared: torch.Tensor, mean_input: torch.Tensor | None) -> torch.Tensor:
    """The least-squares per-depth bias (W_d - W') E[x] [out]; zero without calibration means."""
    if mean_input is None:
        return torch.zeros(weight.shape[0])
    return ((weight.double() - shared.double()) @ mean_input.double()).float()
