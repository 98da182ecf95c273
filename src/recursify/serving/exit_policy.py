"""Early-exit rules (docs/method.md section 6): when a token may leave the loop stack before the last loop.

A policy is parsed once from a spec string. At every loop end the runner asks whether that loop
needs the LM head *before* deciding (``needs_logits``), computes the policy's signal for the rows
that just ended a loop (``signal_scores``) and asks which rows leave (``decide``):

- ``confidence:TAU``: the exit head's max softmax probability >= TAU (the head runs every loop);
- ``ensemble:TAU``: the same on the ZTW exit ensemble of exits 1..b (``uptrain --exit-ensemble``);
- ``gate:P``: the learned exit gate's probability that this loop's token is the final loop's >= P;
- ``saturation:D``: the hidden state's relative change over the loop < D (no parameters);
- ``agreement:A[:SIGNAL]``: thresholds of SIGNAL (default gate when the checkpoint has gates, else
  saturation) read from the checkpoint's calibration (``recursify train-exits``) so that the
  measured agreement with the final loop on held-out data is at least A;
- ``fixed:B`` (every token runs B loops), ``none``, and ``oracle`` (simulation only: it needs every
  loop's prediction, so it never saves compute and only records where an oracle would exit).

Gate and saturation decisions read the hidden state only, so the LM head runs once per token, on
the loop where the token leaves. Every threshold may also be given per non-final loop (``T0,T1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from recursify.errors import ConfigError

if TYPE_CHECKING:
    from recursify.modeling.exit_addons import ExitAddons
    from recursify.modeling.model import RecursiveModel

EXIT_KINDS = ("none", "confidence", "ensemble", "gate", "saturation", "agreement", "fixed", "oracle")
SIGNALS = ("confidence", "ensemble", "gate", "saturation")  # what a threshold is compared with
HEAD_SIGNALS = ("confidence", "ensemble")  # need the LM head at every loop to decide
NEVER = 2.0  # a probability threshold no score reaches


@dataclass(frozen=True)
class ExitPolicy:
    """A parsed exit rule.

    Attributes:
        kind: none | confidence | ensemble | gate | saturation | fixed | oracle (``agreement``
            specs resolve to one of the signals with calibrated thresholds).
        loops: B, the model's loop count (the last loop always exits).
        thresholds: signal kinds only; one threshold per non-final loop.
        fixed_loops: fixed only; every token runs exactly this many loops (1..B).
        target: with ``agreement:A``, the agreement A the thresholds were calibrated for.
        expected: with ``agreement:A``, the calibration's measured agreement and mean loops at the
            chosen thresholds, on the held-out data the calibration used.
    """

    kind: str
    loops: int
    thresholds: tuple[float, ...] = ()
    fixed_loops: int = 0
    target: float | None = None
    expected: dict[str, float] | None = None

    @property
    def spec(self) -> str:
        if self.kind in SIGNALS:
            return f"{self.kind}:" + ",".join(f"{t:g}" for t in self.thresholds)
        if self.kind == "fixed":
            return f"fixed:{self.fixed_loops}"
        return self.kind

    def is_exit_loop(self, loop: int) -> bool:
        """Whether a token that reaches the end of ``loop`` leaves there no matter what (last or fixed loop)."""
        if self.kind == "fixed":
            return loop == self.fixed_loops - 1
        return loop == self.loops - 1

    def needs_logits(self, loop: int) -> bool:
        """Whether the exit head must run at the end of ``loop`` before the decision (one LM-head matmul per row)."""
        return self.is_exit_loop(loop) or self.kind in (*HEAD_SIGNALS, "oracle")

    @property
    def reads_hidden(self) -> bool:
        """Whether the decision reads the loop-end hidden state and the state that entered the loop (gate, saturation)."""
        return self.kind in ("gate", "saturation")

    def decide(self, loops: list[int], scores: torch.Tensor | None) -> torch.Tensor:
        """Which rows leave now: ``loops[i]`` is the loop row i just ended, ``scores`` its signal [rows] -> bool [rows]."""
        forced = torch.tensor([self.is_exit_loop(loop) for loop in loops], dtype=torch.bool)
        if self.kind not in SIGNALS:
            return forced
        assert scores is not None, f"the {self.kind} policy needs its signal"
        return forced | passes(self.kind, scores.cpu(), torch.tensor([self.threshold(loop) for loop in loops]))

    def threshold(self, loop: int) -> float:
        """The threshold at (0-based) ``loop``; the last loop has none (it always exits)."""
        return self.thresholds[loop] if loop < len(self.thresholds) else (0.0 if self.kind == "saturation" else NEVER)


def passes(kind: str, scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Whether a signal says "exit": probabilities (confidence, ensemble, gate) >= threshold, saturation's change < threshold.

    A probability threshold of 1.0 means "never" (a float softmax can round to exactly 1.0), as
    does a saturation threshold of 0. scores and thresholds broadcast -> bool.
    """
    if kind == "saturation":
        return scores < thresholds
    return scores >= thresholds.masked_fill(thresholds >= 1.0, NEVER)


