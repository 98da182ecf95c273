"""Low-rank embedding and head factors: the weighted closed form against independent references, calibration counts, budgets."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from recursify import convert
from recursify.conversion.calibration import Calibration, calibrate, damped
from recursify.conversion.embedding_init import (
    SMOOTHING,
    LowRankFit,
    budget_candidates,
    head_fit,
    input_fit,
    tied_fit,
    weighted_low_rank,
)
from recursify.errors import ConfigError
from tiny import tiny_model


def weighted_error(matrix: torch.Tensor, approx: torch.Tensor, rows: torch.Tensor, gram: torch.Tensor) -> float:
    """||D (W - X) M||_F^2 = tr(D E C E^T D) with C = M M^T, computed without any square root of C."""
    error = rows[:, None] * (matrix - approx)
    return float(((error @ gram) * error).sum())


def alternating_least_squares(matrix: torch.Tensor, rows: torch.Tensor, gram: torch.Tensor, rank: int, seed: int) -> float:
    """A naive reference: alternate exact least-squares updates of X = U V (each one convex), from a random start."""
    g = torch.Generator().manual_seed(seed)
    d = torch.diag(rows)
    v = torch.randn(rank, matrix.shape[1], generator=g, dtype=torch.float64)
    for _ in range(150):
        # fix V: min_U ||D (W - U V) M||^2 -> U = W C V^T (V C V^T)^-1 (rows decouple; D cancels)
        u = matrix @ gram @ v.T @ torch.linalg.inv(v @ gram @ v.T)
        # fix U: min_V -> V = (U^T D^2 U)^-1 U^T D^2 W (C cancels)
        v = torch.linalg.solve(u.T @ d @ d @ u, u.T @ d @ d @ matrix)
    return weighted_error(matrix, u @ v, rows, gram)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_weighted_fit_is_the_optimum_a_naive_search_finds(rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    matrix = torch.randn(30, 6, generator=g, dtype=torch.float64)
    rows = torch.rand(30, generator=g, dtype=torch.float64) * 10 + 0.1  # very uneven token weights
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 6, dtype=torch.float64)
    gram = x.T @ x / 200
    fit = weighted_low_rank(matrix, rows, gram)
    table, basis = fit.factors(rank)
    assert table.shape == (30, rank) and basis.shape == (rank, 6)
    objective = damped(gram)  # the fit whitens with the damped second moment, like asvd
    closed = weighted_error(matrix, table.double() @ basis.double(), rows, objective)
    naive = min(alternating_least_squares(matrix, rows, objective, rank, seed) for seed in range(2))
    assert closed == pytest.approx(naive, rel=1e-4)
    assert closed <= naive * (1 + 1e-6)
    total = weighted_error(matrix, torch.zeros_like(matrix), rows, objective)
    assert fit.relative_error(rank) == pytest.approx(closed / total, rel=1e-4)
    plain_table, plain_basis = weighted_low_rank(matrix).factors(rank)
    assert weighted_error(matrix, plain_table.double() @ plain_basis.double(), rows, objective) > closed


def test_unweighted_fit_is_truncated_svd_and_full_rank_is_exact() -> None:
    matrix = torch.randn(40, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    table, basis = weighted_low_rank(matrix).factors(3)
    torch.testing.assert_close(table.double() @ basis.double(), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5, rtol=1e-5)
    table, basis = weighted_low_rank(matrix, torch.rand(40, dtype=torch.float64) + 0.5, matrix.T @ matrix).factors(8)
    torch.testing.assert_close(table.double() @ basis.double(), matrix, atol=1e-5, rtol=1e-5)


def test_row_weights_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="positive"):
        weighted_low_rank(torch.randn(5, 3), torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0]))


def test_calibration_counts_tokens_and_collects_the_heads_statistics() -> None:
    model = convert(tiny_model("gemma2"), loops=1, progress=False)  # embedding scale and final soft-cap
    sequences = torch.randint(3, 97, (3, 7), generator=torch.Generator().manual_seed(0))
    calibration = calibrate(model, sequences, batch_size=2, progress=False)
    assert calibration.token_counts is not None and calibration.head_gram is not None and calibration.head_probs is not None
    assert torch.equal(calibration.token_counts, torch.bincount(sequences.flatten(), minlength=97).double())
    with torch.no_grad():
        out = model(sequences, output_hidden_states=True)
        assert out.hidden_states is not None
        normed = model.final_norm(out.hidden_states[-1]).reshape(-1, 48).double()
        probs = torch.softmax(out.logits.double(), dim=-1).reshape(-1, 97).mean(0)
    torch.testing.assert_close(calibration.head_gram, normed.T @ normed / 21, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(calibration.head_probs, probs, atol=1e-6, rtol=1e-5)
    assert torch.equal(calibration.rows, sequences)


def _statistics(vocab: int = 50, hidden: int = 8, seed: int = 0) -> tuple[torch.Tensor, Calibration]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
    counts = torch.poisson(torch.logspace(3, -1, vocab, dtype=torch.float64), generator=g)  # Zipf-like usage
    x = torch.randn(500, hidden, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, hidden, dtype=torch.float64)
    probs = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 3, 0)
    return weight, Calibration(grams={}, tokens=1000, token_counts=counts, head_gram=x.T @ x / 500, head_probs=probs)


def test_each_side_wins_on_its_own_criterion_and_the_tied_fit_balances_them() -> None:
    weight, calibration = _statistics()
    assert calibration.token_counts is not None and calibration.head_gram is not None and calibration.head_probs is not None
    norms = weight.norm(dim=1)
    input_rows = (calibration.token_counts + SMOOTHING).sqrt() * norms.square().mean().sqrt() / norms  # errors relative to each row
    head_rows = (calibration.head_probs * calibration.tokens + SMOOTHING).sqrt()
    gram = damped(calibration.head_gram)
    identity = torch.eye(8, dtype=torch.float64)
    rank = 3
    fits = {name: fit(weight, calibration).factors(rank) for name, fit in (("input", input_fit), ("head", head_fit), ("tied", tied_fit))}
    approx = {name: t.double() @ b.double() for name, (t, b) in fits.items()}

    def input_error(x: torch.Tensor) -> float:
        return weighted_error(weight, x, input_rows, identity) / weighted_error(weight, 0 * weight, input_rows, identity)

    def head_error(x: torch.Tensor) -> float:
        return weighted_error(weight, x, head_rows, gram) / weighted_error(weight, 0 * weight, head_rows, gram)

    assert input_error(approx["input"]) < input_error(approx["head"])
    assert head_error(approx["head"]) < head_error(approx["input"])
    assert input_error(approx["input"]) <= input_error(approx["tied"]) and head_error(approx["head"]) <= head_error(approx["tied"])
    # one pair of factors cannot be best for both, but it must not be worse on the sum than either side's own fit
    joint = {name: input_error(x) + head_error(x) for name, x in approx.items()}
    assert joint["tied"] <= min(joint["input"], joint["head"]) * 1.02


def test_budget_candidates_spend_at_most_the_budget() -> None:
    from recursify.conversion.weight_map import arch_from_hf
    from tiny import tiny_config

    tied = arch_from_hf(tiny_config("qwen2"))  # vocab 97, hidden 48: a rank costs 145
    untied = arch_from_hf(tiny_config("llama"))
    candidates = budget_candidates(tied, 145 * 20)
    assert candidates[0] == (20, None)  # one tied pair of factors at the whole rank
    assert all(isinstance(e, int) and isinstance(h, int) and e + h <= 20 for e, h in candidates[1:])
    assert all(h is not None for _, h in budget_candidates(untied, 145 * 20))  # an untied source has its own head
    with pytest.raises(ConfigError, match="below the smallest"):
        budget_candidates(untied, 200)
    # exact rows come out of the budget first: once for a tied pair, once per factorised side otherwise
    for arch in (tied, untied):
        for embed_rank, head_rank in budget_candidates(arch, 145 * 20, exact_rows=10):
            sides = [embed_rank] if head_rank is None else [embed_rank, head_rank]
            assert sum(int(rank) * 145 + 10 * 48 for rank in sides) <= 145 * 20
    assert budget_candidates(tied, 145 * 20, exact_rows=10)[0] == ((145 * 20 - 480) // 145, None)
    with pytest.raises(ConfigError, match="plus the exact rows"):
        budget_candidates(untied, 145 * 2, exact_rows=10)


def _solution_split(fit: LowRankFit, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed form's own split, table = D W M V_r / D and basis = V_r^T M^-1 (float64): the reference product."""
    right = fit.vectors[:, :rank].T
    return (fit.scaled @ right.T) / fit.row_weights[:, None], right @ fit.inverse_columns


