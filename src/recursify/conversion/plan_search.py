"""``--plan auto``: choose loops, prelude / coda and per-linear LoRA ranks under a parameter budget.

The budget P counts non-embedding parameters plus per-depth ones (LoRA, bias residuals), as
``param_counts()["non_embedding"] + ["lora"]`` does. Every candidate sharing plan (loops B, prelude N,
coda M) has a fixed base cost (its unique layers and per-depth norms); whatever it leaves of P goes
to LoRA through the ``--lora-params`` allocation (ranks per shared layer and linear where the
whitened residual energy is largest, ``conversion/rank_budget.py``). Each plan that fits is converted
(average init, activation-aware SVD, both from one calibration pass over the original) and scored by
the KL(original || converted) on calibration tokens at initialisation; the lowest wins. On a CPU the
initialisation decides most of what healing can reach, so the plan is chosen there.

With ``vocab_shares`` (``convert --plan auto --target-total P``) the budget counts every parameter, the
input embedding and the head included, and each plan is also tried with a factorised vocabulary
(``--embed-params`` at each share of the dense vocabulary's parameters): what the vocabulary gives up
goes to unique layers and LoRA, so the search trades embedding rank against LoRA rank and loops. The
factor shapes a share gets are chosen once (by their KL on the original alone) and reused for every
plan, which keeps the search at one vocabulary fit per share.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from recursify.config import CALIB_TOKENS, LINEARS, ArchConfig, RecursionConfig
from recursify.errors import ConfigError
from recursify.modeling.layers import linear_shapes
from recursify.modeling.model import RecursiveModel
from recursify.modeling.schedule import valid_loops

PLAN_SEQ_LEN = 256  # tokens per row of the KL measurement


@dataclass(frozen=True)
class PlanSpace:
    """The plans ``--plan auto`` compares: every (loops, prelude, coda) of these that ties the layers evenly."""

    loops: tuple[int, ...] = (2, 3, 4)
    preludes: tuple[int, ...] = (0, 1, 2, 3, 4)
    codas: tuple[int, ...] = (0, 1, 2)

    def plans(self, num_layers: int) -> list[tuple[int, int, int]]:
        """(loops, prelude, coda) triples valid for a model of ``num_layers`` layers, in a stable order."""
        found = []
        for loops in self.loops:
            for prelude in self.preludes:
                for coda in self.codas:
                    if num_layers - prelude - coda >= loops and loops in valid_loops(num_layers, "cycle", prelude, coda):
                        found.append((loops, prelude, coda))
        return found


@dataclass
class PlanCandidate:
    """One compared plan.

    Attributes:
        base: non-embedding parameters of the plan without LoRA (unique layers, per-depth norms, final norm).
        lora_budget: what is left of the budget for per-depth parameters (negative: the plan does not fit).
        params: the budgeted parameters of the converted model (0 when not converted): non-embedding +
            per-depth, plus the vocabulary's when the budget is the total.
        kl: KL(original || converted) on the calibration tokens, nats per token (None when not converted).
        vocab_share: the factorised vocabulary's share of the dense one's parameters (1.0 = dense).
        vocab: parameters the vocabulary is charged (0 when the budget leaves it out).
    """

    loops: int
    prelude: int
    coda: int
    base: int
    lora_budget: int
    params: int = 0
    kl: float | None = None
    vocab_share: float = 1.0
    vocab: int = 0

    @property
    def name(self) -> str:
        plan = f"loops {self.loops}, prelude {self.prelude}, coda {self.coda}"
        if not self.vocab:
            return plan
        return plan + (f", vocabulary {self.vocab_share:g}" if self.vocab_share < 1 else ", dense vocabulary")

    @property
    def key(self) -> tuple[int, int, int, float]:
        return self.loops, self.prelude, self.coda, self.vocab_share


@dataclass
class PlanChoice:
    """The outcome: the chosen model, its candidate and every candidate, as recorded in its config.json ``report["plan"]``."""

    model: RecursiveModel
    candidates: list[PlanCandidate] = field(default_factory=list)
    reason: str = ""
    chosen: PlanCandidate | None = None

    def to_dict(self, target_params: int) -> dict[str, Any]:
        best = self.model.recursion
        chosen: dict[str, Any] = {"loops": best.loops, "prelude": best.prelude, "coda": best.coda}
        if self.chosen is not None and self.chosen.vocab:
            chosen.update(vocab_share=self.chosen.vocab_share, embed_rank=best.embed_rank, head_rank=best.head_rank)
            if best.embed_exact_rows:
                chosen["embed_exact_rows"] = best.embed_exact_rows
        return {
            "target_params": target_params,
            "counts_vocabulary": any(c.vocab for c in self.candidates),
            "chosen": chosen,
            "reason": self.reason,
            "candidates": [asdict(c) for c in self.candidates],
        }


def base_params(arch: ArchConfig, loops: int, prelude: int, coda: int, norms: str) -> tuple[int, int]:
    """(parameters of the plan without LoRA, per-depth bias residuals LoRA brings along) from a meta-device model.

    The bias residuals exist in families with q/k/v biases once depths are relaxed; they come out of
    the LoRA budget before any rank does.
    """
    plain = RecursionConfig(loops=loops, prelude=prelude, coda=coda, norms=norms)
    relaxed = RecursionConfig(loops=loops, prelude=prelude, coda=coda, norms=norms, ranks=dict.fromkeys(LINEARS, 1))
    with torch.device("meta"):
        counts = RecursiveModel(arch, plain).param_counts()
        with_rank_one = RecursiveModel(arch, relaxed)
    looped_depths = sum(slot.part == "loop" for slot in with_rank_one.schedule)
    rank_one_lora = looped_depths * sum(fan_in + fan_out for fan_in, fan_out in linear_shapes(arch).values())
    bias_residuals = int(with_rank_one.param_counts()["lora"]) - rank_one_lora
    return int(counts["non_embedding"]) + int(counts["lora"]), bias_residuals


def search_plan(
    source: str | os.PathLike[str] | Any,
    target_params: int | str,
    calib: str,
    calib_tokens: int = CALIB_TOKENS,
    space: PlanSpace | None = None,
    init: str = "average",
    lora_init: str = "asvd",
    norms: str = "per-depth",
    eval_tokens: int = 2048,
    seed: int = 0,
    progress: bool = True,
    vocab_shares: tuple[float, ...] | None = None,
    embed_init: str = "weighted",
    embed_exact_rows: int = 0,
) -> PlanChoice:
    """Convert with every plan of ``space`` that fits ``target_params`` and keep the one of lowest calibration KL.

    Args:
        source: any ``--model`` source (loaded once; one calibration pass serves every candidate).
        target_params: the budget P, e.g. "55M" (non-embedding + per-depth parameters; with
            ``vocab_shares``, every parameter).
        calib: a ``--data`` spec: its train split calibrates every candidate and scores it.
        calib_tokens: calibration tokens for the input statistics.
        space: the plans to compare (default ``PlanSpace()``).
        init, lora_init, norms: how each candidate is converted.
        eval_tokens: calibration tokens the KL is measured on (the first of the train split).
        vocab_shares: count the vocabulary in the budget and try each plan with the vocabulary at each
            of these shares of its dense parameters (1.0 = dense; below 1, ``--embed-params``).
        embed_init: how factorised vocabularies are fitted (``convert --embed-init``).
        embed_exact_rows: dense rows every factorised vocabulary keeps (``convert --embed-exact-rows``).
    """
    from recursify.conversion.convert import (
        build_model,
        calibration_for,
        convert,
        open_source,
        original_param_count,
        recursive_state_dict,
    )
    from recursify.conversion.rank_budget import parse_budget
    from recursify.conversion.weight_map import arch_from_hf, split_state_dict
    from recursify.data import load_tokens, pack
    from recursify.modeling.model import SourceInfo

    budget = parse_budget(target_params, "--target-total" if vocab_shares is not None else "--target-params")
    if not calib:
        raise ConfigError("--plan auto scores plans on calibration data: pass --calib (e.g. teacher:16k or a .txt file)")
    if vocab_shares is not None and not (vocab_shares and all(0 < share <= 1 for share in vocab_shares)):
        raise ConfigError(f"--vocab-shares must be fractions in (0, 1] of the dense vocabulary's parameters, got {list(vocab_shares)}")
    loaded = open_source(source)
    arch = arch_from_hf(loaded.hf_config)
    original = split_state_dict(loaded.hf_config, loaded.state_dict)
    info = SourceInfo(spec=loaded.spec, hf_config=loaded.hf_config.to_dict(), total_params=original_param_count(original))
    dense_vocab = original.embed.numel() + (original.lm_head.numel() if original.lm_head is not None else 0)
    candidates = []
    for share in sorted(set(vocab_shares), reverse=True) if vocab_shares else [1.0]:
        vocab = 0 if vocab_shares is None else dense_vocab if share == 1 else int(share * dense_vocab)
        for loops, prelude, coda in (space or PlanSpace()).plans(arch.num_layers):
            base, bias_residuals = base_params(arch, loops, prelude, coda, norms)
            left = budget - vocab - base  # LoRA needs room for the bias residuals first; without it the plan fits only unrelaxed
            lora_budget = left - bias_residuals if left >= bias_residuals else min(left, 0)
            candidates.append(PlanCandidate(loops, prelude, coda, base, lora_budget, vocab_share=share, vocab=vocab))
    fitting = [c for c in candidates if c.lora_budget >= 0]
    if not fitting:
        cheapest = min(candidates, key=lambda c: c.base + c.vocab)
        flag = "--target-total" if vocab_shares is not None else "--target-params"
        raise ConfigError(
            f"no plan fits {flag} {budget:,}: the smallest ({cheapest.name}) needs {cheapest.base + cheapest.vocab:,} parameters "
            "before any LoRA" + ("; try smaller --vocab-shares" if vocab_shares is not None else "")
        )
    calibration = calibration_for(original, arch, norms, info, loaded.tokenizer, calib, calib_tokens, seed, progress)
    plain = RecursionConfig(loops=1, norms=norms)
    reference = build_model(arch, plain, info, recursive_state_dict(original, arch, plain))
    tokens = load_tokens(calib, loaded.tokenizer, "train", eval_tokens, seed, reference)
    rows = pack(tokens, min(PLAN_SEQ_LEN, tokens.numel()))
    targets = _log_probs(reference, rows)
    del reference
    best: RecursiveModel | None = None
    best_candidate: PlanCandidate | None = None
    best_key = (math.inf, 0)
    vocabularies: dict[float, dict[str, Any]] = {}  # share -> the factor shapes its first conversion chose
    for candidate in tqdm(fitting, desc="plans", unit="plan", disable=not progress):
        vocabulary: dict[str, Any] = {}
        if candidate.vocab_share < 1:
            vocabulary = vocabularies.get(candidate.vocab_share) or {"embed_params": candidate.vocab}
            vocabulary["embed_exact_rows"] = embed_exact_rows
        model = convert(
            loaded, loops=candidate.loops, prelude=candidate.prelude, coda=candidate.coda, init=init, lora_init=lora_init,
            norms=norms, calib=calibration, lora_params=max(candidate.lora_budget, 0), seed=seed, progress=False,
            embed_init=embed_init, **vocabulary,
        )  # fmt: skip
        if candidate.vocab_share < 1 and candidate.vocab_share not in vocabularies:
            vocabularies[candidate.vocab_share] = {"embed_rank": model.recursion.embed_rank, "head_rank": model.recursion.head_rank}
        counts = model.param_counts()
        candidate.params = int(counts["non_embedding"]) + int(counts["lora"]) + (int(counts["embedding"]) if candidate.vocab else 0)
        candidate.kl = _kl(model, rows, targets)
        if (candidate.kl, candidate.params) < best_key:  # the lowest KL; on a tie, the smaller model
            best, best_candidate, best_key = model, candidate, (candidate.kl, candidate.params)
        del model
    assert best is not None
    ranked = sorted(fitting, key=lambda c: (c.kl if c.kl is not None else math.inf, c.params))
    reason = f"lowest calibration KL ({ranked[0].kl:.3f} nats/token) of {len(fitting)} plans within {budget:,} parameters"
    if len(ranked) > 1:
        reason += f"; next: {ranked[1].name} at {ranked[1].kl:.3f}"
    choice = PlanChoice(best, candidates, reason, best_candidate)
    best.report["plan"] = choice.to_dict(budget)
    best.recursion.calib = calib
    return choice


@torch.no_grad()
def _log_probs(model: RecursiveModel, rows: torch.Tensor, micro_batch: int = 2) -> torch.Tensor:
    """The original's log-probabilities on ``rows`` [n, seq] -> [n, seq, vocab] (float16: ranking plans needs no more)."""
    return torch.cat([torch.log_softmax(model(chunk).logits.float(), dim=-1).half() for chunk in rows.split(micro_batch)])


