"""``--plan auto``: the plan of lowest calibration KL under the budget, checked by brute force on a tiny model."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from recursify import convert, load
from recursify.cli import main
from recursify.conversion.plan_search import PlanSpace, base_params, format_plan_search, search_plan
from recursify.data import load_tokens, pack
from recursify.errors import ConfigError
from tiny import save_tiny_checkpoint, tiny_tokenizer

SPACE = PlanSpace(loops=(2, 3), preludes=(0, 1, 2, 3), codas=(0, 1))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("plan")
    save_tiny_checkpoint(directory, "llama", seed=8)
    rng = random.Random(1)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "from", "home"]
    text = directory / "calib.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(40)))
    return directory, text


def _kl(model: torch.nn.Module, reference: torch.nn.Module, rows: torch.Tensor) -> float:
    with torch.no_grad():
        teacher = torch.log_softmax(reference(rows).logits.double(), -1)
        student = torch.log_softmax(model(rows).logits.double(), -1)
    return float((teacher.exp() * (teacher - student)).sum(-1).mean())


def test_plans_of_the_space_tie_the_layers_evenly() -> None:
    assert SPACE.plans(6) == [(2, 0, 0), (2, 1, 1), (2, 2, 0), (2, 3, 1), (3, 0, 0), (3, 2, 1), (3, 3, 0)]


def test_base_params_equal_a_real_conversion(source: tuple[Path, Path]) -> None:
    directory, _ = source
    arch = load(str(directory)).arch
    for loops, prelude, coda in SPACE.plans(6):
        counts = convert(directory, loops=loops, prelude=prelude, coda=coda, rank=0, progress=False).param_counts()
        assert base_params(arch, loops, prelude, coda, "per-depth") == (counts["non_embedding"], 0)  # llama: no q/k/v biases


def test_auto_plan_is_the_lowest_kl_plan_under_the_budget_by_brute_force(source: tuple[Path, Path]) -> None:
    directory, text = source
    budget = (
        85_000  # 4 unique layers (83.6k) leave a little LoRA, 3 (62.8k) more, 2 (42.1k) most; 6 (loops 2, prelude 3, coda 1) do not fit
    )
    choice = search_plan(directory, budget, str(text), calib_tokens=2000, space=SPACE, eval_tokens=512, progress=False)
    reference = convert(directory, loops=1, progress=False)
    rows = pack(load_tokens(str(text), tiny_tokenizer(), "train", 512), 256)
    brute: dict[tuple[int, int, int], float] = {}
    for loops, prelude, coda in SPACE.plans(6):
        base = convert(directory, loops=loops, prelude=prelude, coda=coda, rank=0, progress=False).param_counts()["non_embedding"]
        if base > budget:
            continue
        common = dict(init="average", lora_init="asvd", calib=str(text), calib_tokens=2000, progress=False)
        model = convert(directory, loops=loops, prelude=prelude, coda=coda, lora_params=budget - base, **common)  # type: ignore[arg-type]
        assert model.param_counts()["non_embedding"] + model.param_counts()["lora"] <= budget
        brute[(loops, prelude, coda)] = _kl(model, reference, rows)
    measured = {(c.loops, c.prelude, c.coda): c.kl for c in choice.candidates if c.kl is not None}
    assert set(measured) == set(brute) and len(brute) == 6 and (2, 3, 1) not in brute
    for plan, kl in brute.items():
        assert measured[plan] == pytest.approx(kl, rel=2e-3, abs=2e-3)
    chosen = choice.model.recursion
    assert (chosen.loops, chosen.prelude, chosen.coda) == min(brute, key=lambda plan: brute[plan])
    assert choice.model.report["plan"]["chosen"] == {"loops": chosen.loops, "prelude": chosen.prelude, "coda": chosen.coda}
    assert len(choice.model.report["plan"]["candidates"]) == len(SPACE.plans(6))
    table = format_plan_search(choice)
    assert "<- chosen" in table and "over" in table and "lowest calibration KL" in table


def test_no_plan_fits_a_tiny_budget(source: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match="no plan fits"):
        search_plan(source[0], 1000, str(source[1]), space=SPACE, progress=False)


def test_cli_plan_auto_records_the_plan(source: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory, text = source
    args = ["convert", "--model", str(directory), "--plan", "auto", "--target-params", "85k", "--calib", str(text)]
    assert main([*args, "--calib-tokens", "2000", "--out", str(tmp_path / "auto")]) == 0
    assert "<- chosen" in capsys.readouterr().out
    assert load(tmp_path / "auto").report["plan"]["target_params"] == 85_000
    assert main(["convert", "--model", str(directory), "--plan", "auto", "--out", str(tmp_path / "x")]) == 2
    assert "--target-params" in capsys.readouterr().err


def test_a_total_budget_trades_the_vocabulary_against_the_blocks(source: tuple[Path, Path]) -> None:
    directory, text = source
    reference = convert(directory, loops=1, progress=False)
    vocab = int(reference.param_counts()["embedding"])
    budget = 85_000 + vocab // 2  # the dense vocabulary leaves too little for 4 unique layers; half of it leaves room
    choice = search_plan(
        directory, budget, str(text), calib_tokens=2000, space=SPACE, eval_tokens=512, progress=False, vocab_shares=(1.0, 0.5)
    )
    converted = [c for c in choice.candidates if c.kl is not None]
    assert {c.vocab_share for c in converted} == {1.0, 0.5}
    assert all(c.vocab == (vocab if c.vocab_share == 1 else vocab // 2) for c in choice.candidates)
    assert all(c.params <= budget for c in converted)
    # more plans fit with the smaller vocabulary, and each gets more LoRA
    dense = {(c.loops, c.prelude, c.coda): c for c in converted if c.vocab_share == 1}
    half = {(c.loops, c.prelude, c.coda): c for c in converted if c.vocab_share == 0.5}
    assert set(dense) < set(half)
    assert all(half[plan].lora_budget > dense[plan].lora_budget for plan in dense)
    assert choice.chosen is min(converted, key=lambda c: (c.kl, c.params))
    counts = choice.model.param_counts()
    assert counts["total"] == choice.chosen.params <= budget
    report = choice.model.report["plan"]
    assert report["counts_vocabulary"] and len(report["candidates"]) == 2 * len(SPACE.plans(6))
    # the factor shapes chosen once per share reproduce a direct --embed-params conversion of any plan
    last = [c for c in converted if c.vocab_share == 0.5][-1]
    common = dict(init="average", lora_init="asvd", calib=str(text), calib_tokens=2000, progress=False)
    direct = convert(
        directory, loops=last.loops, prelude=last.prelude, coda=last.coda, lora_params=last.lora_budget, embed_params=last.vocab, **common
    )  # type: ignore[arg-type]
    rows = pack(load_tokens(str(text), tiny_tokenizer(), "train", 512), 256)
    assert last.kl == pytest.approx(_kl(direct, reference, rows), rel=2e-3, abs=2e-3)
    assert direct.param_counts()["total"] == last.params
    assert ", vocabulary 0.5" in format_plan_search(choice) and "vocab (M)" in format_plan_search(choice)


def test_cli_plan_auto_with_a_total_budget(source: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory, text = source
    vocab = int(convert(directory, loops=1, progress=False).param_counts()["embedding"])
    args = ["convert", "--model", str(directory), "--plan", "auto", "--calib", str(text), "--calib-tokens", "2000"]
    total = str(85_000 + vocab // 2)
    assert main([*args, "--target-total", total, "--vocab-shares", "1", "0.5", "--out", str(tmp_path / "auto")]) == 0
    assert "<- chosen" in capsys.readouterr().out
    model = load(tmp_path / "auto")
    assert model.param_counts()["total"] <= int(total) and model.report["plan"]["counts_vocabulary"]
    exact = ["--target-total", total, "--vocab-shares", "0.5", "--embed-exact-rows", "8", "--quiet", "--out", str(tmp_path / "exact")]
    assert main([*args, *exact]) == 0
    model = load(tmp_path / "exact")  # every candidate factorised, each with 8 exact rows inside the same total
    assert model.recursion.embed_exact_rows == 8 and model.embed.exact_rows.shape[0] == 8
    assert model.param_counts()["total"] <= int(total) and model.report["plan"]["chosen"]["embed_exact_rows"] == 8
    refusals = {
        ("--target-total", total, "--target-params", "85k"): "one budget",
        ("--target-params", "85k", "--vocab-shares", "0.5"): "--vocab-shares go with --target-total",
        ("--target-total", total, "--embed-params", "1k"): "chooses the vocabulary itself",
        ("--target-params", "85k", "--embed-exact-rows", "8"): "--plan auto --target-total's",
    }
    for extra, message in refusals.items():
        assert main([*args, *extra, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert main(["convert", "--model", str(directory), "--target-total", total, "--out", str(tmp_path / "x")]) == 2
    assert "add --plan auto" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--target-total", total, "--vocab-shares", "1.5", "--out", str(tmp_path / "x")])
    assert "a share must be a fraction in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