def signal_scores(
    kind: str,
    model: RecursiveModel,
    loops: list[int],
    logits: torch.Tensor | None = None,
    history: list[torch.Tensor] | None = None,
    hidden: torch.Tensor | None = None,
    previous: torch.Tensor | None = None,
) -> torch.Tensor:
    """The exit signal of rows that just ended ``loops`` (0-based) -> float32 [rows].

    Args:
        logits: confidence: the rows' exit logits [rows, vocab].
        history: ensemble: the rows' exit logits [rows, vocab] at loops 0..b, all rows at loop b.
        hidden, previous: gate and saturation: the loop-end state and the state that entered the
            loop, [rows, hidden] each.
    """
    if kind == "confidence":
        assert logits is not None
        return torch.softmax(logits.float(), dim=-1).amax(dim=-1)
    if kind == "ensemble":
        assert history is not None
        return ensemble_probs(model, history).amax(dim=-1)
    assert hidden is not None and previous is not None
    if kind == "saturation":
        from recursify.modeling.exit_gates import relative_change

        return relative_change(hidden, previous)
    gates = model.addons.gates
    assert kind == "gate" and gates is not None
    scores = torch.empty(len(loops), dtype=torch.float32, device=hidden.device)
    for loop in sorted(set(loops)):  # one small matmul per loop present
        rows = torch.tensor([i for i, b in enumerate(loops) if b == loop], device=hidden.device)
        scores[rows] = gates(hidden[rows], previous[rows], loop) if loop < model.loops - 1 else 1.0
    return scores


def ensemble_probs(model: RecursiveModel, history: list[torch.Tensor]) -> torch.Tensor:
    """The exit distribution at loop b of rows whose exit logits at loops 0..b are ``history`` ([rows, vocab] each).

    The ZTW ensemble of those exits (training/exit_ensemble.py) when the model has one, else plain softmax.
    """
    from recursify.training.exit_ensemble import exit_distribution

    return exit_distribution(model, history, len(history))


def parse_exit_policy(spec: str, loops: int, addons: ExitAddons | None = None) -> ExitPolicy:
    """Parse an exit spec (see the module doc); ``addons`` are the model's gates, ensemble and calibration.

    Raises:
        ConfigError: malformed specs, thresholds out of range, or a policy the model's addons cannot
            serve (gates, an ensemble or a calibration it does not have), with what to run instead.
    """
    kind, _, arg = spec.partition(":")
    if kind not in EXIT_KINDS:
        raise ConfigError(
            f"unknown exit policy {spec!r}; use none, confidence:TAU, ensemble:TAU, gate:P, saturation:D, agreement:A, fixed:B or oracle"
        )
    if kind in ("none", "oracle"):
        if arg:
            raise ConfigError(f"exit policy {kind!r} takes no argument, got {spec!r}")
        return ExitPolicy(kind, loops)
    if kind == "fixed":
        if not arg.isdigit() or not 1 <= int(arg) <= loops:
            raise ConfigError(f"fixed:B needs 1 <= B <= {loops} (the model's loops), got {spec!r}")
        return ExitPolicy(kind, loops, fixed_loops=int(arg))
    if kind == "agreement":
        return _agreement_policy(spec, arg, loops, addons)
    _require_addon(kind, addons)
    return ExitPolicy(kind, loops, thresholds=_thresholds(kind, spec, arg, loops))


