"""Exit ensembles: identity at init, the geometric-ensemble formula, save / ``recursify.load`` round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recursify import load
from recursify.errors import CheckpointError
from recursify.training.exit_ensemble import (
    ExitEnsemble,
    ensemble_log_probs,
    exit_distribution,
    load_exit_ensemble,
    save_exit_ensemble,
)


def _exits(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 13, generator=generator) for _ in range(count)]


def test_identity_at_init_and_last_exit_untouched() -> None:
    exits = _exits(4)
    combined = ExitEnsemble(4)(exits)
    for b in range(3):
        torch.testing.assert_close(combined[b], F.log_softmax(exits[b], -1))
    assert combined[3] is exits[3]


def test_geometric_ensemble_formula() -> None:
    exits = _exits(3, seed=1)
    weights = torch.tensor([[0.7, 0.0], [0.4, 1.3]])
    logp = [F.log_softmax(z.double(), -1) for z in exits]
    expected = F.log_softmax(0.4 * logp[0] + 1.3 * logp[1], -1)
    torch.testing.assert_close(ensemble_log_probs(weights, exits, 2).double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ensemble_log_probs(weights, exits[:1], 1).double(), F.log_softmax(0.7 * logp[0], -1), rtol=1e-5, atol=1e-6)


def test_save_load_and_exit_distribution(tiny_run, tmp_path) -> None:
    tmp_path = tmp_path / "student"
    load(tiny_run["student"]).save_pretrained(tmp_path)  # loops=3
    model = load(tmp_path)
    exits = _exits(3, seed=2)
    assert model.addons.ensemble is None
    torch.testing.assert_close(exit_distribution(model, exits, 2), F.softmax(exits[1], -1))
    ensemble = ExitEnsemble(3)
    with torch.no_grad():
        ensemble.weights.copy_(torch.tensor([[0.5, 0.0], [0.25, 0.9]]))
    save_exit_ensemble(ensemble, tmp_path)
    model = load(tmp_path)  # recursify.load attaches the ensemble saved beside the weights
    assert model.addons.ensemble is not None
    torch.testing.assert_close(exit_distribution(model, exits, 2), ensemble_log_probs(ensemble.weights.detach(), exits, 2).exp())
    torch.testing.assert_close(exit_distribution(model, exits, 3), F.softmax(exits[2], -1))  # the last exit is never ensembled
    assert not any("ensemble" in name for name in model.state_dict())
    torch.testing.assert_close(load_exit_ensemble(tmp_path, 3).weights.detach(), ensemble.weights.detach())
    with pytest.raises(CheckpointError, match="exits"):
        load_exit_ensemble(tmp_path, 4)
