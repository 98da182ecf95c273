"""Low-rank input embeddings and heads: rank vs KL at initialisation, the head's share of a decode step, short healing.

Run: OMP_NUM_THREADS=1 python benchmarks/embedding_compression.py --data TEXT [--model smollm2-135m] [--ranks 128 192 288 384]
         [--budget-ratio 0.5] [--exact-rows 0 1024 2048 4096 8192] [--decode-loops 3] [--heal-minutes 2 --kd-minutes 4]
         [--sections init exact decode heal recursive]

Writes benchmarks/results/embedding_compression.json under the model's alias (a run keeps every other model's and
section's results). Sections:

- ``init``: the original model with only its vocabulary matrices replaced, KL(original || model) in nats per token
  on the held-out split of ``--data`` (same kind as calibration) and of ``--other-data`` (another kind), at each rank:
  plain truncated SVD of the tied matrix (``--embed-init svd``), the weighted fit (``--embed-init weighted``: one tied
  pair for a tied source), and each side alone (input factorised with the head dense, and the reverse); then the
  ``--embed-params`` choice at ``--budget-ratio`` of the vocabulary parameters with every candidate's score.
- ``exact``: at ``--budget-ratio`` of the vocabulary parameters, ``--embed-params`` with ``--embed-exact-rows N`` for
  each N of ``--exact-rows`` (the most-used tokens' rows kept dense, the rank covering the rest): the layout the
  budget chose, the share of calibration and held-out tokens whose rows are exact, and KL on both held-out kinds.
- ``decode``: at ``--decode-loops`` (recursive, rank 0), one decode step (one new token per sequence, KV cache)
  and ``model.head`` alone at batch 1 and 16, dense vs factorised head (the budget's ranks, or a tied pair at each of
  ``--decode-ranks``), rounds interleaved, fastest round kept; the head's share of a step (also over the dense
  head's) and its cost in loops of the shared block.
- ``heal``: the budget model (loops 1: every layer is the original's) healed with ``recursify heal`` (local phase,
  then KD) for the given CPU-minutes with only the vocabulary factors trainable (``--freeze '*' --freeze '!embed.*'``):
  what training buys the factors alone; KL on both held-out kinds before, after the local phase and after KD.

Calibration: ``--calib-tokens`` of the train split of ``--data``; nothing held out is ever calibrated on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from recursify.conversion.calibration import Calibration, calibrate
from recursify.conversion.convert import CALIB_SEQ_LEN, convert
from recursify.data import load_tokens, pack
from recursify.files import write_json
from recursify.modeling.model import RecursiveModel
from recursify.sources import LoadedSource, load_source

if TYPE_CHECKING:
    from recursify.training.healing import HealReport

sys.path.insert(0, str(Path(__file__).parent))
from conversion_quality import license_prose  # noqa: E402  (a sibling script: the license prose it builds)

RESULTS = Path(__file__).parent / "results" / "embedding_compression.json"


class HeldOut:
    """Held-out rows and the original's log-probabilities on them (computed once)."""

    def __init__(self, name: str, rows: torch.Tensor, original: RecursiveModel):
        self.name, self.rows = name, rows
        with torch.no_grad():
            self.target = [torch.log_softmax(original(row).logits.float(), dim=-1) for row in rows.split(1)]

    def kl(self, model: RecursiveModel) -> float:
        total = 0.0
        with torch.no_grad():
            for row, target in zip(self.rows.split(1), self.target, strict=True):
                log_probs = torch.log_softmax(model(row).logits.float(), dim=-1)
                total += float((target.exp() * (target - log_probs)).sum())
        return total / self.rows.numel()


def vocabulary_params(model: RecursiveModel) -> int:
    counts = model.embedding_counts()
    return int(counts["input"] + counts["head"])


