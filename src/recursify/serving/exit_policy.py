"""Early-exit rules (docs/method.md section 6): when a token may leave the loop stack before the last loop.

Pure functions. A policy is parsed once from a spec string; at every loop end the runner asks
whether that loop needs the exit head at all (``needs_logits``) and, if so, which rows leave
(``decide``). ``oracle`` is for simulation only: it needs every loop's prediction, so it never
saves compute and only records where an oracle would have exited.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recursify.errors import ConfigError

EXIT_KINDS = ("none", "confidence", "fixed", "oracle")


@dataclass(frozen=True)
class ExitPolicy:
    """A parsed exit rule.

    Attributes:
        kind: none | confidence | fixed | oracle.
        loops: B, the model's loop count (the last loop always exits).
        thresholds: confidence only; one max-softmax threshold per non-final loop.
        fixed_loops: fixed only; every token runs exactly this many loops (1..B).
    """

    kind: str
    loops: int
    thresholds: tuple[float, ...] = ()
    fixed_loops: int = 0

    @property
    def spec(self) -> str:
        if self.kind == "confidence":
            return "confidence:" + ",".join(f"{t:g}" for t in self.thresholds)
        if self.kind == "fixed":
            return f"fixed:{self.fixed_loops}"
        return self.kind

    def is_exit_loop(self, loop: int) -> bool:
        """Whether a token that reaches the end of ``loop`` leaves there no matter what (last or fixed loop)."""
        if self.kind == "fixed":
            return loop == self.fixed_loops - 1
        return loop == self.loops - 1

    def needs_logits(self, loop: int) -> bool:
        """Whether the exit head must run at the end of ``loop`` (it costs one LM-head matmul per row)."""
        return self.is_exit_loop(loop) or self.kind in ("confidence", "oracle")

    def decide(self, logits: torch.Tensor, loops: list[int]) -> torch.Tensor:
        """Which rows of exit logits [rows, vocab] leave now; ``loops[i]`` is the loop row i just ended -> bool [rows]."""
        forced = torch.tensor([self.is_exit_loop(loop) for loop in loops], dtype=torch.bool, device=logits.device)
        if self.kind != "confidence":
            return forced
        # a float softmax can round to exactly 1.0, so a threshold of 1.0 means "never exit at this loop"
        thresholds = torch.tensor([self.thresholds[loop] if loop < len(self.thresholds) else 2.0 for loop in loops], device=logits.device)
        thresholds = thresholds.masked_fill(thresholds >= 1.0, 2.0)
        confident = torch.softmax(logits.float(), dim=-1).amax(dim=-1) >= thresholds
        return forced | confident


def parse_exit_policy(spec: str, loops: int) -> ExitPolicy:
    """Parse ``none``, ``confidence:TAU`` (or ``confidence:T0,T1,...`` per non-final loop), ``fixed:B`` or ``oracle``."""
    kind, _, arg = spec.partition(":")
    if kind not in EXIT_KINDS:
        raise ConfigError(f"unknown exit policy {spec!r}; use none, confidence:TAU, fixed:B or oracle")
    if kind in ("none", "oracle"):
        if arg:
            raise ConfigError(f"exit policy {kind!r} takes no argument, got {spec!r}")
        return ExitPolicy(kind, loops)
    if kind == "fixed":
        if not arg.isdigit() or not 1 <= int(arg) <= loops:
            raise ConfigError(f"fixed:B needs 1 <= B <= {loops} (the model's loops), got {spec!r}")
        return ExitPolicy(kind, loops, fixed_loops=int(arg))
    try:
        values = [float(part) for part in arg.split(",")]
    except ValueError:
        raise ConfigError(f"confidence thresholds must be numbers, got {spec!r} (e.g. confidence:0.9 or confidence:0.8,0.9)") from None
    if not arg or any(not 0.0 < t <= 1.0 for t in values):
        raise ConfigError(f"confidence thresholds must lie in (0, 1], got {spec!r}")
    if len(values) == 1:
        values *= max(loops - 1, 0)
    if len(values) != loops - 1:
        raise ConfigError(f"give one threshold or {loops - 1} (one per non-final loop), got {len(values)} in {spec!r}")
    return ExitPolicy(kind, loops, thresholds=tuple(values))


def oracle_exit_loop(argmax_per_loop: list[int]) -> int:
    """The first loop whose greedy prediction already equals the final loop's (the oracle exit)."""
    final = argmax_per_loop[-1]
    return next(loop for loop, token in enumerate(argmax_per_loop) if token == final)
