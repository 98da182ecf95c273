"""Data-aware conversion: calibration statistics, activation-aware SVD, lsq shared weights, rank budgets."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch

from recursify import convert, load
from recursify.conversion.calibration import calibrate, damped, weighted_error, whitening
from recursify.conversion.lora_init import asvd_lora, svd_lora
from recursify.conversion.rank_budget import allocate_ranks, parse_budget
from recursify.conversion.shared_fit import lsq_shared, objective
from recursify.errors import ConfigError
from tiny import save_tiny_checkpoint, tiny_model

GEN = torch.Generator().manual_seed(0)


def anisotropic_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    """Inputs whose scale differs by orders of magnitude across directions, like real activations."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -3, dim, dtype=torch.float64)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) * scales @ basis.T


def gram_of(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def test_asvd_is_plain_svd_when_inputs_are_white() -> None:
    residual = torch.randn(12, 9, dtype=torch.float64).float()
    for rank in (1, 4, 9):
        a, b = asvd_lora(residual, rank, whitening(torch.eye(9, dtype=torch.float64), damping=0.0), GEN)
        a_ref, b_ref = svd_lora(residual, rank, GEN)
        torch.testing.assert_close(b @ a, b_ref @ a_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(16, 10), (10, 16)])
def test_asvd_reaches_the_weighted_optimum_and_beats_svd(shape: tuple[int, int]) -> None:
    residual = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    gram = damped(gram_of(anisotropic_inputs(400, shape[1], seed=2)))
    sqrt_c, _ = whitening(gram, damping=0.0)
    optimum_tail = torch.linalg.svdvals(residual.double() @ sqrt_c) ** 2
    for rank in (1, 3, 6):
        a, b = asvd_lora(residual, rank, whitening(gram, damping=0.0), GEN)
        error = weighted_error(residual - b @ a, gram)
        assert error == pytest.approx(float(optimum_tail[rank:].sum()), rel=1e-4)
        a_svd, b_svd = svd_lora(residual, rank, GEN)
        assert error <= weighted_error(residual - b_svd @ a_svd, gram) * (1 + 1e-6)
    full = min(shape)
    a, b = asvd_lora(residual, full, whitening(gram), GEN)
    torch.testing.assert_close(b @ a, residual, atol=1e-4, rtol=1e-4)


def test_lsq_without_lora_is_the_weighted_centroid() -> None:
    weights = [torch.randn(5, 4) for _ in range(3)]
    same = damped(gram_of(anisotropic_inputs(200, 4, seed=3)))
    torch.testing.assert_close(lsq_shared(weights, [same] * 3), torch.stack(weights).mean(0), atol=1e-5, rtol=1e-5)
    grams = [damped(gram_of(anisotropic_inputs(200, 4, seed=s))) for s in (4, 5, 6)]
    shared = lsq_shared(weights, grams)
    for _ in range(5):  # no perturbation improves the objective
        probe = shared + 1e-2 * torch.randn(5, 4)
        assert objective(weights, shared, [], grams) <= objective(weights, probe, [], grams)


def test_lsq_asvd_rounds_never_increase_the_objective() -> None:
    weights = [torch.randn(8, 6) for _ in range(3)]
    grams = [damped(gram_of(anisotropic_inputs(300, 6, seed=s))) for s in range(3)]
    shared = torch.stack(weights).mean(0)
    whites = [whitening(g, damping=0.0) for g in grams]
    values = []
    for _ in range(4):
        factors = [asvd_lora(w - shared, 2, white, GEN) for w, white in zip(weights, whites, strict=True)]
        values.append(objective(weights, shared, factors, grams))
        shared = lsq_shared([w - b @ a for w, (a, b) in zip(weights, factors, strict=True)], grams)
        values.append(objective(weights, shared, factors, grams))
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in itertools.pairwise(values))
    assert values[-1] < values[0]


def test_rank_allocation_is_optimal_on_a_toy_problem() -> None:
    gains = {"a": torch.tensor([9.0, 4.0, 1.0]), "b": torch.tensor([6.0, 5.0, 0.5])}
    costs = {"a": 3, "b": 2}
    for budget in range(0, 16):
        ranks = allocate_ranks(gains, costs, budget)
        assert sum(ranks[k] * costs[k] for k in ranks) <= budget
        best = max(float(gains["a"][:ra].sum() + gains["b"][:rb].sum()) for ra in range(4) for rb in range(4) if ra * 3 + rb * 2 <= budget)
        retained = float(gains["a"][: ranks["a"]].sum() + gains["b"][: ranks["b"]].sum())
        assert retained + 9.0 >= best  # greedy knapsack bound: within the largest single unit of the optimum
    assert allocate_ranks(gains, costs, 100) == {"a": 3, "b": 3}
    equal_costs = {"a": 2, "b": 2}
    for budget in range(0, 13):  # with equal unit costs, greedy by gain is exactly optimal
        ranks = allocate_ranks(gains, equal_costs, budget)
        best = max(float(gains["a"][:ra].sum() + gains["b"][:rb].sum()) for ra in range(4) for rb in range(4) if (ra + rb) * 2 <= budget)
        assert float(gains["a"][: ranks["a"]].sum() + gains["b"][: ranks["b"]].sum()) == pytest.approx(best)