def _thresholds(kind: str, spec: str, arg: str, loops: int) -> tuple[float, ...]:
    try:
        values = [float(part) for part in arg.split(",")]
    except ValueError:
        raise ConfigError(f"{kind} thresholds must be numbers, got {spec!r} (e.g. {kind}:0.9 or {kind}:0.8,0.9)") from None
    if kind == "saturation":
        if any(not 0.0 <= t < float("inf") for t in values):
            raise ConfigError(f"saturation thresholds are relative changes >= 0, got {spec!r} (e.g. saturation:0.05)")
    elif any(not 0.0 < t <= 1.0 for t in values):
        raise ConfigError(f"{kind} thresholds must lie in (0, 1], got {spec!r}")
    if len(values) == 1:
        values *= max(loops - 1, 0)
    if len(values) != loops - 1:
        raise ConfigError(f"give one threshold or {loops - 1} (one per non-final loop), got {len(values)} in {spec!r}")
    return tuple(values)


def _require_addon(kind: str, addons: ExitAddons | None) -> None:
    if kind == "gate" and (addons is None or addons.gates is None):
        raise ConfigError("exit policy 'gate' needs exit gates: train them with 'recursify train-exits CHECKPOINT --data DATA'")
    if kind == "ensemble" and (addons is None or addons.ensemble is None):
        raise ConfigError("exit policy 'ensemble' needs exit_ensemble.safetensors: uptrain with --exit-ensemble")


def _agreement_policy(spec: str, arg: str, loops: int, addons: ExitAddons | None) -> ExitPolicy:
    value, _, signal = arg.partition(":")
    try:
        target = float(value)
    except ValueError:
        target = -1.0
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"agreement:A needs a target agreement 0 < A <= 1, got {spec!r} (e.g. agreement:0.95)")
    calibration = addons.calibration if addons is not None else None
    if calibration is None:
        raise ConfigError("agreement:A needs a calibrated checkpoint: run 'recursify train-exits CHECKPOINT --data DATA' first")
    curves: dict[str, Any] = calibration["signals"]
    if not signal:
        signal = "gate" if "gate" in curves and addons is not None and addons.gates is not None else "saturation"
    if signal not in SIGNALS:
        raise ConfigError(f"unknown signal {signal!r} in {spec!r}; choose one of: {', '.join(SIGNALS)}")
    if signal not in curves:
        raise ConfigError(f"the checkpoint's calibration has no {signal!r} curve (it has: {', '.join(curves)}); rerun train-exits")
    _require_addon(signal, addons)
    curve = curves[signal]
    index = fixed_sequence_index(curve["agreement"], target)
    threshold = curve["thresholds"][index]
    expected = {"agreement": curve["agreement"][index], "mean_loops": curve["mean_loops"][index]}
    return ExitPolicy(signal, loops, thresholds=(threshold,) * (loops - 1), target=target, expected=expected)


def fixed_sequence_index(agreements: list[float], target: float) -> int:
    """The loosest threshold of a strict-to-loose sequence whose agreement, and every stricter one's, is >= target.

    CALM's fixed-sequence testing: candidates are tested in order from the strictest (index 0,
    "never exit early", agreement 1) and the search stops at the first failure, so a threshold is
    never chosen past a candidate that misses the target even where a looser one happens to meet
    it again (agreement need not be monotone in the threshold).
    """
    index = 0
    for i, value in enumerate(agreements):
        if value < target:
            break
        index = i
    return index


def oracle_exit_loop(argmax_per_loop: list[int]) -> int:
    """The first loop whose greedy prediction already equals the final loop's (the oracle exit)."""
    final = argmax_per_loop[-1]
    return next(loop for loop, token in enumerate(argmax_per_loop) if token == final)
