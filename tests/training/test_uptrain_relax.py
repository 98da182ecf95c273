"""Uptraining each relaxation variant: a few steps run, and only trainable tensors move."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recursify import convert, load
from recursify.training.config import UptrainConfig
from recursify.training.uptrain import uptrain

# what every variant adds per depth, by tensor name suffix; shared weights, norms and embeddings train too
ADDED = {"lora-xs": ("lora_R",), "prefix:2": ("prefix_keys", "prefix_values"), "bias": ("bias_delta",)}


@pytest.mark.parametrize("relax", list(ADDED))
def test_few_uptrain_steps_train_what_they_should(relax: str, tiny_run: dict[str, Path], tmp_path: Path) -> None:
    rank = 4 if relax == "lora-xs" else 0
    convert(str(tiny_run["source"]), loops=3, rank=rank, init="average", relax=relax, progress=False).save_pretrained(
        str(tmp_path / "student")
    )
    config = UptrainConfig(
        str(tmp_path / "student"), str(tmp_path / "run"), str(tiny_run["source"]), str(tiny_run["data"]),
        tokens=3 * 64, seq_len=16, batch_tokens=64, micro_batch=2, lr=1e-2, precision="fp32", quiet=True, eval_tokens=0,
    )  # fmt: skip
    assert uptrain(config)["steps"] == 3
    before, after = load(tmp_path / "student"), load(tmp_path / "run")
    assert after.recursion.relax == relax
    trained = {name for name, p in before.named_parameters() if not torch.equal(p, after.get_parameter(name))}
    assert any(name.endswith(ADDED[relax]) for name in trained), trained
    assert "layers.0.q.weight" in trained  # the shared weights train too (nothing is frozen unless asked)
    for name, buffer in before.named_buffers():  # LoRA-XS factors (and RoPE tables) never move
        assert torch.equal(buffer, after.get_buffer(name)), name
