"""Activation-weighted least-squares shared weights, alternated with activation-aware LoRA.

The calibration objective of one tied linear is sum_d tr(E_d C_d E_d^T) with
E_d = W_d - W' - B_d A_d. Given the LoRAs, the best shared weight has a closed form
W' = [sum_d (W_d - B_d A_d) C_d] [sum_d C_d]^-1; given W', asvd gives each depth's best LoRA.
Each half-step minimises the same objective over its own block, so rounds never increase it.
"""

from __future__ import annotations

import torch

from recursify.conversion.calibration import weighted_error


def lsq_shared(targets: list[torch.Tensor], grams: list[torch.Tensor]) -> torch.Tensor:
    """argmin_W' sum_d tr((T_d - W') C_d (T_d - W')^T) for targets T_d [out, in] and damped C_d [in, in]."""
    numerator = sum(t.double() @ c for t, c in zip(targets, grams, strict=True))
    denominator = sum(grams)
    assert isinstance(numerator, torch.Tensor) and isinstance(denominator, torch.Tensor)
    # W' D = N with D symmetric  <=>  D W'^T = N^T
    return torch.linalg.solve(denominator, numerator.T).T.float()


def objective(
    weights: list[torch.Tensor], shared: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]], grams: list[torch.Tensor]
) -> float:
    """sum_d tr(E_d C_d E_d^T) with E_d = W_d - W' - B_d A_d (LoRA terms omitted when factors is empty)."""
    total = 0.0
    for index, (weight, gram) in enumerate(zip(weights, grams, strict=True)):
        error = weight.double() - shared.double()
        if factors:
            a, b = factors[index]
            error = error - b.double() @ a.double()
        total += weighted_error(error, gram)
    return total
