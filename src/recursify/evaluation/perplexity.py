"""Perplexity of a token stream with a sliding window, optionally per loop and against a teacher.

Strided evaluation as in Hugging Face's perplexity guide, with every token after the first scored
exactly once: the first window predicts its ``ctx`` tokens, each later window moves ``stride``
tokens on and scores only the ``stride`` targets it adds, seeing the ``ctx - stride`` tokens before
them as context. All windows have the same length, so they batch without padding.

Each window feeds tokens ``[begin, end)`` and predicts tokens ``[begin + 1, end + 1)``; the last
input token is the last one whose successor is known, so no logit is computed in vain.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from recursify.errors import ConfigError
from recursify.evaluation.exits import ExitAccumulator, LoopMetrics, OracleExits
from recursify.modeling.model import RecursiveModel
from recursify.text import precision_context

# Scored positions handed to the accumulator at once: bounds the [rows, vocab] float32 temporaries.
_SCORE_CHUNK = 1024


@dataclass(frozen=True)
class Window:
    """One forward pass: input tokens ``[begin, end)``, of which the last ``scored`` predictions count."""

    begin: int
    end: int
    scored: int


@dataclass
class PerplexityResult:
    """Perplexity of the final output plus, when asked, the per-loop and oracle-exit statistics.

    Attributes:
        value: exp(mean NLL) of the final loop over ``tokens`` scored tokens.
        nll: summed negative log-likelihood (nats) of the final loop.
        tokens: number of scored tokens (the stream length minus one).
        ctx, stride: the window used.
        per_loop: one entry per loop end (loops=1 models have a single entry equal to the final).
        oracle: oracle exit histogram (with ``per_loop``).
    """

    value: float
    nll: float
    tokens: int
    ctx: int
    stride: int
    per_loop: list[LoopMetrics] | None = None
    oracle: OracleExits | None = None


def sliding_windows(num_tokens: int, ctx: int, stride: int) -> list[Window]:
    """Windows that score tokens 1..num_tokens-1 once each, with at least ``ctx - stride + 1`` tokens of context
    (all available context for the first ``ctx`` targets).

    Raises:
        ConfigError: fewer than two tokens, or ``stride`` outside 1..ctx.
    """
    if ctx < 1:
        raise ConfigError(f"ctx must be a positive number of tokens, got {ctx}")
    if not 1 <= stride <= ctx:
        raise ConfigError(f"stride must be between 1 and ctx ({ctx}), got {stride}")
    if num_tokens < 2:
        raise ConfigError(f"perplexity needs at least 2 tokens (one to condition on, one to score), got {num_tokens}; give more text")
    length = min(ctx, num_tokens - 1)
    windows = [Window(0, length, length)]
    next_target = length + 1
    while next_target < num_tokens:
        stop = min(next_target + stride, num_tokens)  # targets [next_target, stop)
        windows.append(Window(stop - 1 - length, stop - 1, stop - next_target))
        next_target = stop
    return windows


def evaluate_perplexity(
    model: RecursiveModel,
    tokens: torch.Tensor,
    ctx: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    precision: str = "fp32",
    per_loop: bool = False,
    teacher: RecursiveModel | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Score a 1-D token stream with sliding windows.

    Args:
        model: the model to evaluate.
        tokens: 1-D int64 token ids (e.g. ``recursify.data.load_tokens(...)``).
        ctx: tokens per window.
        stride: new tokens scored per window after the first (default ``ctx``: disjoint windows).
        batch_size: windows per forward pass.
        precision: "fp32" or "bf16" (autocast; log-probabilities are always taken in float32).
        per_loop: also score every loop end (one forward with ``output_exits``) and the oracle exits.
        teacher: a model with the same vocabulary run on the same windows; adds KL(teacher || exit)
            and teacher agreement per loop (implies ``per_loop``).
        progress: show a progress bar.
    """
    if tokens.dim() != 1:
        raise ConfigError(f"expected a 1-D token stream, got shape {tuple(tokens.shape)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if teacher is not None and teacher.arch.vocab_size != model.arch.vocab_size:
        raise ConfigError(
            f"the teacher's vocabulary ({teacher.arch.vocab_size}) differs from the model's ({model.arch.vocab_size}); "
            "use the model the student was converted from"
        )
    if tokens.numel() and int(tokens.max()) >= model.arch.vocab_size:
        raise ConfigError(f"token id {int(tokens.max())} is outside the model's vocabulary ({model.arch.vocab_size}); wrong tokenizer?")
    stride = ctx if stride is None else stride
    windows = sliding_windows(tokens.numel(), ctx, stride)
    per_loop = per_loop or teacher is not None
    accumulator = ExitAccumulator(model.loops if per_loop else 1, with_teacher=teacher is not None)
    tokens = tokens.to(model.device)
    with tqdm(total=tokens.numel() - 1, unit="tok", desc="perplexity", disable=not progress) as bar:
        for batch in _batched(windows, batch_size):
            keep = max(window.scored for window in batch)
            inputs = torch.stack([tokens[w.begin : w.end] for w in batch])  # (batch, window)
            with torch.no_grad(), precision_context(precision, model.device):
                output = model(inputs, output_exits=per_loop, logits_to_keep=keep)
                teacher_logits = teacher(inputs, logits_to_keep=keep).logits if teacher is not None else None
            exits = output.exit_logits if output.exit_logits is not None else [output.logits]
            targets = torch.cat([tokens[w.end + 1 - w.scored : w.end + 1] for w in batch])
            scored_exits = [_scored_rows(logits, batch, keep) for logits in exits]
            scored_teacher = _scored_rows(teacher_logits, batch, keep) if teacher_logits is not None else None
            for start in range(0, targets.numel(), _SCORE_CHUNK):
                rows = slice(start, start + _SCORE_CHUNK)
                accumulator.update(
                    [logits[rows] for logits in scored_exits], targets[rows], scored_teacher[rows] if scored_teacher is not None else None
                )
            bar.update(int(targets.numel()))
    final = accumulator.per_loop()[-1]
    return PerplexityResult(
        value=final.ppl,
        nll=accumulator.nll[-1],
        tokens=accumulator.tokens,
        ctx=ctx,
        stride=stride,
        per_loop=accumulator.per_loop() if per_loop else None,
        oracle=accumulator.oracle() if per_loop else None,
    )


def _scored_rows(logits: torch.Tensor, batch: list[Window], keep: int) -> torch.Tensor:
    """[sum of scored, vocab]: the last ``scored`` positions of each row of [batch, keep, vocab]."""
    return torch.cat([logits[row, keep - window.scored :] for row, window in enumerate(batch)])


def _batched(windows: list[Window], size: int) -> Iterator[list[Window]]:
    for start in range(0, len(windows), size):
        yield windows[start : start + size]
