"""The paper's other claims, checked at this scale: one row per claim, our numbers, holds / contradicted / inconclusive.

Run: OMP_NUM_THREADS=1 python benchmarks/paper_claims.py [--minutes 5] [--seeds 0 1] [--resume]
Writes benchmarks/results/paper_claims.json. Reuses the frontier's machinery (benchmarks/quality_frontier.py:
the same source, data, evaluation sets and measurements). Every arm is SmolLM2-135M at loops 3 (cycle,
per-depth norms, the repository's default), uptrained end to end with KD (``uptrain``, the paper's
setting) for the same ``--minutes`` CPU-minutes of training on the same data (conversion excluded),
against the teacher's cached top-64 log-probabilities; the CE-only arm trains on as many tokens as its
KD twin saw (the claim is about equal tokens). A claim "holds" when every seed orders the arms as the
paper says with a margin of at least ``--margin`` (relative), "contradicted" when every seed orders
them the other way by that margin, and "inconclusive" otherwise.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quality_frontier import TEACHER_TOP_K, Frontier
from recursify import load
from recursify.conversion.convert import convert
from recursify.files import write_json
from recursify.training.config import LossConfig, UptrainConfig
from recursify.training.uptrain import uptrain

RESULTS = Path(__file__).parent / "results" / "paper_claims.json"
LOOPS = 3

# arm -> (conversion options, training: "kd" | "ce" | "exits")
ARMS: dict[str, tuple[dict[str, Any], str]] = {
    "r0 stepwise": (dict(init="stepwise", rank=0), "kd"),
    "r0 average": (dict(init="average", rank=0), "kd"),
    "r0 lower": (dict(init="lower", rank=0), "kd"),
    "r64 stepwise": (dict(init="stepwise", rank=64, lora_init="svd"), "kd"),
    "r64 average": (dict(init="average", rank=64, lora_init="svd"), "kd"),
    "r64 lower": (dict(init="lower", rank=64, lora_init="svd"), "kd"),
    "r64 average zero-LoRA": (dict(init="average", rank=64, lora_init="zero"), "kd"),
    "r32 average": (dict(init="average", rank=32, lora_init="svd"), "kd"),
    "r128 average": (dict(init="average", rank=128, lora_init="svd"), "kd"),
    "r64 average CE-only": (dict(init="average", rank=64, lora_init="svd"), "ce"),
    "r64 average exits": (dict(init="average", rank=64, lora_init="svd"), "exits"),
    "r0 average exits": (dict(init="average", rank=0), "exits"),
}


@dataclass(frozen=True)
class Claim:
    """``better`` should beat each of ``worse`` on ``metric`` (lower is better)."""

    text: str
    better: str
    worse: tuple[str, ...]
    metric: str = "kl"  # kl | ppl | loop1_ppl


CLAIMS = (
    Claim("Stepwise is the best init for pure recursive models", "r0 stepwise", ("r0 average", "r0 lower")),
    Claim("Average is the best init for relaxed models", "r64 average", ("r64 stepwise", "r64 lower")),
    Claim("SVD-initialised LoRA beats zero-initialised LoRA", "r64 average", ("r64 average zero-LoRA",)),
    Claim("Quality improves with rank (128 over 64)", "r128 average", ("r64 average",)),
    Claim("Quality improves with rank (64 over 32)", "r64 average", ("r32 average",)),
    Claim("KD beats CE-only at equal tokens (held-out perplexity)", "r64 average", ("r64 average CE-only",), "ppl"),
    Claim("Aggressive (0.1) exit weights + self-distillation lift the first loop", "r64 average exits", ("r64 average",), "loop1_ppl"),
    Claim("... and keep the final loop's quality (KL within the margin)", "r64 average exits", ("r64 average",), "kl"),
    Claim(
        "Relaxation lowers early-exit quality (loop-1 perplexity, exit-trained)", "r0 average exits", ("r64 average exits",), "loop1_ppl"
    ),
)


def train(frontier: Frontier, arm: str, seed: int, minutes: float, tokens: int | None, work: Path) -> dict[str, Any]:
    """Convert, uptrain for ``minutes`` CPU-minutes (or exactly ``tokens`` tokens), measure per loop."""
    options, kind = ARMS[arm]
    args = frontier.args
    options = {**options, "rank": round(options["rank"] * args.rank_scale)}
    init = work / "init"
    convert(frontier.source, loops=LOOPS, seed=seed, progress=False, **options).save_pretrained(init, overwrite=True)
    exits = kind == "exits"
    loss = LossConfig(kd_weight=0.0 if kind == "ce" else 1.0, exit_loss="aggressive:0.1" if exits else "none", self_distill=exits)
    config = UptrainConfig(
        str(init), str(work / "run"), teacher=args.model, data=args.data, tokens=tokens or 10_000_000,
        cpu_minutes=None if tokens else minutes,
        seq_len=128, batch_tokens=1024, micro_batch=4, lr=5e-4, precision="fp32", save_every=0, eval_tokens=0, seed=seed, loss=loss,
        teacher_cache=0 if kind == "ce" else TEACHER_TOP_K, overwrite=True, quiet=True,
    )  # fmt: skip
    summary = uptrain(config)
    model = load(work / "run")
    result = frontier.measure_loops(model)
    return {"tokens": summary["tokens_seen"], "cpu_minutes": summary["cpu_minutes"], "tokens_per_s": summary["tokens_per_s"], **result}


def verdict(claim: Claim, arms: dict[str, list[dict[str, Any]]], margin: float) -> dict[str, Any]:
    """holds / contradicted / inconclusive from every seed's numbers."""
    seeds = [i for i in range(min(len(arms.get(a, [])) for a in (claim.better, *claim.worse)))]
    if not seeds:
        return {"claim": claim.text, "verdict": "not run"}
    ratios = []  # per seed and worse arm: better / worse (below 1: as the paper says)
    for seed in seeds:
        value = arms[claim.better][seed][claim.metric]
        ratios += [value / arms[worse][seed][claim.metric] for worse in claim.worse]
    if claim.text.startswith("..."):  # "keeps": within the margin either way
        result = "holds" if all(r <= 1 + margin for r in ratios) else "contradicted"
    elif all(r <= 1 - margin for r in ratios):
        result = "holds"
    elif all(r >= 1 + margin for r in ratios):
        result = "contradicted"
    else:
        result = "inconclusive"
    numbers = {a: [round(run[claim.metric], 4) for run in arms[a][: len(seeds)]] for a in (claim.better, *claim.worse)}
    return {"claim": claim.text, "metric": claim.metric, "verdict": result, "ratios": [round(r, 4) for r in ratios], "numbers": numbers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="teacher:64000")
    parser.add_argument("--minutes", type=float, default=5.0, help="training CPU-minutes per arm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--margin", type=float, default=0.05, help="relative difference needed for holds / contradicted")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--rank-scale", type=float, default=1.0, help="multiply every arm's rank (for models narrower than SmolLM2)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    frontier = Frontier(args)
    results: dict[str, Any] = json.loads(args.results.read_text()) if args.resume and args.results.is_file() else {"arms": {}}
    results.update(model=args.model, data=args.data, minutes=args.minutes, loops=LOOPS, margin=args.margin, date=time.strftime("%Y-%m-%d"))
    results["original_ppl"] = {k: v.value for k, v in frontier.reference.items()}
    results["torch_threads"] = torch.get_num_threads()
    order = sorted(args.arms, key=lambda a: ARMS[a][1] == "ce")  # CE-only after its KD twin: it needs the KD token count
    for seed in args.seeds:
        for arm in order:
            runs = results["arms"].setdefault(arm, [])
            if any(run["seed"] == seed for run in runs):
                continue
            tokens = None
            if ARMS[arm][1] == "ce":
                twin = next((run for run in results["arms"].get("r64 average", []) if run["seed"] == seed), None)
                if twin is None:
                    print(f"skip {arm} seed {seed}: its KD twin 'r64 average' has not run")
                    continue
                tokens = twin["tokens"]
            frontier.work.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=frontier.work) as work:
                run = {"seed": seed, **train(frontier, arm, seed, args.minutes, tokens, Path(work))}
            runs.append(run)
            runs.sort(key=lambda r: r["seed"])
            write_json(args.results, results)
            print(f"{arm} seed {seed}: KL {run['kl']:.3f}, ppl {run['ppl']:.4g}, loop-1 ppl {run['loop1_ppl']:.4g}", flush=True)
    results["claims"] = [verdict(claim, results["arms"], args.margin) for claim in CLAIMS]
    write_json(args.results, results)
    for row in results["claims"]:
        print(f"{row['verdict']:<13} {row['claim']}  {row.get('ratios', '')}")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