def test_parse_budget() -> None:
    assert parse_budget("8M") == 8_000_000 and parse_budget("500k") == 500_000 and parse_budget("1.5M") == 1_500_000
    for bad in ("lots", "-5M", "nan", "0.5x"):
        with pytest.raises(ConfigError, match=f"cannot read --embed-params '{bad}': give a parameter count"):
            parse_budget(bad, "--embed-params")
    with pytest.raises(ConfigError, match="cannot read --lora-params"):
        parse_budget("lots")


def test_calibration_grams_equal_a_hand_computation() -> None:
    model = convert(tiny_model("llama"), loops=1, progress=False)
    sequences = torch.randint(3, 97, (3, 7))
    calibration = calibrate(model, sequences, batch_size=2, progress=False)
    assert calibration.tokens == 21
    with torch.no_grad():
        hidden = model(sequences, output_hidden_states=True).hidden_states
        assert hidden is not None
        depth = 2
        x = model.shared_layer(depth).norm("attn_norm")(hidden[depth], 0).reshape(-1, 48).double()
        after_attn = hidden[depth] + 0  # the MLP input is the norm of the residual after attention
        layer = model.shared_layer(depth)
        expected_attn = x.T @ x / 21
    torch.testing.assert_close(calibration.gram(depth, "q"), expected_attn, atol=1e-5, rtol=1e-5)
    assert calibration.gram(depth, "k") is calibration.gram(depth, "q")
    assert calibration.gram(depth, "down").shape == (80, 80) and calibration.gram(depth, "o").shape == (64, 64)
    assert layer is not None and after_attn is not None


def test_calibration_needs_the_original_model() -> None:
    with pytest.raises(ConfigError, match="loops=1"):
        calibrate(convert(tiny_model("llama"), loops=2, progress=False), torch.randint(3, 97, (2, 5)), progress=False)


@pytest.fixture(scope="module")
def source_with_text(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("src")
    save_tiny_checkpoint(directory, "llama")
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "from", "home"]
    paragraphs = [" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(40)]
    text = directory / "calib.txt"
    text.write_text("\n\n".join(paragraphs))
    return directory, text


def test_asvd_conversion_beats_svd_on_calibration_inputs(source_with_text: tuple[Path, Path], tmp_path: Path) -> None:
    source, text = source_with_text
    common = dict(loops=3, init="average", rank=4, calib=str(text), calib_tokens=2000, progress=False)
    plain = convert(source, lora_init="svd", **common)
    aware = convert(source, lora_init="asvd", **common)
    lsq = convert(source, lora_init="asvd", shared_init="lsq", **common)
    for name in ("q", "gate", "down"):
        svd_err = sum(plain.report["relative_error"][name])
        asvd_err = sum(aware.report["relative_error"][name])
        assert asvd_err < svd_err
        assert sum(lsq.report["relative_error"][name]) <= asvd_err * 1.05
    assert aware.recursion.calib_tokens > 0
    aware.save_pretrained(tmp_path / "rrt")
    assert load(tmp_path / "rrt").report == aware.report


def test_asvd_at_full_rank_is_exact(source_with_text: tuple[Path, Path]) -> None:
    source, text = source_with_text
    original = convert(source, loops=1, progress=False)
    relaxed = convert(
        source,
        loops=2,
        init="average",
        rank="full",
        lora_init="asvd",
        shared_init="lsq",
        calib=str(text),
        calib_tokens=2000,
        progress=False,
    )
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        assert (relaxed(ids).logits - original(ids).logits).abs().max() < 1e-3


def test_lora_budget_is_respected_and_recorded(source_with_text: tuple[Path, Path]) -> None:
    source, text = source_with_text
    model = convert(source, loops=3, init="average", lora_params="3k", calib=str(text), calib_tokens=2000, progress=False)
    assert 0 < model.param_counts()["lora"] <= 3000
    assert model.recursion.lora_params == 3000 and model.recursion.layer_ranks
    uneven = set(model.recursion.layer_ranks.values())
    assert len(uneven) > 1  # the budget goes where the energy is, not evenly
    everything = convert(source, loops=3, init="average", lora_params="10M", progress=False)
    ids = torch.randint(3, 97, (1, 8))
    with torch.no_grad():
        reference = convert(source, loops=1, progress=False)(ids).logits
        assert (everything(ids).logits - reference).abs().max() < 1e-3  # a budget covering full rank is exact


def test_data_aware_options_need_calibration(source_with_text: tuple[Path, Path]) -> None:
    source, _ = source_with_text
    with pytest.raises(ConfigError, match="--calib"):
        convert(source, loops=2, rank=2, lora_init="asvd", progress=False)
    with pytest.raises(ConfigError, match="--calib"):
        convert(source, loops=2, shared_init="lsq", progress=False)
