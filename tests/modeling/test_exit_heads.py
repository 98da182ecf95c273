"""Exit heads and ``model.exit_logits``: identical to the shared head until trained, per-row loops, save/load, the last loop untouched."""

from __future__ import annotations

import pytest
import torch

import recursify
from recursify.errors import ConfigError
from recursify.modeling.model import RecursiveModel
from tiny import tiny_model


def _model(loops: int = 3) -> RecursiveModel:
    return recursify.convert(tiny_model("gemma2", seed=2), loops=loops, init="average", rank=4, progress=False).eval()


def test_exit_logits_without_heads_is_the_shared_head() -> None:
    model = _model()
    h = torch.randn(2, 5, model.arch.hidden_size)
    for loop in range(model.loops):
        torch.testing.assert_close(model.exit_logits(h, loop), model.head(h))


def test_fresh_heads_equal_the_shared_head_and_trained_ones_change_early_exits_only() -> None:
    model = _model()
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids, output_exits=True).exit_logits
        model.add_exit_heads(4)
        fresh = model(ids, output_exits=True).exit_logits
        assert model.exit_heads is not None and model.recursion.exit_head_rank == 4
        model.exit_heads.up.normal_(0, 0.5)
        model.exit_heads.norm.weight.add_(0.3)
        trained = model(ids, output_exits=True).exit_logits
    assert before is not None and fresh is not None and trained is not None
    for a, b in zip(before, fresh, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(trained[0], before[0]) and not torch.allclose(trained[1], before[1])
    assert torch.equal(trained[-1], before[-1])  # the last loop never goes through an exit head
    with pytest.raises(ConfigError, match="already has exit heads"):
        model.add_exit_heads(4)


def test_per_row_loops_equal_one_loop_at_a_time() -> None:
    model = _model()
    model.add_exit_heads(3)
    with torch.no_grad():
        assert model.exit_heads is not None
        model.exit_heads.up.normal_(0, 0.5)
    h = torch.randn(5, model.arch.hidden_size)
    loops = [2, 0, 1, 0, 2]
    mixed = model.exit_logits(h, loops)
    for row, loop in enumerate(loops):
        torch.testing.assert_close(mixed[row], model.exit_logits(h[row : row + 1], loop)[0])


def test_heads_round_trip_through_save_and_load(tmp_path) -> None:
    model = _model()
    model.add_exit_heads(2)
    with torch.no_grad():
        assert model.exit_heads is not None
        model.exit_heads.up.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = recursify.load(tmp_path / "ckpt")
    assert loaded.recursion.exit_head_rank == 2
    h = torch.randn(3, model.arch.hidden_size)
    torch.testing.assert_close(loaded.exit_logits(h, 0), model.exit_logits(h, 0))
    with pytest.raises(ConfigError, match="loops >= 2"):
        _model(loops=1).add_exit_heads(2)


def test_rows_at_different_loops_share_one_lm_head_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    """The head's weights are read once per call however many loops the rows come from (it dominates a serving step)."""
    for heads in (False, True):
        model = _model()
        if heads:
            model.add_exit_heads(2)
        calls: list[int] = []
        original = model.lm_logits
        monkeypatch.setattr(model, "lm_logits", lambda z, original=original, calls=calls: calls.append(z.shape[0]) or original(z))
        h = torch.randn(4, model.arch.hidden_size)
        mixed = model.exit_logits(h, [0, 2, 1, 2])
        assert calls == [4]
        for row, loop in enumerate([0, 2, 1, 2]):
            torch.testing.assert_close(mixed[row], original(model.exit_input(h[row : row + 1], loop))[0])
