"""Low-rank factors of the input embedding and the output head, fitted where the data lives.

Both sides are W [vocab, hidden] ~= table @ basis (``modeling/embedding.py``), but they fail in
different ways, so each gets its own criterion; all are one closed form (``weighted_low_rank``):
min over rank-r X of ||D (W - X) M||_F^2 with D diagonal (row weights) and M invertible (column
whitening) is solved by X = D^-1 [D W M]_r M^-1 (truncated SVD in the weighted space).

- Input embedding: an error in row v costs once per occurrence of token v, so rows are weighted
  by sqrt(count_v + 1/2) (calibration token counts, add-1/2 smoothing so unseen tokens keep a
  little weight), and relative to the row's norm, since every depth reads the residual stream
  through an RMSNorm: D = diag(sqrt(count + 1/2) / ||E_v||) (rescaled), M = I. Plain SVD (D = I)
  spends its rank on the tens of thousands of rare rows instead.
- Output head: its error shows in the logits W n of the final-normed hidden states n, and in a
  logit error d the KL to the original grows like 1/2 d^T (diag(p) - p p^T) d, so logits of likely
  tokens matter most. The head's criterion is E sum_v p_v (W_v n - X_v n)^2 ~= ||D (W - X) S||^2
  with S S^T = E[n n^T] (activation-aware, as ``--lora-init asvd``) and D = diag(sqrt(N p_v +
  1/2)) from the original's mean predicted distribution p over the N calibration tokens.
- A tied source kept tied (one pair of factors serves both sides): with a common row weight D
  the sum of both relative criteria, ||D (W - X)||^2 / ||D W||^2 + ||D (W - X) S||^2 / ||D W S||^2,
  is again the closed form, with M M^T = I / ||D W||^2 + E[n n^T] / ||D W S||^2; D averages the
  two sides' counts.

Tied or untied: a tied pair costs rank * (vocab + hidden) once and serves both sides; untied factors
cost that per side, so at equal parameters each side gets about half the rank. Which wins depends
on the model and the budget (each side's error falls with its own rank at its own pace), so the
budget decides by measurement rather than by rule:
``--embed-params N`` spends N parameters on input + head: it scores a few candidate layouts
(one tied pair, or untied factors with the rank split several ways) by the KL of the original
model, with only its embedding and head replaced, on calibration tokens, and keeps the best.

Exact rows (``--embed-exact-rows N``): the factors are fitted as above, then the N tokens with the
largest row weight on that side (the tied pair: the mean of both sides' squared weights) keep their
original rows, which replace the product's. A token's weight is its expected number of occurrences
(input) or predictions (head), so on Zipfian text a few thousand rows cover nearly all of both;
the budget's candidates reserve N * hidden parameters per factorised side for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from recursify.config import ArchConfig, RecursionConfig
from recursify.conversion.calibration import Calibration, whitening
from recursify.errors import ConfigError
from recursify.modeling.embedding import EmbeddingLayout

SMOOTHING = 0.5  # add-1/2: a token never seen in calibration keeps weight sqrt(1/2)
BUDGET_SPLITS = (0.25, 0.5, 0.75)  # input share of the rank when --embed-params tries untied factors
SCORE_TOKENS = 2048  # calibration tokens the budget's candidates are scored on


@dataclass
class LowRankFit:
    """The weighted problem solved once; factors at any rank are then a slice (see ``weighted_low_rank``).

    Attributes:
        scaled: D W M [vocab, hidden] (float64).
        row_weights: diag(D) [vocab].
        inverse_columns: M^-1 [hidden, hidden].
        values, vectors: eigenpairs of (D W M)^T (D W M), largest first.
    """

    scaled: torch.Tensor
    row_weights: torch.Tensor
    inverse_columns: torch.Tensor
    values: torch.Tensor
    vectors: torch.Tensor

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(table [vocab, rank], basis [rank, hidden]), float32, minimising the weighted error at ``rank``.

        The product is unique, the split is not (table G, G^-1 basis for any invertible G), and the
        split decides how training moves the factors: AdamW steps every entry by about the learning
        rate whatever its scale. The solution's own split, table = D W M V_r / D and basis =
        V_r^T M^-1, carries M's scale, and the tied fit's M is ~1 / ||D W|| (``tied_fit``), which
        shrinks as the calibration tokens grow: SmolLM2's table came out at RMS 5e-4, so the first
        full step of ``recursify heal`` at lr 5e-4 rewrote it (head KL 0.7 -> 11.7 nats). The basis
        is therefore returned with orthonormal rows (a QR frame of the product's row space) and the
        table holds each row's coordinates in it: a table row has the norm of its product row, so
        the table stays at the original matrix's scale (entry RMS about sqrt(hidden / rank) times its).
        """
        right = self.vectors[:, :rank].T  # (rank, hidden): top right singular vectors of D W M
        table = (self.scaled @ right.T) / self.row_weights[:, None]
        frame, triangle = torch.linalg.qr((right @ self.inverse_columns).T)  # basis^T = frame [hidden, rank] @ triangle [rank, rank]
        return (table @ triangle.T).float().contiguous(), frame.T.float().contiguous()

    def relative_error(self, rank: int) -> float:
        """||D (W - X_r) M||^2 / ||D W M||^2: the share of weighted energy the rank leaves out."""
        total = float(self.values.sum())
        return float(self.values[rank:].sum()) / total if total > 0 else 0.0


