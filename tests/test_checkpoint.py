"""Checkpoints: bit-identical round trips, no unpickling, clear errors, atomic overwrite."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import recursify
from recursify import checkpoint
from recursify.errors import CheckpointError, SourceError
from recursify.modeling.model import RecursiveModel
from tiny import tiny_model


def _model(family: str = "qwen2", seed: int = 4, **options: Any) -> RecursiveModel:
    options = {"loops": 3, "init": "average", "rank": 4, **options}
    return recursify.convert(tiny_model(family, seed=seed), progress=False, **options)


def _saved(tmp_path: Path, **options: Any) -> tuple[RecursiveModel, Path]:
    model = _model(**options)
    target = tmp_path / "ckpt"
    model.save_pretrained(str(target))
    return model, target


def _edit_config(directory: Path, edit: Any) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "options",
    [
        {"family": "qwen2"},  # bias residuals, tied embeddings
        {"family": "gemma3_text", "norms": "tied", "strategy": "cycle-rev", "rank": "full", "loops": 2},
        {"family": "llama", "loops": 2, "strategy": "middle-cycle", "rank": 0, "norms": "fold"},  # untied head
    ],
    ids=["qwen2", "gemma3", "llama"],
)
def test_round_trip_is_bit_identical(tmp_path: Path, options: dict[str, Any]) -> None:
    model, target = _saved(tmp_path, **options)
    loaded = recursify.load(target)
    assert isinstance(loaded, RecursiveModel) and not loaded.training
    assert loaded.arch == model.arch and loaded.recursion == model.recursion
    # the source's transformers config is kept as JSON (so id2label keys come back as strings)
    assert dataclasses.asdict(loaded.source) == json.loads(json.dumps(dataclasses.asdict(model.source)))
    original, restored = model.state_dict(), loaded.state_dict()
    assert list(restored) == list(original)
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name
    assert loaded.param_counts() == model.param_counts()
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert json.loads((target / "config.json").read_text())["params"] == model.param_counts()
    assert checkpoint.is_checkpoint(target)
    loaded.save_pretrained(str(tmp_path / "again"))
    assert (tmp_path / "again" / "config.json").read_bytes() == (target / "config.json").read_bytes()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (target / "model.safetensors").read_bytes()


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, target = _saved(tmp_path)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = recursify.load(target)
    assert torch.equal(loaded.layers[0].q.lora_A, model.layers[0].q.lora_A)


def test_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        RecursiveModel.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(SourceError, match="not an existing path, a known alias or a hub id"):
        recursify.load(tmp_path / "nowhere")


def test_missing_config_raises(tmp_path: Path) -> None:
    _, target = _saved(tmp_path)
    (target / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json.*recursify convert"):
        RecursiveModel.from_pretrained(target)
    assert not checkpoint.is_checkpoint(target)


def test_missing_weights_raise(tmp_path: Path) -> None:
    _, target = _saved(tmp_path)
    (target / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors.*incomplete"):
        recursify.load(target)


@pytest.mark.parametrize("keep", [0.5, 0.0, 8], ids=["half", "empty", "header-only"])
def test_truncated_weights_raise(tmp_path: Path, keep: float) -> None:
    _, target = _saved(tmp_path)
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        recursify.load(target)


def test_config_that_is_not_json_raises(tmp_path: Path) -> None:
    _, target = _saved(tmp_path)
    (target / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        RecursiveModel.from_pretrained(target)


def test_transformers_directory_is_not_a_recursify_checkpoint(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    assert not checkpoint.is_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a recursify checkpoint.*recursify convert"):
        RecursiveModel.from_pretrained(tmp_path)


def test_load_opens_a_source_as_the_original(tmp_path: Path) -> None:
    """``recursify.load`` of a transformers directory is the original model (loops=1), with transformers' own logits."""
    reference = tiny_model("llama", seed=7)
    reference.save_pretrained(tmp_path)
    model = recursify.load(tmp_path)
    assert isinstance(model, RecursiveModel) and model.loops == 1 and not model.training
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["architecture"].update(hidden_size=64), "does not match its config.json"),
        (lambda c: c["recursion"].update(rank_spec=8, ranks={k: 8 for k in c["recursion"]["ranks"]}), "does not match its config.json"),
        (lambda c: c.pop("architecture"), "incomplete or malformed"),
        (lambda c: c["architecture"].update(unknown_field=1), "incomplete or malformed"),
        (lambda c: c["recursion"].update(strategy="spiral"), "invalid configuration: unknown strategy 'spiral'"),
        (lambda c: c["recursion"].update(loops=4), "invalid configuration: loops=4 does not divide"),
        (lambda c: c.update(format_version=99), "newer recursify"),
    ],
    ids=["shape", "rank", "no-architecture", "unknown-field", "bad-strategy", "bad-loops", "newer-format"],
)
def test_wrong_config_raises_checkpoint_error(tmp_path: Path, edit: Any, message: str) -> None:
    _, target = _saved(tmp_path)
    _edit_config(target, edit)
    with pytest.raises(CheckpointError, match=message):
        recursify.load(target)


def test_saving_over_an_existing_directory_needs_overwrite(tmp_path: Path) -> None:
    model, target = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(CheckpointError, match="already exists.*overwrite"):
        _model(seed=5).save_pretrained(str(target))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        model.save_pretrained(str(tmp_path / "a_file"), overwrite=True)


def test_overwrite_replaces_atomically_and_leaves_no_temp_dirs(tmp_path: Path) -> None:
    _, target = _saved(tmp_path)
    (target / "stale.txt").write_text("from the old checkpoint")
    replacement = _model(seed=5, loops=2)
    replacement.save_pretrained(str(target), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    loaded = recursify.load(target)
    assert loaded.recursion.loops == 2
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in replacement.state_dict().items())


def test_failed_save_keeps_the_old_checkpoint_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, target = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        _model(seed=5).save_pretrained(str(target), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    with pytest.raises(OSError, match="No space"):
        model.save_pretrained(str(tmp_path / "fresh"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_creates_missing_parents(tmp_path: Path) -> None:
    model = _model(rank=0)
    target = tmp_path / "a" / "b" / "ckpt"
    model.save_pretrained(str(target))
    assert recursify.load(target).tokenizer is None
    assert sorted(p.name for p in target.parent.iterdir()) == ["ckpt"]


def test_tokenizer_travels_with_the_checkpoint(tmp_path: Path) -> None:
    from tiny import tiny_tokenizer

    model = _model(rank=0)
    model.tokenizer = tiny_tokenizer()
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = recursify.load(tmp_path / "ckpt")
    assert loaded.tokenizer is not None
    text = "hello, world"
    assert loaded.tokenizer(text)["input_ids"] == model.tokenizer(text)["input_ids"]
    assert loaded.tokenizer.decode(model.tokenizer(text)["input_ids"]) == text
