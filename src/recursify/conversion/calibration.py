"""Calibration statistics: what each linear of the original model actually sees.

For every linear at every original depth we accumulate the input second-moment matrix
C = X^T X / n over calibration tokens. Data-aware conversion then measures and minimises errors
where the activations live (``||E X||_F^2 = n tr(E C E^T)``) instead of uniformly over all input
directions, as plain SVD does. Linears that read the same input (q/k/v; gate/up) share one C.

The vocabulary matrices get their own statistics (``conversion/embedding_init.py``): how often each
token occurs (the input embedding's rows), the second moment of the final normalised hidden state
(what the output head multiplies) and the mean predicted distribution (which logits matter).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from recursify.errors import ConfigError
from recursify.modeling.model import RecursiveModel

# linear -> the input it reads; one Gram matrix per (depth, input)
INPUT_OF: dict[str, str] = {
    "q": "attn_in",
    "k": "attn_in",
    "v": "attn_in",
    "o": "o_in",
    "gate": "mlp_in",
    "up": "mlp_in",
    "down": "down_in",
}
_HOOKED = {"attn_in": "q", "o_in": "o", "mlp_in": "gate", "down_in": "down"}
HEAD_KEY = (-1, "head_in")  # the final-normed hidden state the output head reads


@dataclass
class Calibration:
    """Input second moments C [in, in] and means E[x] [in] (float64) per (depth, input kind), from ``tokens`` tokens.

    For the vocabulary matrices: ``token_counts`` [vocab] (occurrences of each token in the
    calibration rows), ``head_gram`` [hidden, hidden] (E[n n^T] of the final-normed hidden state n),
    ``head_probs`` [vocab] (the original's mean predicted distribution) and ``rows`` (the
    calibration token rows themselves, for scoring candidate embeddings); absent (None) when the
    statistics were built by hand.
    """

    grams: dict[tuple[int, str], torch.Tensor]
    tokens: int
    means: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    token_counts: torch.Tensor | None = None
    head_gram: torch.Tensor | None = None
    head_probs: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    _whitenings: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def gram(self, depth: int, linear: str) -> torch.Tensor:
        return self.grams[(depth, INPUT_OF[linear])]

    def mean(self, depth: int, linear: str) -> torch.Tensor:
        """E[x] of this depth's input (what a per-depth bias can absorb: (W_d - W') E[x])."""
        return self.means[(depth, INPUT_OF[linear])]

    def whitening(self, depth: int, linear: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, S^-1) of this depth's input; computed once per input, shared by q/k/v and gate/up."""
        key = (depth, INPUT_OF[linear])
        if key not in self._whitenings:
            self._whitenings[key] = whitening(self.grams[key])
        return self._whitenings[key]


def calibrate(model: RecursiveModel, sequences: torch.Tensor, batch_size: int = 4, progress: bool = True) -> Calibration:
    """Run ``sequences`` [n, seq_len] through the original (loops=1) model, accumulating input Gram matrices.

    Each batch's products are formed in float32 (fast) and summed into float64 accumulators, so
    precision holds over many batches. Memory: one [in, in] float64 matrix per (depth, input).
    """
    if model.loops != 1:
        raise ConfigError("calibration needs the original model (loops=1): every depth must have its own layer")
    if sequences.dim() != 2 or sequences.numel() == 0:
        raise ConfigError("calibration needs a non-empty [num_sequences, seq_len] token tensor; give more --calib data")
    sums: dict[tuple[int, str], torch.Tensor] = {}
    firsts: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for depth in range(model.num_depths):
        layer = model.shared_layer(depth)
        for kind, linear in _HOOKED.items():

            def accumulate(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], key: tuple[int, str] = (depth, kind)) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                product, total = (x.T @ x).double(), x.double().sum(0)
                sums[key] = sums[key] + product if key in sums else product
                firsts[key] = firsts[key] + total if key in firsts else total

            handles.append(layer.linear(linear).register_forward_pre_hook(accumulate))

    def accumulate_head(_module: torch.nn.Module, _args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        n = output.detach().reshape(-1, output.shape[-1]).float()
        product = (n.T @ n).double()
        sums[HEAD_KEY] = sums[HEAD_KEY] + product if HEAD_KEY in sums else product

    handles.append(model.final_norm.register_forward_hook(accumulate_head))
    probs = torch.zeros(model.arch.vocab_size, dtype=torch.float64)
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(sequences), batch_size), desc="calibrating", unit="batch", disable=not progress):
                for row_logits in model(sequences[start : start + batch_size]).logits:  # one row at a time: vocab can be 262k
                    probs += torch.softmax(row_logits.float(), dim=-1).sum(0).double()
    finally:
        for handle in handles:
            handle.remove()
    count = sequences.numel()
    head_gram = sums.pop(HEAD_KEY) / count
    return Calibration(
        grams={key: total / count for key, total in sums.items()},
        tokens=count,
        means={key: total / count for key, total in firsts.items()},
        token_counts=torch.bincount(sequences.flatten(), minlength=model.arch.vocab_size).double(),
        head_gram=head_gram,
        head_probs=probs / count,
        rows=sequences,
    )


DAMPING = 1e-3  # relative to the mean input energy; float32 batch products leave ~1e-7 relative noise


def whitening(gram: torch.Tensor, damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1) with S S^T = C + damping * mean(diag C) * I, S symmetric (float64).

    Damping keeps directions the data never excites (rank-deficient C, rounding noise that
    makes tiny eigenvalues negative) invertible; eigenvalues are floored at the damping level.
    Every data-aware step uses the same damped C, so they optimise the same objective.
    """
    floor = _damping_scale(gram, damping)
    values, vectors = torch.linalg.eigh(damped(gram, damping))
    values = values.clamp_min(max(floor, torch.finfo(torch.float64).tiny))
    return (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T


def damped(gram: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """C + damping * mean(diag C) * I."""
    return gram + _damping_scale(gram, damping) * torch.eye(gram.shape[0], dtype=gram.dtype)


def _damping_scale(gram: torch.Tensor, damping: float) -> float:
    return damping * float(gram.diagonal().mean()) if gram.numel() else 0.0


def weighted_error(error: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(E C E^T): the mean squared output error of a weight error E [out, in] on the calibration inputs."""
    e = error.double()
    return float(((e @ gram) * e).sum())