def weighted_low_rank(matrix: torch.Tensor, row_weights: torch.Tensor | None = None, column_gram: torch.Tensor | None = None) -> LowRankFit:
    """Solve min_{rank X <= r} ||D (W - X) M||_F^2 for every r at once, D = diag(row_weights), M M^T = column_gram.

    The optimum is X = D^-1 [D W M]_r M^-1: substituting Y = D X M turns the problem into plain
    Eckart-Young on D W M. ``column_gram`` is damped like every other whitening in recursify
    (``calibration.whitening``), so directions it never excites stay invertible. Vocabularies are
    far taller than wide, so the SVD comes from the [hidden, hidden] Gram matrix.
    """
    w = matrix.double()
    rows = torch.ones(w.shape[0], dtype=torch.float64) if row_weights is None else row_weights.double()
    if bool((rows <= 0).any()):
        raise ConfigError("row weights of a low-rank fit must be positive")
    if column_gram is None:
        columns = inverse = torch.eye(w.shape[1], dtype=torch.float64)
    else:
        columns, inverse = whitening(column_gram.double())
    scaled = rows[:, None] * (w @ columns)
    values, vectors = torch.linalg.eigh(scaled.T @ scaled)
    return LowRankFit(scaled, rows, inverse, values.flip(0).clamp_min(0.0), vectors.flip(-1))


def input_weights(calibration: Calibration, embed: torch.Tensor) -> torch.Tensor:
    """sqrt(count + 1/2) * rms / ||E_v|| per token: how much an error in each input row costs on the calibration stream.

    The first thing every depth does with the residual stream is an RMSNorm, so a row's error
    counts relative to the row's own norm (rms = the root-mean-square row norm keeps the weights'
    scale that of the counts).
    """
    norms = embed.double().norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    relative = norms.square().mean().sqrt() / norms
    return (_require(calibration.token_counts, "token counts") + SMOOTHING).sqrt() * relative


def head_weights(calibration: Calibration) -> torch.Tensor:
    """sqrt(N p_v + 1/2) per token: the original's expected count of v as a prediction (the KL's weight on logit v)."""
    probs = _require(calibration.head_probs, "mean predicted probabilities")
    return (probs * calibration.tokens + SMOOTHING).sqrt()


def _require(value: torch.Tensor | None, what: str) -> torch.Tensor:
    if value is None:
        raise ConfigError(f"these calibration statistics lack {what}; compute them with conversion.calibration.calibrate")
    return value


def input_fit(embed: torch.Tensor, calibration: Calibration | None) -> LowRankFit:
    """The input embedding's problem: frequency-weighted rows; plain SVD without calibration."""
    return weighted_low_rank(embed) if calibration is None else weighted_low_rank(embed, input_weights(calibration, embed))


def head_fit(weight: torch.Tensor, calibration: Calibration | None) -> LowRankFit:
    """The output head's problem: logit error on calibration hidden states, weighted by predicted probability."""
    if calibration is None:
        return weighted_low_rank(weight)
    return weighted_low_rank(weight, head_weights(calibration), _require(calibration.head_gram, "the head's second moment"))


def tied_fit(weight: torch.Tensor, calibration: Calibration | None) -> LowRankFit:
    """One pair of factors for both sides: the sum of the two relative criteria (see the module doc)."""
    if calibration is None:
        return weighted_low_rank(weight)
    rows = ((input_weights(calibration, weight).square() + head_weights(calibration).square()) / 2).sqrt()
    gram = _require(calibration.head_gram, "the head's second moment").double()
    weighted = rows[:, None] * weight.double()
    identity = torch.eye(gram.shape[0], dtype=torch.float64)
    columns = identity / float(weighted.square().sum()) + gram / float(((weighted @ gram) * weighted).sum())
    return weighted_low_rank(weight, rows, columns)


