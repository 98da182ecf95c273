"""Layer dropping: block influence against a hand computation on transformers' own model, the kept model
against transformers' model with those layers deleted, and the rules' guard rails."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from recursify.conversion.convert import convert
from recursify.conversion.layer_drop import block_influence, drop_layers, layers_to_keep
from recursify.errors import ConfigError
from tiny import save_tiny_checkpoint, tiny_model


def _hand_influence(hf: Any, ids: torch.Tensor) -> list[float]:
    """1 - mean cosine between each decoder layer's input and output residual stream, from forward hooks."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(_module: Any, args: tuple[torch.Tensor, ...], kwargs: dict[str, Any], output: Any) -> None:
        inputs = args[0] if args else kwargs["hidden_states"]
        pairs.append((inputs, output[0] if isinstance(output, tuple) else output))

    handles = [layer.register_forward_hook(record, with_kwargs=True) for layer in hf.model.layers]
    with torch.no_grad():
        hf(ids)
    for handle in handles:
        handle.remove()
    influence = []
    for inputs, output in pairs:
        cos = (inputs * output).sum(-1) / (inputs.norm(dim=-1) * output.norm(dim=-1))
        influence.append(1.0 - float(cos.double().mean()))
    return influence


def _hf_without(hf: Any, kept: list[int]) -> Any:
    """transformers' model with every layer but ``kept`` deleted (and its config cut to match)."""
    small = copy.deepcopy(hf)
    small.model.layers = torch.nn.ModuleList([small.model.layers[d] for d in kept])
    for index, layer in enumerate(small.model.layers):
        layer.self_attn.layer_idx = index
    small.config.num_hidden_layers = len(kept)
    if getattr(small.config, "layer_types", None):
        small.config.layer_types = [hf.config.layer_types[d] for d in kept]
    return small


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_block_influence_equals_a_hand_computation(family: str) -> None:
    hf = tiny_model(family, seed=6)
    ids = torch.randint(3, 97, (3, 11), generator=torch.Generator().manual_seed(2))
    ours = block_influence(convert(hf, loops=1, progress=False), ids, micro_batch=2)
    assert ours == pytest.approx(_hand_influence(hf, ids), abs=1e-5)


def test_layers_to_keep_takes_the_most_influential_in_order() -> None:
    assert layers_to_keep([0.5, 0.1, 0.9, 0.1, 0.3, 0.7], 3) == [0, 2, 5]
    assert layers_to_keep([0.2, 0.2, 0.2], 2) == [0, 1]  # ties keep the earlier layer
    with pytest.raises(ConfigError, match="between 1 and the model's 3"):
        layers_to_keep([0.1, 0.2, 0.3], 4)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("drop")
    save_tiny_checkpoint(directory, "gemma2", seed=7)  # sliding and full layers: the kept depths keep their own pattern
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away"]
    text = directory / "calib.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(50)) for _ in range(30)))
    return directory, text


def test_dropping_by_influence_keeps_the_influential_layers_unchanged(source: tuple[Path, Path]) -> None:
    directory, text = source
    model = drop_layers(directory, keep=4, by="influence", calib=str(text), calib_tokens=600, progress=False)
    influence = model.report["block_influence"]
    kept = model.recursion.kept_layers
    assert kept == sorted(sorted(range(6), key=lambda d: -influence[d])[:4]) and model.report["dropped"] == sorted(
        set(range(6)) - set(kept)
    )
    assert model.num_depths == 4 and model.loops == 1
    hf = tiny_model("gemma2", seed=7)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _hf_without(hf, kept)(ids).logits, atol=1e-4, rtol=1e-4)


def test_dropping_first_keeps_the_first_layers_and_counts_parameters(source: tuple[Path, Path]) -> None:
    directory, _ = source
    model = drop_layers(directory, keep=2, by="first", progress=False)
    assert model.recursion.kept_layers == [0, 1]
    full = convert(directory, loops=1, progress=False).param_counts()
    per_layer = (full["non_embedding"] - 48) // 6  # every layer of the tiny model has the same size; 48 = the final norm
    assert model.param_counts()["non_embedding"] == 2 * per_layer + 48 and model.param_counts()["embedding"] == full["embedding"]


def test_influence_needs_calibration_data(source: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match="--calib"):
        drop_layers(source[0], keep=3, by="influence", progress=False)
    with pytest.raises(ConfigError, match="--drop-by"):
        drop_layers(source[0], keep=3, by="last", progress=False)


def test_cli_keep_layers_and_refused_options(source: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recursify import load
    from recursify.cli import main

    directory, text = source
    args = ["convert", "--model", str(directory), "--keep-layers", "3", "--calib", str(text), "--calib-tokens", "600", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "dropped")]) == 0
    model = load(tmp_path / "dropped")
    assert len(model.recursion.kept_layers) == 3 and len(model.report["block_influence"]) == 6
    assert main([*args, "--loops", "2", "--out", str(tmp_path / "x")]) == 2
    assert "drop --loops" in capsys.readouterr().err
