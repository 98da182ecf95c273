"""Exit signals on held-out text, and agreement calibration: thresholds that keep exits consistent with the last loop.

``collect_exit_data`` runs the model over a token stream once (teacher forcing, windows of
``window`` tokens) and keeps, for every position and non-final loop b, what each exit rule of
serving/exit_policy.py reads there, computed by the same functions the engine calls
(``signal_scores``): the exit head's confidence, the ensemble's (with an attached ensemble), the
gate's probability (with attached gates) and the hidden state's relative change, plus the token
each exit would emit and the final loop's token.

An exit at loop b *agrees* when its token equals the final loop's at the same position (the
token-level consistency of CALM, Schuster et al. 2022). ``agreement_curve`` sweeps one threshold,
shared by all non-final loops, from strict (never exit early: agreement 1) to loose and records the
agreement and mean loops a token would run at each; ``fixed_sequence_index`` (serving/exit_policy.py)
then picks, for any target, the loosest threshold reached before the first one that misses it. The
curves are stored with the checkpoint (``exit_calibration.json``, written by ``recursify
train-exits``), so ``--exit agreement:A`` resolves any target A without the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from recursify.modeling.exit_gates import gate_features
from recursify.serving.exit_policy import SIGNALS, ensemble_probs, fixed_sequence_index, passes, signal_scores

if TYPE_CHECKING:
    from recursify.modeling.model import RecursiveModel

CANDIDATES = 200  # thresholds per curve (quantiles of the signal), plus "never exit early"


@dataclass
class ExitData:
    """Per position (rows) and non-final loop (columns) of a token stream; B = loops.

    Attributes:
        exit_tokens: [n, B] argmax of every loop's exit (the last column is the final loop's).
        scores: signal name -> [n, B - 1] its value at each non-final loop end.
        signal_tokens: signal name -> [n, B - 1] the token an exit by that signal emits (the
            ensemble's own argmax for "ensemble", the exit head's otherwise).
        features: with ``features=True``: [n, B - 1, hidden + 1] the gate's input (gate training).
    """

    exit_tokens: torch.Tensor
    scores: dict[str, torch.Tensor]
    signal_tokens: dict[str, torch.Tensor]
    features: torch.Tensor | None = None

    @property
    def positions(self) -> int:
        return int(self.exit_tokens.shape[0])

    def agrees(self, signal: str) -> torch.Tensor:
        """[n, B - 1] bool: an exit by ``signal`` at that loop emits the final loop's token."""
        return self.signal_tokens[signal] == self.exit_tokens[:, -1:]

    def per_loop_agreement(self) -> list[float]:
        """Static agreement of every loop's exit head with the final loop (the last is 1)."""
        return (self.exit_tokens == self.exit_tokens[:, -1:]).float().mean(0).tolist()


@torch.no_grad()
def collect_exit_data(
    model: RecursiveModel, tokens: torch.Tensor, window: int = 256, features: bool = False, progress: bool = False
) -> ExitData:
    """Exit signals at every position of ``tokens`` (1-D), in windows of ``window`` tokens without overlap."""
    from tqdm.auto import tqdm

    loops = model.loops
    signals = [s for s in SIGNALS if s not in ("gate", "ensemble")]
    signals += [s for s, present in (("gate", model.addons.gates), ("ensemble", model.addons.ensemble)) if present is not None]
    parts: dict[str, list[torch.Tensor]] = {"exit_tokens": [], "features": []}
    for name in signals:
        parts[f"score/{name}"], parts[f"token/{name}"] = [], []
    starts = range(0, tokens.numel(), window)
    for start in tqdm(starts, desc="exit signals", unit="window", disable=not progress):
        chunk = tokens[start : start + window][None].to(model.device)
        out = model(chunk, output_hidden_states=True, output_exits=True)  # exits through the model's own path (coda, exit heads)
        assert out.hidden_states is not None and out.exit_logits is not None
        ends = [out.hidden_states[d + 1][0] for d in model.exit_depths]  # per loop: (w, hidden), before any coda
        entering = [out.hidden_states[len(model.prelude)][0], *ends[:-1]]  # loop 0 is entered after the prelude
        logits = [z[0].float() for z in out.exit_logits]
        parts["exit_tokens"].append(torch.stack([z.argmax(-1) for z in logits], dim=1))  # (w, B)
        if features:
            parts["features"].append(torch.stack([gate_features(ends[b], entering[b]) for b in range(loops - 1)], dim=1))
        for name in signals:
            scores, emitted = [], []
            for b in range(loops - 1):
                rows, history = [b] * chunk.shape[1], logits[: b + 1]
                scores.append(signal_scores(name, model, rows, logits=logits[b], history=history, hidden=ends[b], previous=entering[b]))
                emitted.append((ensemble_probs(model, history) if name == "ensemble" else logits[b]).argmax(-1))
            parts[f"score/{name}"].append(torch.stack(scores, dim=1).float().cpu())
            parts[f"token/{name}"].append(torch.stack(emitted, dim=1).cpu())
    return ExitData(
        exit_tokens=torch.cat(parts["exit_tokens"]).cpu(),
        scores={name: torch.cat(parts[f"score/{name}"]) for name in signals},
        signal_tokens={name: torch.cat(parts[f"token/{name}"]) for name in signals},
        features=torch.cat(parts["features"]).cpu() if features else None,
    )