def vocabulary_state(
    embed: torch.Tensor,
    lm_head: torch.Tensor | None,
    layout: EmbeddingLayout,
    calibration: Calibration | None,
    report: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The state-dict entries of the input embedding and head for ``layout``.

    ``embed`` / ``lm_head`` are the original's matrices (``lm_head`` None when the source ties
    them). Dense sides keep the original tensors unchanged (exact). With ``report``, each fitted
    side's relative weighted error is recorded under "embedding_error".
    """
    head_matrix = embed if lm_head is None else lm_head
    state: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    if layout.input_rank is None:
        state["embed.weight"] = embed
    else:
        fit = tied_fit(embed, calibration) if layout.head == "input" else input_fit(embed, calibration)
        state["embed.table"], state["embed.basis"] = fit.factors(layout.input_rank)
        errors["tied" if layout.head == "input" else "input"] = fit.relative_error(layout.input_rank)
        if layout.exact_rows:
            state |= _exact_rows("embed", embed, fit.row_weights, layout.exact_rows)
    if layout.head == "dense":
        state["lm_head.weight"] = head_matrix
    elif layout.head == "factorized":
        assert layout.head_rank is not None
        fit = head_fit(head_matrix, calibration)
        state["lm_head.table"], state["lm_head.basis"] = fit.factors(layout.head_rank)
        errors["head"] = fit.relative_error(layout.head_rank)
        if layout.exact_rows:
            state |= _exact_rows("lm_head", head_matrix, fit.row_weights, layout.exact_rows)
    if report is not None and errors:
        report["embedding_error"] = errors
    return state


def _exact_rows(prefix: str, matrix: torch.Tensor, row_weights: torch.Tensor, count: int) -> dict[str, torch.Tensor]:
    """The ``count`` heaviest rows of ``matrix`` (ties to the lower id), kept exact, in ascending token order."""
    order = torch.sort(row_weights.double(), descending=True, stable=True).indices[:count]
    ids = order.sort().values
    return {f"{prefix}.exact_ids": ids, f"{prefix}.exact_rows": matrix[ids].clone()}


def check_embedding_options(recursion: RecursionConfig, calibration_given: bool) -> None:
    """Refuse option combinations before any weights load."""
    if recursion.embed_params and (recursion.embed_rank != "full" or recursion.head_rank is not None):
        raise ConfigError("--embed-params chooses the embedding and head ranks itself: drop --embed-rank / --head-rank")
    wants_fit = recursion.embed_params > 0 or recursion.embed_factorized
    if wants_fit and recursion.embed_init == "weighted" and not calibration_given:
        raise ConfigError(
            "a low-rank embedding or head is fitted on calibration data (token frequencies, final hidden states): "
            "pass --calib (e.g. teacher:16k or a .txt file), or --embed-init svd for plain truncated SVD (far worse)"
        )
    if recursion.embed_exact_rows and recursion.embed_init != "weighted":
        raise ConfigError("--embed-exact-rows keeps the rows calibration uses most: it needs --embed-init weighted and --calib")


def budget_candidates(arch: ArchConfig, budget: int, exact_rows: int = 0) -> list[tuple[int | str, int | str | None]]:
    """(embed_rank, head_rank) pairs that spend at most ``budget`` parameters on input + head.

    A tied source may keep one pair of factors (rank budget / (vocab + hidden)); any source may
    give the head its own factors, with the rank split between the sides in ``BUDGET_SPLITS``.
    ``exact_rows`` dense rows per factorised side come out of the budget first.
    """
    per_rank = arch.vocab_size + arch.hidden_size
    rows = exact_rows * arch.hidden_size
    candidates: list[tuple[int | str, int | str | None]] = []
    if arch.tie_word_embeddings and budget - rows >= per_rank:
        candidates.append((min((budget - rows) // per_rank, arch.hidden_size), None))
    total = min(max(budget - 2 * rows, 0) // per_rank, 2 * arch.hidden_size)
    for share in BUDGET_SPLITS:
        input_rank = min(max(round(total * share), 1), arch.hidden_size)
        head_rank = min(total - input_rank, arch.hidden_size)
        if head_rank >= 1 and (input_rank, head_rank) not in candidates:
            candidates.append((input_rank, head_rank))
    if not candidates:
        sides = 1 if arch.tie_word_embeddings else 2
        raise ConfigError(
            f"--embed-params {budget} is below the smallest low-rank embedding + head: "
            f"{sides * (per_rank + rows)} parameters (rank 1 = vocab + hidden{', plus the exact rows' if rows else ''})"
        )
    return candidates
