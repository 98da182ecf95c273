"""``--plan auto``: choose loops, prelude / coda and per-linear LoRA ranks under a parameter budget.

The budget P counts non-embedding parameters plus per-depth ones (LoRA, bias residuals), as
``param_counts()["non_embedding"] + ["lora"]`` does. Every candidate sharing plan (loops B, prelude N,
coda M) has a fixed base cost (its unique layers and per-depth norms); whatever it leaves of P goes
to LoRA through the ``--lora-params`` allocation (ranks per shared layer and linear where the
whitened residual energy is largest, ``conversion/rank_budget.py``). Each plan that fits is converted
(average init, activation-aware SVD, both from one calibration pass over the original) and scored by
the KL(original || converted) on calibration tokens at initialisation; the lowest wins. On a CPU the
initialisation decides most of what healing can reach, so the plan is chosen there.
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
        params: non-embedding + per-depth parameters of the converted model (0 when not converted).
        kl: KL(original || converted) on the calibration tokens, nats per token (None when not converted).
    """

    loops: int
    prelude: int
    coda: int
    base: int
    lora_budget: int
    params: int = 0
    kl: float | None = None

    @property
    def name(self) -> str:
        return f"loops {self.loops}, prelude {self.prelude}, coda {self.coda}"


@dataclass
class PlanChoice:
    """The outcome: the chosen model and every candidate, as recorded in its config.json ``report["plan"]``."""

    model: RecursiveModel
    candidates: list[PlanCandidate] = field(default_factory=list)
    reason: str = ""

    def to_dict(self, target_params: int) -> dict[str, Any]:
        best = self.model.recursion
        return {
            "target_params": target_params,
            "chosen": {"loops": best.loops, "prelude": best.prelude, "coda": best.coda},
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
) -> PlanChoice:
    """Convert with every plan of ``space`` that fits ``target_params`` and keep the one of lowest calibration KL.

    Args:
        source: any ``--model`` source (loaded once; one calibration pass serves every candidate).
        target_params: the budget P, e.g. "55M" (non-embedding + per-depth parameters).
        calib: a ``--data`` spec: its train split calibrates every candidate and scores it.
        calib_tokens: calibration tokens for the input statistics.
        space: the plans to compare (default ``PlanSpace()``).
        init, lora_init, norms: how each candidate is converted.
        eval_tokens: calibration tokens the KL is measured on (the first of the train split).
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

    budget = parse_budget(target_params)
    if not calib:
        raise ConfigError("--plan auto scores plans on calibration data: pass --calib (e.g. teacher:16k or a .txt file)")
    loaded = open_source(source)
    arch = arch_from_hf(loaded.hf_config)
    original = split_state_dict(loaded.hf_config, loaded.state_dict)
    info = SourceInfo(spec=loaded.spec, hf_config=loaded.hf_config.to_dict(), total_params=original_param_count(original))
    candidates = []
    for loops, prelude, coda in (space or PlanSpace()).plans(arch.num_layers):
        base, bias_residuals = base_params(arch, loops, prelude, coda, norms)
        left = budget - base  # LoRA needs room for the bias residuals first; without it the plan fits only unrelaxed
        lora_budget = left - bias_residuals if left >= bias_residuals else min(left, 0)
        candidates.append(PlanCandidate(loops, prelude, coda, base, lora_budget))
    fitting = [c for c in candidates if c.lora_budget >= 0]
    if not fitting:
        cheapest = min(candidates, key=lambda c: c.base)
        raise ConfigError(
            f"no plan fits --target-params {budget:,}: the smallest ({cheapest.name}) needs {cheapest.base:,} parameters before any LoRA"
        )
    calibration = calibration_for(original, arch, norms, info, loaded.tokenizer, calib, calib_tokens, seed, progress)
    plain = RecursionConfig(loops=1, norms=norms)
    reference = build_model(arch, plain, info, recursive_state_dict(original, arch, plain))
    tokens = load_tokens(calib, loaded.tokenizer, "train", eval_tokens, seed, reference)
    rows = pack(tokens, min(PLAN_SEQ_LEN, tokens.numel()))
    targets = _log_probs(reference, rows)
    del reference
    best: RecursiveModel | None = None
    best_key = (math.inf, 0)
    for candidate in tqdm(fitting, desc="plans", unit="plan", disable=not progress):
        model = convert(
            loaded, loops=candidate.loops, prelude=candidate.prelude, coda=candidate.coda, init=init, lora_init=lora_init,
            norms=norms, calib=calibration, lora_params=max(candidate.lora_budget, 0), seed=seed, progress=False,
        )  # fmt: skip
        counts = model.param_counts()
        candidate.params = int(counts["non_embedding"]) + int(counts["lora"])
        candidate.kl = _kl(model, rows, targets)
        if (candidate.kl, candidate.params) < best_key:  # the lowest KL; on a tie, the smaller model
            best, best_key = model, (candidate.kl, candidate.params)
        del model
    assert best is not None
    ranked = sorted(fitting, key=lambda c: (c.kl if c.kl is not None else math.inf, c.params))
    reason = f"lowest calibration KL ({ranked[0].kl:.3f} nats/token) of {len(fitting)} plans within {budget:,} parameters"
    if len(ranked) > 1:
        reason += f"; next: {ranked[1].name} at {ranked[1].kl:.3f}"
    choice = PlanChoice(best, candidates, reason)
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
    chosen = choice.model.recursion
    lines = [f"{'plan':<32}{'base (M)':>10}{'LoRA budget (M)':>17}{'params (M)':>12}{'calib KL':>10}", ""]
    for c in choice.candidates:
        mark = " <- chosen" if (c.loops, c.prelude, c.coda) == (chosen.loops, chosen.prelude, chosen.coda) else ""
        kl = f"{c.kl:>10.3f}" if c.kl is not None else f"{'over':>10}"
        params = f"{c.params / 1e6:>12.2f}" if c.params else f"{'-':>12}"
        lines.append(f"{c.name:<32}{c.base / 1e6:>10.2f}{c.lora_budget / 1e6:>17.2f}{params}{kl}{mark}")
    lines += ["", f"chosen: {choice.reason}"]
    return "\n".join(lines)