def exit_loops(kind: str, scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The 0-based loop each position leaves at: the first non-final loop whose signal passes, else the last.

    scores: [n, B - 1]; thresholds: [B - 1] or [candidates, B - 1] -> [n] or [candidates, n].
    """
    passed = passes(kind, scores[None] if thresholds.dim() == 2 else scores, thresholds[:, None] if thresholds.dim() == 2 else thresholds)
    final = torch.ones(*passed.shape[:-1], 1, dtype=torch.bool)
    return torch.cat([passed, final], dim=-1).int().argmax(dim=-1)  # the first True


def agreement_curve(data: ExitData, signal: str, candidates: int = CANDIDATES) -> dict[str, list[float]]:
    """Agreement and mean loops at thresholds from strict to loose (one threshold for all non-final loops).

    The first entry is "never exit early" (agreement 1, B loops); the others are quantiles of the
    signal over all non-final loops, so the curve resolves the data's own distribution.
    """
    scores, agrees = data.scores[signal], data.agrees(signal)
    loops = scores.shape[1] + 1
    probs = torch.linspace(0, 1, candidates, dtype=torch.float64)
    values = torch.quantile(scores.flatten().double(), probs).float().unique()
    if signal == "saturation":  # exit when the change is below: strict = small; the threshold just above a value lets it pass
        values = torch.nextafter(values, torch.tensor(float("inf")))
        order = torch.cat([torch.zeros(1), values])
    else:  # exit when the probability is at least: strict = large
        order = torch.cat([torch.full((1,), 1.0), values.flip(0).clamp(max=1.0 - 1e-7)])
    order = order.unique_consecutive()
    leave = exit_loops(signal, scores, order[:, None].expand(-1, loops - 1))  # (candidates, n)
    agree_all = torch.cat([agrees, torch.ones(agrees.shape[0], 1, dtype=torch.bool)], dim=1)  # (n, B): the last loop agrees
    agreed = agree_all.gather(1, leave.T.long()).T.float()  # (candidates, n)
    return {
        "thresholds": order.tolist(),
        "agreement": agreed.mean(dim=1).tolist(),
        "mean_loops": (leave.float() + 1).mean(dim=1).tolist(),
    }


def calibration_report(data: ExitData, data_info: dict[str, Any], targets: tuple[float, ...] = (0.9, 0.95, 0.99)) -> dict[str, Any]:
    """``exit_calibration.json``: a curve per signal, the data it came from, and the thresholds at a few targets."""
    curves = {signal: agreement_curve(data, signal) for signal in data.scores}
    chosen = {}
    for signal, curve in curves.items():
        picks = {}
        for target in targets:
            index = fixed_sequence_index(curve["agreement"], target)
            picks[f"{target:g}"] = {"threshold": curve["thresholds"][index], "agreement": curve["agreement"][index]}
            picks[f"{target:g}"]["mean_loops"] = curve["mean_loops"][index]
        chosen[signal] = picks
    return {
        **data_info,
        "positions": data.positions,
        "per_loop_agreement": data.per_loop_agreement(),
        "signals": curves,
        "at_targets": chosen,
    }
