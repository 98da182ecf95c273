"""Optimizer groups: per-depth gains and biases are stacked 2-D tensors but must never be decayed."""

from __future__ import annotations

from recursify import convert
from recursify.training.params import is_gain_or_bias, param_groups
from tiny import tiny_model


def test_weight_decay_skips_every_gain_and_bias() -> None:
    model = convert(tiny_model("qwen2"), loops=3, rank=4, init="average", progress=False)
    decay, no_decay = param_groups([model], weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert {"layers.0.q.weight", "layers.0.q.lora_A", "layers.0.down.lora_B", "embed.weight"} <= decayed
    assert {"layers.0.attn_norm.weight", "layers.0.mlp_norm.weight", "final_norm.weight"} <= kept
    assert {"layers.0.q.bias_delta", "layers.0.q.bias"} <= kept
    assert len(decayed) + len(kept) == len(names)


def test_gain_or_bias_names() -> None:
    assert is_gain_or_bias("layers.3.q_norm.weight") and is_gain_or_bias("norm.weight") and is_gain_or_bias("layers.0.k.bias_delta")
    assert not is_gain_or_bias("layers.0.gate.weight") and not is_gain_or_bias("layers.0.up.lora_R")
