"""The teacher cache: computed targets equal the teacher's own top-k, and survive the file round trip exactly."""

from __future__ import annotations

import torch

from recursify import convert
from recursify.training.losses import top_k_targets
from recursify.training.teacher_cache import cache_path, compute_targets, load_targets, save_targets, teacher_targets
from tiny import tiny_model


def test_targets_round_trip_and_key(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RECURSIFY_CACHE", str(tmp_path))
    teacher = convert(tiny_model("qwen2", seed=1), loops=1, progress=False)
    rows = torch.randint(3, 97, (5, 9), generator=torch.Generator().manual_seed(0))
    targets = compute_targets(teacher, rows, k=6, micro_batch=2)
    with torch.no_grad():
        direct = top_k_targets(teacher(rows).logits, 6)
    assert torch.equal(targets.indices, direct.indices.int()) and torch.allclose(targets.log_probs, direct.log_probs)
    assert targets.indices.shape == (5, 9, 6) and targets.rest.shape == (5, 9)
    save_targets(tmp_path / "t.safetensors", targets)
    back = load_targets(tmp_path / "t.safetensors")
    assert all(
        torch.equal(a, b)
        for a, b in zip((back.indices, back.log_probs, back.rest), (targets.indices, targets.log_probs, targets.rest), strict=True)
    )
    first, info = teacher_targets(teacher, rows, k=6, micro_batch=2)
    second, again = teacher_targets(teacher, rows, k=6, micro_batch=2)
    assert info["built"] and not again["built"] and torch.equal(first.log_probs, second.log_probs)
    assert (
        cache_path(teacher, rows[:4], 6, 1.0, "fp32")
        != cache_path(teacher, rows, 6, 1.0, "fp32")
        != cache_path(teacher, rows, 7, 1.0, "fp32")
    )
