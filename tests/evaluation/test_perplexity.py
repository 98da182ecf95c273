"""Sliding-window perplexity: window coverage, edge cases, and exp(mean CE) against transformers' logits.

References: transformers' own model (an independent implementation) scored by hand with
``cross_entropy``, and the Hugging Face perplexity guide's masked-label formulation per window.
"""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import recursify
from recursify.errors import ConfigError
from recursify.evaluation.perplexity import evaluate_perplexity, sliding_windows
from recursify.modeling.model import RecursiveModel
from tiny import tiny_model


@cache
def _pair() -> tuple[torch.nn.Module, RecursiveModel]:
    reference = tiny_model("llama", seed=5)
    return reference, recursify.convert(reference, loops=1, progress=False)


def _stream(seed: int, length: int) -> torch.Tensor:
    return torch.randint(3, 97, (length,), generator=torch.Generator().manual_seed(seed))


@settings(max_examples=200, deadline=None)
@given(num_tokens=st.integers(2, 120), ctx=st.integers(1, 40), data=st.data())
def test_windows_score_every_token_once_with_enough_context(num_tokens: int, ctx: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, ctx))
    windows = sliding_windows(num_tokens, ctx, stride)
    scored: list[int] = []
    length = min(ctx, num_tokens - 1)
    for index, window in enumerate(windows):
        assert window.end - window.begin == length and window.begin >= 0 and window.end <= num_tokens - 1
        assert 1 <= window.scored <= (length if index == 0 else stride)
        targets = range(window.end + 1 - window.scored, window.end + 1)
        for target in targets:
            context = target - window.begin
            assert context == target or context >= ctx - stride + 1  # all context at the start, else >= ctx - stride + 1
        scored.extend(targets)
    assert scored == list(range(1, num_tokens))


@pytest.mark.parametrize(("num_tokens", "ctx", "stride"), [(1, 8, 8), (0, 8, 8), (10, 8, 9), (10, 8, 0), (10, 0, 1)])
def test_window_errors(num_tokens: int, ctx: int, stride: int) -> None:
    with pytest.raises(ConfigError):
        sliding_windows(num_tokens, ctx, stride)


def test_text_shorter_than_window_is_one_forward_scored_by_hand() -> None:
    reference, model = _pair()
    tokens = _stream(1, 23)
    result = evaluate_perplexity(model, tokens, ctx=64, progress=False)
    with torch.no_grad():
        logits = reference(tokens[None, :-1]).logits[0]
    ce = torch.nn.functional.cross_entropy(logits, tokens[1:], reduction="mean")
    assert result.tokens == 22 and result.ctx == 64 and result.stride == 64
    assert result.value == pytest.approx(math.exp(float(ce)), rel=1e-5)
    assert result.nll == pytest.approx(float(ce) * 22, rel=1e-5)


def test_two_tokens_score_one() -> None:
    reference, model = _pair()
    tokens = _stream(2, 2)
    with torch.no_grad():
        logp = reference(tokens[None, :1]).logits[0, 0].log_softmax(-1)
    result = evaluate_perplexity(model, tokens, ctx=8, progress=False)
    assert result.tokens == 1
    assert result.value == pytest.approx(math.exp(-float(logp[tokens[1]])), rel=1e-5)


def test_one_token_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        evaluate_perplexity(_pair()[1], _stream(3, 1), progress=False)


@pytest.mark.parametrize(("length", "ctx", "stride", "batch_size"), [(61, 16, 16, 1), (61, 16, 5, 3), (21, 7, 1, 4), (61, 20, 20, 2)])
def test_strided_perplexity_equals_masked_label_reference(length: int, ctx: int, stride: int, batch_size: int) -> None:
    reference, model = _pair()
    tokens = _stream(4, length)
    result = evaluate_perplexity(model, tokens, ctx=ctx, stride=stride, batch_size=batch_size, progress=False)
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in sliding_windows(tokens.numel(), ctx, stride):
            # Hugging Face guide: feed the window plus its last target, mask every label but the scored ones.
            input_ids = tokens[window.begin : window.end + 1][None]
            labels = input_ids.clone()
            labels[:, : -window.scored] = -100
            nll += float(reference(input_ids, labels=labels).loss) * window.scored
            count += window.scored
    assert result.tokens == count == tokens.numel() - 1
    assert result.value == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_batching_does_not_change_the_result() -> None:
    _, model = _pair()
    tokens = _stream(6, 80)
    one = evaluate_perplexity(model, tokens, ctx=12, stride=5, batch_size=1, progress=False)
    many = evaluate_perplexity(model, tokens, ctx=12, stride=5, batch_size=7, progress=False)
    assert many.nll == pytest.approx(one.nll, rel=1e-6)


def test_bf16_is_close_to_fp32() -> None:
    _, model = _pair()
    tokens = _stream(7, 50)
    exact = evaluate_perplexity(model, tokens, ctx=16, progress=False)
    fast = evaluate_perplexity(model, tokens, ctx=16, precision="bf16", progress=False)
    assert fast.value == pytest.approx(exact.value, rel=0.05)


def test_bad_inputs_are_config_errors() -> None:
    _, model = _pair()
    with pytest.raises(ConfigError, match="1-D"):
        evaluate_perplexity(model, _stream(8, 10)[None], progress=False)
    with pytest.raises(ConfigError, match="vocabulary"):
        evaluate_perplexity(model, torch.tensor([5, 97, 6]), progress=False)
    with pytest.raises(ConfigError, match="precision"):
        evaluate_perplexity(model, _stream(8, 10), precision="fp8", progress=False)
