"""Conversion quality at initialisation: plain SVD vs activation-aware SVD (asvd) vs asvd + lsq, and norm handling.

Run: python benchmarks/conversion_quality.py [--data SPEC] [--loops 2 3] [--rank 64] [--heal-minutes 8] [--skip-init]
Prints a table and writes benchmarks/results/conversion_quality.json: one row per (loops, variant, rank,
trained=False) with held-out perplexity and KL(original || converted) in nats/token. Calibration uses the
data's "train" split; evaluation its "heldout" split, which calibration never sees. All variants of one
loop count have the same rank, hence equal non-embedding and LoRA parameter counts. Without --data, the
human-written license texts every Debian system ships (/usr/share/common-licenses) are gathered into
one .txt file in the cache (~60k tokens of legal prose).

With ``--heal-minutes M`` it also measures the healing curve at equal CPU time from one initialisation
(loops ``--heal-loops``, average, asvd r``--rank`` calibrated, per-depth norms): end-to-end KD alone for M
CPU-minutes vs local block-wise healing for ``--local-share`` of M followed by KD for the rest (both by
``recursify.training.heal``, on the data's train split), with held-out KL / perplexity along the way (the
runs' own evaluations, rows of ``--heal-seq-len``) and at the end (this script's sliding windows, like
the rows above). Results go under "healing", keyed by loops; a run keeps every result of the existing JSON it does not redo.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from recursify import load
from recursify.conversion.calibration import calibrate
from recursify.conversion.convert import CALIB_SEQ_LEN, convert
from recursify.data import load_tokens, pack
from recursify.evaluation.perplexity import evaluate_perplexity
from recursify.sources import cache_root, load_source
from recursify.training import HealConfig, heal
from recursify.training.metrics import read_metrics

RESULTS = Path(__file__).parent / "results" / "conversion_quality.json"
VARIANTS = {
    "svd, tied norms (paper)": dict(lora_init="svd", norms="tied"),
    "svd": dict(lora_init="svd"),
    "asvd": dict(lora_init="asvd"),
    "asvd+lsq": dict(lora_init="asvd", shared_init="lsq"),
}
NORM_ROWS = ("tied", "per-depth", "fold")
# --relax-rows: the relaxation variants at about 0.9M trainable per-depth parameters on SmolLM2 loops 3
# (bias is fixed at 0.16M; LoRA r64, 19.5M, and lora-xs r128 for reference), average init, calibrated.
RELAX_VARIANTS: dict[str, dict[str, object]] = {
    "rank 0 (pure recursive)": dict(rank=0),
    "bias (lsq init)": dict(rank=0, relax="bias"),
    "prefix:64": dict(rank=0, relax="prefix:64"),
    "lora r3, asvd": dict(rank=3, lora_init="asvd"),
    "lora-xs r64, asvd": dict(rank=64, relax="lora-xs", lora_init="asvd"),
    "lora-xs r128, asvd": dict(rank=128, relax="lora-xs", lora_init="asvd"),
    "lora r64, asvd": dict(rank=64, lora_init="asvd"),
}


def license_prose(root: Path = Path("/usr/share/common-licenses")) -> Path:
    """One .txt of the distinct license texts under ``root`` (paragraphs kept), written once into the cache."""
    target = cache_root() / "data" / "common-licenses.txt"
    if not target.is_file():
        files = sorted({path.resolve() for path in root.iterdir() if path.is_file()})
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_suffix(".part")
        staging.write_text("\n\n".join(path.read_text(errors="replace") for path in files))
        staging.replace(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=None, help="any --data spec: train split calibrates, heldout evaluates (default: license prose)")
    parser.add_argument("--loops", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--init", default="average")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--relax-rows", action="store_true", help="also the --relax variants (RELAX_VARIANTS) under 'relax_rows'")
    parser.add_argument("--relax-loops", type=int, default=3)
    parser.add_argument("--heal-minutes", type=float, default=0.0, help="CPU-minutes per healing arm (0 = no healing curve)")
    parser.add_argument("--heal-loops", type=int, default=3)
    parser.add_argument("--local-share", type=float, default=0.3, help="share of the budget spent on local healing")
    parser.add_argument("--heal-seq-len", type=int, default=128)
    parser.add_argument("--heal-init", help="heal this checkpoint (made by the same recipe) instead of converting")
    parser.add_argument("--kd-eval-every", type=int, default=10, help="KD steps between curve points")
    parser.add_argument("--skip-init", action="store_true", help="skip the init rows (the JSON keeps every result a run does not redo)")
    args = parser.parse_args()

    args.data = args.data or str(license_prose())
    source = load_source(args.model)
    original = convert(source, loops=1, progress=False)
    heldout = load_tokens(args.data, source.tokenizer, split="heldout", max_tokens=args.eval_tokens)
    calib_tokens = load_tokens(args.data, source.tokenizer, split="train", max_tokens=args.calib_tokens)
    start = time.perf_counter()
    calibration = calibrate(original, pack(calib_tokens, min(CALIB_SEQ_LEN, len(calib_tokens))))
    calib_s = time.perf_counter() - start
    reference = evaluate_perplexity(original, heldout, ctx=args.ctx, progress=False)
    print(f"original: held-out perplexity {reference.value:.2f} on {reference.tokens} tokens; calibration {calib_s:.0f} s")

    rows = []

    def measure(loops: int, variant: str, rank: int | str, **options: object) -> dict[str, object]:
        begin = time.perf_counter()
        model = convert(source, loops=loops, init=args.init, rank=rank, calib=calibration, progress=False, **options)  # type: ignore[arg-type]
        convert_s = time.perf_counter() - begin
        result = evaluate_perplexity(model, heldout, ctx=args.ctx, teacher=original, progress=False)
        assert result.per_loop is not None
        row = {
            "loops": loops,
            "variant": variant,
            "rank": rank,
            "trained": False,
            "ppl": result.value,
            "kl": result.per_loop[-1].kl_teacher,
            "non_embedding": model.param_counts()["non_embedding"],
            "lora": model.param_counts()["lora"],
            "frozen": model.param_counts()["frozen"],
            "convert_s": convert_s,
        }
        rows.append(row)
        print(f"{loops:>5} {variant:<26} {rank!s:>5} {row['kl']:>10.3f} {row['ppl']:>14.4g} {convert_s:>9.1f}")
        return row

    report: dict[str, Any] = {}
    if not args.skip_init:
        print(f"{'loops':>5} {'variant':<26} {'rank':>5} {'KL nats':>10} {'perplexity':>14} {'convert s':>9}")
        by_key = {}
        for loops in args.loops:
            for variant, options in VARIANTS.items():
                by_key[(loops, variant)] = measure(loops, variant, args.rank, **options)
        for norms in NORM_ROWS:  # how much of the error at init comes from the norms alone
            measure(args.loops[0], f"full rank, {norms} norms", "full", norms=norms)
        gap_loops = 3 if 3 in args.loops else args.loops[-1]
        gap_closed = 1 - float(by_key[(gap_loops, "asvd")]["kl"]) / float(by_key[(gap_loops, "svd")]["kl"])  # type: ignore[arg-type]
        print(f"KL gap closed by asvd at rank {args.rank}, loops {gap_loops}: {gap_closed:.3f}")
        report[f"kl_gap_closed_asvd_r{args.rank}_loops{gap_loops}"] = gap_closed
        report["rows"] = rows
    report.update(
        model=args.model,
        data=args.data,
        init=args.init,
        original_ppl=reference.value,
        eval_tokens=reference.tokens,
        calib_tokens=calibration.tokens,
        calibration_s=calib_s,
        torch_threads=torch.get_num_threads(),
        date=time.strftime("%Y-%m-%d"),
    )
    if args.heal_minutes > 0:
        curve = healing_curve(args, source, calibration, original, heldout)
        report["healing"] = {str(curve["loops"]): curve}
    if args.relax_rows:  # trainable per-depth parameters ("lora") vs fixed ones ("frozen") in each row
        report["relax_rows"] = [measure(args.relax_loops, name, **options) for name, options in RELAX_VARIANTS.items()]
    if RESULTS.is_file():  # keep what this run did not measure (read now: another run may have added some)
        previous = json.loads(RESULTS.read_text())
        report = {**previous, **report, "healing": {**previous.get("healing", {}), **report.get("healing", {})}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS}")


def healing_curve(args: argparse.Namespace, source: Any, calibration: Any, original: Any, heldout: torch.Tensor) -> dict[str, Any]:
    """KD alone vs local healing + KD from one initialisation, at equal CPU-minutes (see the module doc)."""
    model = (
        load(args.heal_init)
        if args.heal_init
        else convert(source, loops=args.heal_loops, init="average", rank=args.rank, lora_init="asvd", calib=calibration, progress=False)
    )
    arms = {"kd": (0.0, args.heal_minutes), "local+kd": (args.local_share * args.heal_minutes, (1 - args.local_share) * args.heal_minutes)}
    result: dict[str, Any] = {"loops": model.loops, "rank": args.rank, "init": "average, asvd, per-depth norms", "arms": {}}
    with tempfile.TemporaryDirectory() as work:
        model.save_pretrained(f"{work}/init")
        for arm, (minutes, kd_minutes) in arms.items():
            out = f"{work}/{arm}"
            config = HealConfig(
                f"{work}/init", out, args.data, teacher=args.model, calib_tokens=args.calib_tokens, minutes=minutes, kd_minutes=kd_minutes,
                seq_len=args.heal_seq_len, eval_tokens=args.eval_tokens, eval_every_minutes=2.0, kd_eval_every=args.kd_eval_every,
            )  # fmt: skip
            healed = heal(config)
            final = evaluate_perplexity(load(out), heldout, ctx=args.ctx, teacher=original, progress=False)  # type: ignore[arg-type]
            assert final.per_loop is not None
            local_s = healed.local_cpu_minutes * 60
            curve = [(r["cpu_s"], r["kl"], r["ppl"]) for r in read_metrics(Path(out) / "heal.jsonl") if r["event"] == "eval" and "kl" in r]
            kd_evals = [r for r in read_metrics(Path(out) / "metrics.jsonl") if r["event"] == "eval"][1:] if healed.kd else []
            curve += [(local_s + r["cpu_s"], r["kl"], r["ppl"]) for r in kd_evals]
            kd_minutes_used = healed.kd["cpu_minutes"] if healed.kd else 0.0
            result["arms"][arm] = {
                "local_minutes": healed.local_cpu_minutes,
                "capture_minutes": healed.capture_cpu_minutes,
                "kd_minutes": kd_minutes_used,
                "cpu_minutes": healed.local_cpu_minutes + kd_minutes_used,
                "local_steps": healed.local_steps,
                "kd_tokens": healed.kd["tokens_seen"] if healed.kd else 0,
                "objective_before": healed.objective_before,
                "objective_after_local": healed.objective_after,
                "kl": final.per_loop[-1].kl_teacher,
                "ppl": final.value,
                "curve": [{"cpu_minutes": s / 60, "kl": kl, "ppl": ppl} for s, kl, ppl in sorted(curve)],
            }
            row = result["arms"][arm]
            print(f"heal {arm:<9} {row['cpu_minutes']:.2f} CPU-min: KL {row['kl']:.3f}, perplexity {row['ppl']:.4g}")
    return result


if __name__ == "__main__":
    main()