@torch.no_grad()
def _kl(model: RecursiveModel, rows: torch.Tensor, targets: torch.Tensor, micro_batch: int = 2) -> float:
    """Mean KL(original || model) per token over ``rows``, against the original's log-probabilities ``targets``."""
    total = 0.0
    for chunk, target in zip(rows.split(micro_batch), targets.split(micro_batch), strict=True):
        student = torch.log_softmax(model(chunk).logits.float(), dim=-1)
        teacher = target.float()
        total += float((teacher.exp() * (teacher - student)).sum())
    return total / rows.numel()


def format_plan_search(choice: PlanChoice) -> str:
    """The table of compared plans (``convert --plan auto`` prints it), the chosen one marked."""
    chosen = choice.chosen.key if choice.chosen is not None else None
    vocab = any(c.vocab for c in choice.candidates)
    lines = [f"{'plan':<48}{'base (M)':>10}{'vocab (M)' if vocab else '':>10}{'LoRA budget (M)':>17}{'params (M)':>12}{'calib KL':>10}", ""]
    for c in choice.candidates:
        mark = " <- chosen" if c.key == chosen else ""
        kl = f"{c.kl:>10.3f}" if c.kl is not None else f"{'over':>10}"
        params = f"{c.params / 1e6:>12.2f}" if c.params else f"{'-':>12}"
        vocab_column = f"{c.vocab / 1e6:>10.2f}" if vocab else f"{'':>10}"
        lines.append(f"{c.name:<48}{c.base / 1e6:>10.2f}{vocab_column}{c.lora_budget / 1e6:>17.2f}{params}{kl}{mark}")
    lines += ["", f"chosen: {choice.reason}"]
    return "\n".join(lines)
