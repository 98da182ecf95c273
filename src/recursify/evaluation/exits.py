"""Per-loop (static early exit) quality and oracle exit trajectories, accumulated over scored tokens.

Every loop end is an exit (docs/method.md section 6): the final norm + LM head applied to the hidden
state after loop b. For each exit we accumulate, over all scored tokens,

- the next-token negative log-likelihood (-> perplexity if every token exited there),
- top-1 agreement with the final loop (how often exiting there would not change a greedy token),
- with a teacher: KL(teacher || exit) and top-1 agreement with the teacher.

The oracle exit of a token is the first loop whose argmax equals the final loop's; its histogram
and mean give the average loops per token an ideal exit policy would spend (the serving
simulator's input). Loops are numbered from 1; the last loop always agrees with itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class LoopMetrics:
    """Static-exit quality after one loop.

    Attributes:
        loop: 1-based loop index (the exit after that many passes of the shared block).
        ppl: perplexity of this exit's distribution.
        agree_final: fraction of tokens whose argmax equals the final loop's.
        kl_teacher: mean KL(teacher || this exit) in nats per token (None without a teacher).
        agree_teacher: fraction of tokens whose argmax equals the teacher's (None without a teacher).
    """

    loop: int
    ppl: float
    agree_final: float
    kl_teacher: float | None = None
    agree_teacher: float | None = None


@dataclass
class OracleExits:
    """Oracle exit loops over all scored tokens.

    Attributes:
        histogram: ``histogram[i]`` tokens first agree with the final argmax after loop ``i + 1``.
        mean_loops: average loops per token under the oracle policy.
    """

    histogram: list[int]
    mean_loops: float


def oracle_exit_loops(exit_argmax: torch.Tensor) -> torch.Tensor:
    """The oracle exit loop (1-based) of every token.

    Args:
        exit_argmax: [loops, tokens] argmax of every exit; the last row is the final loop.

    Returns:
        [tokens] int64: the first loop b (1..loops) whose argmax equals the final loop's.
    """
    agrees = exit_argmax == exit_argmax[-1]  # (loops, tokens); the last row is all True
    return agrees.int().argmax(dim=0) + 1  # argmax returns the first maximal index


@dataclass
class ExitAccumulator:
    """Running sums of the per-loop statistics; feed it scored positions batch by batch."""

    loops: int
    with_teacher: bool = False
    tokens: int = 0
    nll: list[float] = field(default_factory=list)
    agree_final: list[int] = field(default_factory=list)
    kl_teacher: list[float] = field(default_factory=list)
    agree_teacher: list[int] = field(default_factory=list)
    histogram: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.nll = [0.0] * self.loops
        self.agree_final = [0] * self.loops
        self.kl_teacher = [0.0] * self.loops
        self.agree_teacher = [0] * self.loops
        self.histogram = [0] * self.loops

    def update(self, exit_logits: list[torch.Tensor], targets: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> None:
        """Add the scored positions of one batch.

        Args:
            exit_logits: one [tokens, vocab] tensor per loop end (same rows in every tensor).
            targets: [tokens] next-token ids.
            teacher_logits: [tokens, vocab] of the teacher at the same positions (required iff
                the accumulator was built ``with_teacher``).
        """
        if len(exit_logits) != self.loops:
            raise ValueError(f"expected {self.loops} exits, got {len(exit_logits)}")
        if (teacher_logits is not None) != self.with_teacher:
            raise ValueError("teacher_logits must be given exactly when the accumulator has a teacher")
        teacher_logp = teacher_logits.float().log_softmax(-1) if teacher_logits is not None else None
        argmaxes = []
        for index, logits in enumerate(exit_logits):
            logp = logits.float().log_softmax(-1)  # (tokens, vocab)
            self.nll[index] -= float(logp.gather(-1, targets[:, None]).sum())
            argmax = logp.argmax(-1)
            argmaxes.append(argmax)
            if teacher_logp is not None:
                self.kl_teacher[index] += float((teacher_logp.exp() * (teacher_logp - logp)).sum())
                self.agree_teacher[index] += int((argmax == teacher_logp.argmax(-1)).sum())
        stacked = torch.stack(argmaxes)  # (loops, tokens)
        for index in range(self.loops):
            self.agree_final[index] += int((stacked[index] == stacked[-1]).sum())
        counts = torch.bincount(oracle_exit_loops(stacked) - 1, minlength=self.loops).tolist()
        self.histogram = [old + new for old, new in zip(self.histogram, counts, strict=True)]
        self.tokens += int(targets.numel())

    def per_loop(self) -> list[LoopMetrics]:
        """The per-loop metrics of everything added so far."""
        n = max(self.tokens, 1)
        return [
            LoopMetrics(
                loop=index + 1,
                ppl=perplexity(self.nll[index], self.tokens),
                agree_final=self.agree_final[index] / n,
                kl_teacher=self.kl_teacher[index] / n if self.with_teacher else None,
                agree_teacher=self.agree_teacher[index] / n if self.with_teacher else None,
            )
            for index in range(self.loops)
        ]

    def oracle(self) -> OracleExits:
        """The oracle exit histogram and the implied mean loops per token."""
        mean = sum((index + 1) * count for index, count in enumerate(self.histogram)) / max(self.tokens, 1)
        return OracleExits(histogram=list(self.histogram), mean_loops=mean)


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean negative log-likelihood); inf when the mean overflows, nan for no tokens."""
    if tokens == 0:
        return math.nan
    try:
        return math.exp(nll_sum / tokens)
    except OverflowError:
        return math.inf