@pytest.mark.parametrize("fitter", [input_fit, head_fit, tied_fit])
def test_factors_keep_the_product_with_an_orthonormal_basis(fitter: Any) -> None:
    weight, calibration = _statistics(vocab=60, hidden=10, seed=1)
    fit = fitter(weight, calibration)
    for rank in (1, 4, 10):
        table, basis = fit.factors(rank)
        assert table.dtype == basis.dtype == torch.float32 and table.shape == (60, rank) and basis.shape == (rank, 10)
        reference_table, reference_basis = _solution_split(fit, rank)
        product = reference_table @ reference_basis
        torch.testing.assert_close(table.double() @ basis.double(), product, atol=1e-5 * float(product.abs().max()), rtol=1e-5)
        torch.testing.assert_close(basis.double() @ basis.double().T, torch.eye(rank, dtype=torch.float64), atol=1e-6, rtol=0)
        # an orthonormal frame: each table row has the norm of the product's row, whatever D and M were
        torch.testing.assert_close(table.double().norm(dim=1), product.norm(dim=1), atol=1e-5, rtol=1e-5)


def _tied_model(**options: Any) -> Any:
    """The tiny tied qwen2 converted with factors fitted on 256 calibration tokens (random ids)."""
    source = tiny_model("qwen2")
    rows = torch.randint(3, 97, (16, 16), generator=torch.Generator().manual_seed(0))
    calibration = calibrate(convert(source, loops=1, progress=False), rows, progress=False)
    return convert(source, calib=calibration, progress=False, **options)


def test_fitted_table_has_the_scale_of_the_original_rows() -> None:
    """The tied fit's whitening M ~ 1 / ||D W|| shrinks with the calibration tokens; the table must not (AdamW steps
    every entry by ~lr, so a table at RMS ~ lr is rewritten by one step: SmolLM2's came out at 5e-4 before)."""
    rank = 8
    model = _tied_model(embed_rank=rank)
    source = tiny_model("qwen2")
    original_rms = float(source.get_input_embeddings().weight.detach().pow(2).mean().sqrt())
    table_rms = float(model.embed.table.detach().pow(2).mean().sqrt())
    # a row of norm ||E_v|| spread over rank coordinates instead of hidden: RMS up to sqrt(hidden / rank) larger
    assert 0.5 * original_rms < table_rms < (48 / rank) ** 0.5 * original_rms, (table_rms, original_rms)