def init_section(source: LoadedSource, calibration: Calibration, heldouts: list[HeldOut], args: argparse.Namespace) -> dict[str, Any]:
    original = convert(source, loops=1, progress=False)
    dense = vocabulary_params(original)
    variants = {
        "plain svd (tied pair)": lambda r: dict(embed_rank=r, embed_init="svd"),
        "weighted": lambda r: dict(embed_rank=r),
        "input only (head dense)": lambda r: dict(embed_rank=r, head_rank="full"),
        "head only (input dense)": lambda r: dict(head_rank=r),
    }
    rows = []
    print(f"{'rank':>5} {'variant':<26} {'vocab params':>13} " + " ".join(f"{'KL ' + h.name:>16}" for h in heldouts))
    for rank in args.ranks:
        for variant, options in variants.items():
            start = time.process_time()
            model = convert(source, loops=1, calib=calibration, progress=False, **options(rank))  # type: ignore[arg-type]
            fit_s = time.process_time() - start
            kls = {h.name: h.kl(model) for h in (heldouts if variant in ("plain svd (tied pair)", "weighted") else heldouts[:1])}
            row = {"rank": rank, "variant": variant, "vocab_params": vocabulary_params(model), "ratio": vocabulary_params(model) / dense}
            row |= {"kl": kls, "fit_cpu_s": fit_s, "layout": model.embedding_counts()}
            rows.append(row)
            print(
                f"{rank:>5} {variant:<26} {row['vocab_params'] / 1e6:>12.2f}M " + " ".join(f"{kl:>16.3f}" for kl in kls.values()),
                flush=True,
            )
    budget = int(args.budget_ratio * dense)
    model = convert(source, loops=1, calib=calibration, embed_params=budget, progress=False)
    chosen = {
        "budget": budget,
        "embed_rank": model.recursion.embed_rank,
        "head_rank": model.recursion.head_rank,
        "vocab_params": vocabulary_params(model),
        "candidates": model.report["embedding_budget"],
        "kl": {h.name: h.kl(model) for h in heldouts},
    }
    print(f"--embed-params {budget / 1e6:.2f}M: ranks {chosen['embed_rank']} / {chosen['head_rank']}, KL {chosen['kl']}")
    return {"dense_vocab_params": dense, "rows": rows, "budget": chosen}


def exact_section(
    source: LoadedSource, calibration: Calibration, heldouts: list[HeldOut], dense: int, args: argparse.Namespace
) -> dict[str, Any]:
    budget = int(args.budget_ratio * dense)
    counts = calibration.token_counts
    assert counts is not None
    rows = []
    header = f"{'exact rows':>10} {'ranks':>10} {'vocab params':>13} {'calib cover':>12} "
    print(header + " ".join(f"{'KL ' + h.name:>16}" for h in heldouts))
    for exact in args.exact_rows:
        start = time.process_time()
        model = convert(source, loops=1, calib=calibration, embed_params=budget, embed_exact_rows=exact, progress=False)
        fit_s = time.process_time() - start
        ids = model.embed.exact_ids if exact else torch.empty(0, dtype=torch.long)
        row = {
            "exact_rows": exact,
            "embed_rank": model.recursion.embed_rank,
            "head_rank": model.recursion.head_rank,
            "vocab_params": vocabulary_params(model),
            "ratio": vocabulary_params(model) / dense,
            "calib_cover": float(counts[ids].sum() / counts.sum()),
            "heldout_cover": {h.name: float(torch.isin(h.rows, ids).float().mean()) for h in heldouts},
            "kl": {h.name: h.kl(model) for h in heldouts},
            "fit_cpu_s": fit_s,
        }
        rows.append(row)
        ranks = f"{row['embed_rank']}/{row['head_rank'] or 'tied'}"
        print(
            f"{exact:>10} {ranks:>10} {row['vocab_params'] / 1e6:>12.2f}M {row['calib_cover']:>12.3f} "
            + " ".join(f"{kl:>16.3f}" for kl in row["kl"].values()),
            flush=True,
        )
    return {"budget": budget, "dense_vocab_params": dense, "rows": rows}


