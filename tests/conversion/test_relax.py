"""The cheaper relaxations: LoRA-XS equals LoRA at init, least-squares bias init, closed-form counts, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recursify import convert, load
from recursify.config import RecursionConfig, parse_relax
from recursify.conversion.calibration import calibrate
from recursify.conversion.relax_init import xs_factors
from recursify.errors import ConfigError
from recursify.modeling.layers import linear_shapes
from recursify.modeling.model import RecursiveModel
from tiny import tiny_model

IDS = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
VARIANTS = [("lora", 4), ("lora-xs", 4), ("prefix:3", 0), ("bias", 0)]


def _convert(relax: str, rank: int | str, family: str = "qwen2", **options: object) -> RecursiveModel:
    return convert(tiny_model(family, seed=5), loops=3, init="average", rank=rank, relax=relax, progress=False, **options)  # type: ignore[arg-type]


def _calibration(family: str = "qwen2") -> object:
    original = convert(tiny_model(family, seed=5), loops=1, progress=False)
    return calibrate(original, torch.randint(3, 97, (8, 32), generator=torch.Generator().manual_seed(1)), progress=False)


def test_xs_factors_reproduce_the_lora_product() -> None:
    a, b = torch.randn(5, 12), torch.randn(9, 5)
    b[:, 3] = 0  # a direction with no singular value: random unit column, zero core entry
    fixed_a, fixed_b, core = xs_factors(a, b, torch.Generator().manual_seed(0))
    torch.testing.assert_close(fixed_b @ core @ fixed_a, b @ a)
    torch.testing.assert_close(fixed_b.norm(dim=0), torch.ones(5))
    assert torch.equal(core, torch.diag(core.diagonal())) and core[3, 3] == 0


@pytest.mark.parametrize("rank", [4, "full"])
@pytest.mark.parametrize("lora_init", ["svd", "asvd"])
def test_lora_xs_equals_lora_at_init(rank: int | str, lora_init: str) -> None:
    calib = _calibration() if lora_init == "asvd" else None
    lora = _convert("lora", rank, lora_init=lora_init, calib=calib)
    xs = _convert("lora-xs", rank, lora_init=lora_init, calib=calib)
    torch.testing.assert_close(xs(IDS).logits, lora(IDS).logits, atol=1e-4, rtol=1e-4)
    if rank == "full":  # and so both reproduce the original
        original = convert(tiny_model("qwen2", seed=5), loops=1, progress=False)
        torch.testing.assert_close(xs(IDS).logits, original(IDS).logits, atol=1e-3, rtol=1e-3)


def test_bias_init_is_the_least_squares_bias() -> None:
    calib = _calibration("llama")
    model = _convert("bias", 0, family="llama", calib=calib)
    plain = _convert("bias", 0, family="llama")
    original = convert(tiny_model("llama", seed=5), loops=1, progress=False)
    for visit, depth in enumerate((1, 3, 5)):  # shared layer 1 serves depths 1, 3, 5
        for name in ("q", "down"):
            shared, linear = model.shared_layer(1).linear(name), original.shared_layer(depth).linear(name)
            expected = ((linear.weight - shared.weight).double() @ calib.mean(depth, name)).float()  # type: ignore[attr-defined]
            assert model.shared_layer(1).linear(name).bias_delta is not None
            torch.testing.assert_close(model.shared_layer(1).linear(name).bias_delta[visit], expected)  # type: ignore[index]
            assert not plain.shared_layer(1).linear(name).bias_delta.any()  # type: ignore[union-attr]


@pytest.mark.parametrize(("relax", "rank"), VARIANTS)
def test_param_counts_closed_form(relax: str, rank: int) -> None:
    model, pure = _convert(relax, rank, family="llama"), _convert("lora", 0, family="llama")
    counts, base = model.param_counts(), pure.param_counts()
    arch, unique, visits = model.arch, len(model.layers), model.loops
    shapes = linear_shapes(arch).values()
    kind, tokens = parse_relax(relax)
    expected_trainable = {
        "lora": unique * visits * sum(rank * (i + o) for i, o in shapes),
        "lora-xs": unique * visits * len(shapes) * rank * rank,
        "prefix": unique * visits * 2 * arch.num_kv_heads * tokens * arch.head_dim,
        "bias": unique * visits * sum(o for _, o in shapes),
    }[kind]
    assert counts["lora"] == expected_trainable
    assert counts["frozen"] == (unique * visits * sum(rank * (i + o) for i, o in shapes) if kind == "lora-xs" else 0)
    assert counts["non_embedding"] == base["non_embedding"] and counts["embedding"] == base["embedding"]
    assert counts["total"] == base["total"] + expected_trainable
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == counts["total"]


def _randomise_relaxation(model: RecursiveModel) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("lora_R", "prefix_keys", "prefix_values", "bias_delta"):
                param.copy_(torch.randn_like(param) * 0.1)


@pytest.mark.parametrize(("relax", "rank"), VARIANTS)
def test_save_load_round_trip_is_exact(relax: str, rank: int, tmp_path: Path) -> None:
    model = _convert(relax, rank)
    _randomise_relaxation(model)
    model.save_pretrained(str(tmp_path / "run"))
    loaded = load(tmp_path / "run")
    assert loaded.recursion.relax == relax
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_old_config_without_relax_loads_as_lora(tmp_path: Path) -> None:
    _convert("lora", 4).save_pretrained(str(tmp_path / "run"))
    config_path = tmp_path / "run" / "config.json"
    config = json.loads(config_path.read_text())
    del config["recursion"]["relax"]
    config_path.write_text(json.dumps(config))
    assert load(tmp_path / "run").recursion.relax == "lora"


@pytest.mark.parametrize("spec", ["prefix:0", "prefix:abc", "prefix", "loraxs", "bias:2", "lora-xs:4"])
def test_bad_relax_specs(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_relax(spec)
    with pytest.raises(ConfigError):
        RecursionConfig(relax=spec)


@pytest.mark.parametrize(
    ("relax", "options"),
    [("lora-xs", {"rank": 0}), ("bias", {"rank": 4}), ("prefix:2", {"rank": 4}), ("lora-xs", {"rank": 4, "lora_params": "3k"})],
)
def test_relax_option_combinations_are_refused(relax: str, options: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="--relax"):
        convert(tiny_model("llama", seed=5), loops=3, relax=relax, progress=False, **options)  # type: ignore[arg-type]
