"""recursify export --format transformers: AutoModelForCausalLM(trust_remote_code) gives recursify's logits and generations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from recursify import convert, load
from recursify.cli import main
from recursify.errors import CheckpointError
from recursify.export import export_transformers
from recursify.export.transformers_format import AUTO_MAP, SHIM_DIR, SHIM_FILES
from tiny import save_tiny_checkpoint

VARIANTS = {  # family, conversion options: relaxed LoRA, Qwen2 bias residuals, Gemma2 windows + soft-caps, LoRA-XS, the original
    "llama-l3-r4": ("llama", {"loops": 3, "rank": 4, "init": "average"}),
    "qwen2-l2-r4": ("qwen2", {"loops": 2, "rank": 4, "init": "average"}),
    "gemma2-l3-r0": ("gemma2", {"loops": 3}),
    "mistral-l2-loraxs": ("mistral", {"loops": 2, "rank": 4, "relax": "lora-xs"}),
    "gemma3-l1": ("gemma3_text", {"loops": 1}),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name -> (recursify checkpoint, transformers export) for every variant."""
    root = tmp_path_factory.mktemp("export")
    paths = {}
    for name, (family, options) in VARIANTS.items():
        save_tiny_checkpoint(root / family, family, seed=3)
        convert(str(root / family), progress=False, **options).save_pretrained(str(root / name))
        paths[name] = (root / name, export_transformers(root / name, root / f"{name}-hf"))
    return paths


def _open(path: Path, device: torch.device | str = "cpu") -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).to(device).eval()


def _prompts(batch: int = 3, length: int = 9, seed: int = 0, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths (pad id 0) and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 97, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 2 * row] = 0
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_equal_recursifys(exports, name: str, device: torch.device) -> None:
    checkpoint, exported = exports[name]
    ours, theirs = load(checkpoint, device=device), _open(exported, device)
    ids, mask = _prompts(device=device)
    with torch.no_grad():
        expected = ours(ids, attention_mask=mask).logits
        got = theirs(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama-l3-r4", "gemma2-l3-r0", "mistral-l2-loraxs"])
def test_generate_with_its_cache_equals_recursifys_generate(exports, name: str, device: torch.device) -> None:
    checkpoint, exported = exports[name]
    ours, theirs = load(checkpoint, device=device), _open(exported, device)
    ids, mask = _prompts(device=device)
    expected = ours.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_ids=[])
    calls: list[tuple[int, Any]] = []
    forward = theirs.forward

    def recording(*args: Any, **kwargs: Any) -> Any:
        output = forward(*args, **kwargs)
        calls.append((kwargs["input_ids"].shape[1], output.cache))
        return output

    theirs.forward = recording
    got = theirs.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(got, expected)
    # Prefill once, then one token per step through the model's own per-depth cache (grown past the prompt).
    assert [length for length, _ in calls] == [ids.shape[1]] + [1] * 19
    cache = calls[-1][1]
    assert type(cache).__name__ == "RecursifyCache" and all(c is cache for _, c in calls)
    assert cache.length == ids.shape[1] + 19 and cache.keys.shape[0] == ours.num_depths
    uncached = _open(exported, device).generate(
        ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=False
    )
    assert torch.equal(uncached, expected)


def test_beam_search_reorders_the_cache(exports) -> None:
    _, exported = exports["llama-l3-r4"]
    model = _open(exported)
    ids, mask = _prompts(batch=2)
    options: dict[str, Any] = {"attention_mask": mask, "max_new_tokens": 8, "min_new_tokens": 8, "num_beams": 3, "do_sample": False}
    assert torch.equal(model.generate(ids, **options), model.generate(ids, use_cache=False, **options))


def test_labels_give_the_next_token_cross_entropy(exports) -> None:
    _, exported = exports["qwen2-l2-r4"]
    model = _open(exported)
    ids, _ = _prompts(batch=2)
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(input_ids=ids, labels=labels)
    logits = out.logits[:, :-1]
    keep = labels[:, 1:] != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[:, 1:][keep])
    torch.testing.assert_close(out.loss, expected)


def test_export_layout(exports) -> None:
    checkpoint, exported = exports["llama-l3-r4"]
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "recursify" and config["auto_map"] == AUTO_MAP
    assert config["architectures"] == ["RecursifyForCausalLM"] and config["recursion"]["loops"] == 3
    for name in SHIM_FILES:  # copied verbatim: a thin shim over the installed recursify, no second decoder
        assert (exported / name).read_text() == (SHIM_DIR / name).read_text()
    assert "from recursify.modeling.model import RecursiveModel" in (exported / "modeling_recursify.py").read_text()
    assert sorted(p.name for p in exported.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors")) == ["model.safetensors"]
    assert (exported / "tokenizer.json").is_file() and (exported / "generation_config.json").is_file()
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(f".{exported.name}.")]  # no staging left behind


def test_refusals(exports, tmp_path) -> None:
    checkpoint, exported = exports["llama-l3-r4"]
    with pytest.raises(CheckpointError, match="already exists"):
        export_transformers(checkpoint, exported)
    with pytest.raises(CheckpointError, match="checkpoint itself"):
        export_transformers(checkpoint, checkpoint, overwrite=True)
    with pytest.raises(CheckpointError):
        export_transformers(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli(exports, tmp_path, capsys) -> None:
    checkpoint, _ = exports["gemma2-l3-r0"]
    assert main(["export", str(checkpoint), "--format", "transformers", "--out", str(tmp_path / "hf")]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert main(["export", str(checkpoint), "--format", "transformers", "--out", str(tmp_path / "hf")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