def decode_section(
    source: LoadedSource, calibration: Calibration, factorised: list[tuple[int | str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """Side by side: a decode step and the head alone, the dense head vs each (embed rank, head rank) of ``factorised``,
    batch 1 and 16."""
    models: dict[str, tuple[RecursiveModel, dict[str, Any]]] = {
        "dense": (convert(source, loops=args.decode_loops, init="average", progress=False), {})
    }
    for embed_rank, head_rank in factorised:
        model = convert(
            source, loops=args.decode_loops, init="average", calib=calibration, embed_rank=embed_rank, head_rank=head_rank, progress=False
        )
        models[f"factorised r{embed_rank}/{head_rank or 'tied'}"] = (model, {"embed_rank": embed_rank, "head_rank": head_rank})
    results: dict[str, Any] = {"loops": args.decode_loops, "factorised": [list(pair) for pair in factorised], "rows": []}
    for batch in (1, 16):
        best: dict[str, dict[str, float]] = {name: {"step_s": float("inf"), "head_s": float("inf")} for name in models}
        for _ in range(args.rounds):
            for name, (model, _) in models.items():
                step_s, head_s = decode_costs(model, batch, args.reps)
                best[name] = {"step_s": min(best[name]["step_s"], step_s), "head_s": min(best[name]["head_s"], head_s)}
        dense_share = best["dense"]["head_s"] / best["dense"]["step_s"]
        for name, (model, ranks) in models.items():
            step, head = best[name]["step_s"], best[name]["head_s"]
            loop = (step - head) / model.loops
            row = {
                "batch": batch,
                "head": "dense" if name == "dense" else "factorised",
                **ranks,
                "step_ms": 1e3 * step,
                "head_ms": 1e3 * head,
                "head_share": head / step,
                "head_share_vs_dense": head / step / dense_share,
                "head_in_loops": head / loop,
            }
            results["rows"].append(row)
            print(
                f"batch {batch:>2} {name:<22} step {row['step_ms']:7.1f} ms  head {row['head_ms']:6.1f} ms  "
                f"share {row['head_share']:.3f} ({row['head_share_vs_dense']:.2f}x dense)  = {row['head_in_loops']:.2f} loops",
                flush=True,
            )
    return results


@torch.no_grad()
def decode_costs(model: RecursiveModel, batch: int, reps: int, prompt: int = 32) -> tuple[float, float]:
    """(fastest decode step, fastest head call) in seconds: one new token per sequence with a KV cache of ~``prompt`` tokens."""
    ids = torch.randint(3, 1000, (batch, prompt), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(batch, prompt + reps + 1)
    model(ids, cache=cache, logits_to_keep=1)
    steps, heads = [], []
    token = ids[:, -1:]
    hidden = torch.randn(batch, 1, model.arch.hidden_size, generator=torch.Generator().manual_seed(1))
    for _ in range(reps):
        start = time.perf_counter()
        model(token, cache=cache, logits_to_keep=1)
        steps.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.head(hidden)
        heads.append(time.perf_counter() - start)
    return min(steps), min(heads)


def heal_checkpoint(
    student: Path,
    out: Path,
    source_spec: str,
    args: argparse.Namespace,
    freeze: list[str] | None = None,
    minutes: float | None = None,
    kd_minutes: float | None = None,
) -> HealReport:
    """Local healing then KD of a saved checkpoint with the benchmark's budgets (every healed arm runs the same)."""
    from recursify.training import HealConfig, heal

    config = HealConfig(
        str(student),
        str(out),
        args.data,
        teacher=source_spec,
        minutes=args.heal_minutes if minutes is None else minutes,
        kd_minutes=args.kd_minutes if kd_minutes is None else kd_minutes,
        seq_len=128,
        eval_tokens=args.eval_tokens,
        precision="fp32",
        freeze=freeze or [],
        quiet=True,
    )
    return heal(config)


def heal_section(
    source_spec: str, calibration: Calibration, source: LoadedSource, heldouts: list[HeldOut], budget: int, args: argparse.Namespace
) -> dict[str, Any]:
    """The budget's factors healed with every layer frozen (at loops 1 the layers are the original's, exactly): the local
    phase fits the embedding's output and the head's logits to the original's, then KD trains the factors end to end."""
    model = convert(source, loops=1, calib=calibration, embed_params=budget, progress=False)
    freeze = ["*", "!embed.*"] + (["!lm_head.*"] if model.lm_head is not None else [])
    stages: dict[str, dict[str, float]] = {"init": {h.name: h.kl(model) for h in heldouts}}
    with tempfile.TemporaryDirectory() as work:
        init, local, healed = (Path(work) / name for name in ("init", "local", "healed"))
        model.save_pretrained(init)
        local_report = heal_checkpoint(init, local, source_spec, args, freeze, kd_minutes=0.0)
        stages["local"] = {h.name: h.kl(RecursiveModel.from_pretrained(local)) for h in heldouts}
        kd_report = heal_checkpoint(local, healed, source_spec, args, freeze, minutes=0.0)
        stages["local + KD"] = {h.name: h.kl(RecursiveModel.from_pretrained(healed)) for h in heldouts}
    result = {
        "minutes": args.heal_minutes,
        "kd_minutes": args.kd_minutes,
        "freeze": freeze,
        "embed_rank": model.recursion.embed_rank,
        "head_rank": model.recursion.head_rank,
        "vocab_params": vocabulary_params(model),
        "local_steps": local_report.local_steps,
        "kd_tokens": (kd_report.kd or {}).get("tokens_seen"),
        "kl": stages,
    }
    for stage, kls in stages.items():
        print(f"heal (vocabulary only) {stage:<10} " + " ".join(f"KL {name} {kl:.3f}" for name, kl in kls.items()), flush=True)
    return result


def recursive_section(source_spec: str, calibration: Calibration, source: LoadedSource, args: argparse.Namespace) -> dict[str, Any]:
    """Two recursive models at equal healing CPU-minutes: the dense embedding at the first ratio of the original's
    parameters, a factorised one (``--embed-params`` filling the second ratio) with the same loops and LoRA budget."""
    common = dict(loops=args.recursive_loops, init="average", lora_init="asvd", lora_params=args.recursive_lora_params)
    dense = convert(source, calib=calibration, progress=False, **common)  # type: ignore[arg-type]
    total = dense.param_counts()["source_total"]
    vocabulary = vocabulary_params(dense)
    embed_params = int(args.recursive_ratios[1] * total - (dense.param_counts()["total"] - vocabulary))
    arms = {"dense embedding": dense, "factorised": convert(source, calib=calibration, embed_params=embed_params, progress=False, **common)}  # type: ignore[arg-type]
    healing = {"heal_minutes": args.heal_minutes, "kd_minutes": args.kd_minutes, "eval_tokens": args.eval_tokens}
    results: dict[str, Any] = {"options": {**common, "embed_params": embed_params, **healing}, "arms": {}}
    with tempfile.TemporaryDirectory() as work:
        for name, model in arms.items():
            student = Path(work) / name.replace(" ", "-")
            model.save_pretrained(student)
            report = heal_checkpoint(student, Path(str(student) + "-healed"), source_spec, args)
            counts = model.param_counts()
            results["arms"][name] = {
                "ratio": counts["ratio"],
                "total": counts["total"],
                "embedding": counts["embedding"],
                "embed_rank": model.recursion.embed_rank,
                "head_rank": model.recursion.head_rank,
                "before": report.eval_before,
                "after_local": report.eval_local,
                "after": report.eval_after,
            }
            print(
                f"{name:<16} {counts['ratio']:.3f}x: KL {report.eval_before.get('kl', float('nan')):.2f} -> "
                f"{report.eval_after.get('kl', float('nan')):.2f}, ppl {report.eval_before.get('ppl', float('nan')):.1f} -> "
                f"{report.eval_after.get('ppl', float('nan')):.1f}",
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--data", required=True, help="calibration (train split) and held-out text of the same kind, e.g. the Debian Reference"
    )
    parser.add_argument("--other-data", default=None, help="held-out text of another kind (default: the license prose)")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--ranks", type=int, nargs="+", default=[128, 192, 288, 384])
    parser.add_argument("--budget-ratio", type=float, default=0.5, help="--embed-params as a share of the dense vocabulary parameters")
    parser.add_argument(
        "--exact-rows", type=int, nargs="+", default=[0, 1024, 2048, 4096, 8192], help="--embed-exact-rows values of the exact section"
    )
    parser.add_argument("--decode-loops", type=int, default=3)
    parser.add_argument(
        "--decode-ranks", type=int, nargs="*", default=[], help="tied ranks the decode section times (default: the budget's choice)"
    )
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--heal-minutes", type=float, default=2.0)
    parser.add_argument("--kd-minutes", type=float, default=4.0)
    parser.add_argument("--recursive-loops", type=int, default=3)
    parser.add_argument("--recursive-lora-params", default="3.5M")
    parser.add_argument(
        "--recursive-ratios", type=float, nargs=2, default=[0.5, 0.35], help="total/original: dense embedding arm, factorised arm"
    )
    sections = ["init", "exact", "decode", "heal", "recursive"]
    parser.add_argument("--sections", nargs="+", default=["init", "decode", "heal"], choices=sections)
    args = parser.parse_args()
    args.other_data = args.other_data or str(license_prose())

    source = load_source(args.model)
    original = convert(source, loops=1, progress=False)
    start = time.process_time()
    rows = pack(load_tokens(args.data, source.tokenizer, "train", args.calib_tokens), CALIB_SEQ_LEN)
    calibration = calibrate(original, rows, progress=False)
    print(f"calibration: {calibration.tokens} tokens, {time.process_time() - start:.0f} CPU-s", flush=True)
    heldouts = [
        HeldOut(name, pack(load_tokens(spec, source.tokenizer, "heldout", args.eval_tokens), CALIB_SEQ_LEN), original)
        for name, spec in (("same kind", args.data), ("other kind", args.other_data))
    ]
    entry: dict[str, Any] = {}
    entry.update(
        data=args.data,
        other_data=args.other_data,
        calib_tokens=calibration.tokens,
        eval_tokens={h.name: h.rows.numel() for h in heldouts},
        torch_threads=torch.get_num_threads(),
        source_total_params=original.param_counts()["total"],
    )

    def save() -> None:  # re-read first: runs for other models or sections may have written since
        everything = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        everything.setdefault(args.model, {}).update(entry)
        write_json(RESULTS, everything)

    dense = vocabulary_params(original)
    if "init" in args.sections:
        entry["init"] = init_section(source, calibration, heldouts, args)
        save()
    if "exact" in args.sections:
        entry["exact"] = exact_section(source, calibration, heldouts, dense, args)
        save()
    saved = json.loads(RESULTS.read_text()).get(args.model, {}) if RESULTS.is_file() else {}
    budget = (entry.get("init") or saved.get("init") or {}).get("budget") or {
        "embed_rank": 256,
        "head_rank": None,
        "budget": int(args.budget_ratio * dense),
    }
    if "decode" in args.sections:
        factorised = [(rank, None) for rank in args.decode_ranks] or [(budget["embed_rank"], budget["head_rank"])]
        entry["decode"] = decode_section(source, calibration, factorised, args)
        save()
    if "heal" in args.sections:
        entry["heal"] = heal_section(args.model, calibration, source, heldouts, budget["budget"], args)
        save()
    if "recursive" in args.sections:
        entry["recursive"] = recursive_section(args.model, calibration, source, args)
        save()


if __name__ == "__main__":
    main()
