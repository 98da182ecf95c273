"""Healing sweep: what a short healing run on 2 cores should spend its CPU-minutes on, one knob at a time.

Run: OMP_NUM_THREADS=1 python benchmarks/healing_sweep.py [--minutes 6] [--variants ...] [--resume]
Writes benchmarks/results/healing_sweep.json and prints a table.

The student is the frontier's half-size plan (``benchmarks/quality_frontier.py``: ``--plan auto`` at 0.55x
the original's non-embedding parameters, converted once and cached). Every variant heals a copy of it with
``recursify.training.heal`` for the same ``--minutes`` CPU-minutes of this process (local phase for the
local share, KD against the teacher's cached top-64 log-probabilities for the rest; the one-off cache
build is reported apart), changing one thing from the reference settings (``HealConfig``'s defaults with
the frontier's 0.3 local share): the learning rate of both phases, the local/KD split, the training
sequence length, which parameters train (``HealConfig.freeze``). Each healed model is measured as the
frontier measures its rows: perplexity over the original's on the training data's held-out split
(in-domain) and on human-written text it never saw (Debian manuals, license texts), and KL to the
original on the held-out split.

A variant replaces the reference only if it lowers the held-out KL by more than ``--margin`` and costs no
more than that margin on either human-written set: one seed of a short run, so smaller differences are
read as noise. The verdict is the ``decision`` field; ``recursify heal``'s defaults follow it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from quality_frontier import HALF, SEQ_LEN, TEACHER_TOP_K, Frontier, frontier_parser
from recursify import load
from recursify.files import write_json
from recursify.training import HealConfig, heal
from recursify.training.params import apply_freeze

RESULTS = Path(__file__).parent / "results" / "healing_sweep.json"
LOCAL_SHARE = 0.3  # the frontier's split: local healing for this share of the budget, KD for the rest
HUMAN = ("manuals", "licenses")

# variant -> what it changes from the reference (HealConfig fields, plus "local_share")
VARIANTS: dict[str, dict[str, Any]] = {
    "reference": {},
    "lr x2": {"lr": 1e-3, "kd_lr": 1e-3},
    "lr x0.5": {"lr": 2.5e-4, "kd_lr": 2.5e-4},
    "KD only": {"local_share": 0.0},
    "local 0.6": {"local_share": 0.6},
    "seq 256": {"seq_len": 256},
    "LoRA + norms only": {"freeze": ["*", "!*lora*", "!*norm*"]},
    "vocabulary frozen": {"freeze": ["embed.*"]},
}


def heal_variant(frontier: Frontier, init: Path, changes: dict[str, Any], minutes: float, out: Path) -> dict[str, Any]:
    """Heal ``init`` with the reference settings changed by ``changes`` for ``minutes`` CPU-minutes; measure the result."""
    options = dict(changes)
    local = options.pop("local_share", LOCAL_SHARE) * minutes
    options.setdefault("seq_len", SEQ_LEN)
    config = HealConfig(
        str(init), str(out), frontier.train_data, teacher=frontier.args.model, calib_tokens=frontier.args.calib_tokens,
        minutes=local, kd_minutes=minutes - local, eval_tokens=0, teacher_cache=TEACHER_TOP_K, overwrite=True, quiet=True, **options,
    )  # fmt: skip
    report = heal(config)
    kd = report.kd or {}
    healed = load(out)
    counts = apply_freeze(healed, config.freeze)  # what the run trained (no pattern: everything)
    row = {
        "changes": changes,
        "local_cpu_minutes": report.local_cpu_minutes,
        "kd_cpu_minutes": kd.get("cpu_minutes", 0.0),
        "local_steps": report.local_steps,
        "kd_tokens": kd.get("tokens_seen", 0),
        "kd_tokens_per_s": kd.get("tokens_per_s", 0.0),
        "teacher_cache": kd.get("teacher_cache"),
        "trainable_share": counts["trainable"] / (counts["trainable"] + counts["frozen"]),
        **frontier.measure(healed),
    }
    del healed
    shutil.rmtree(out, ignore_errors=True)
    return row


def decide(rows: dict[str, dict[str, Any]], margin: float) -> dict[str, Any]:
    """The variant to keep: the lowest held-out KL among those that beat the reference by ``margin`` without losing it on human text."""
    reference = rows["reference"]
    better = {}
    for name, row in rows.items():
        if name == "reference":
            continue
        gain = 1 - row["kl"] / reference["kl"]
        human = max(row["ratio"][h] / reference["ratio"][h] for h in HUMAN)
        if gain > margin and human <= 1 + margin:
            better[name] = row["kl"]
    keep = min(better, key=better.__getitem__) if better else "reference"
    vs = {
        name: {"kl": row["kl"] / reference["kl"], **{h: row["ratio"][h] / reference["ratio"][h] for h in ("heldout", *HUMAN)}}
        for name, row in rows.items()
    }
    return {"keep": keep, "margin": margin, "changes": rows[keep]["changes"], "vs_reference": vs}


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'variant':<20} {'local':>6} {'KD':>6} {'KD tok/s':>9} {'KL':>7} {'held-out x':>10} {'manuals x':>10} {'licenses x':>10}")
    for name, row in results["variants"].items():
        ratio = row["ratio"]
        print(
            f"{name:<20} {row['local_cpu_minutes']:>6.2f} {row['kd_cpu_minutes']:>6.2f} {row['kd_tokens_per_s']:>9.1f} {row['kl']:>7.3f} "
            f"{ratio['heldout']:>10.2f} {ratio['manuals']:>10.2f} {ratio['licenses']:>10.2f}"
        )
    if "decision" in results:
        print(f"keep: {results['decision']['keep']} {results['decision']['changes']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="teacher:64000", help="calibrates, trains and evaluates (held-out split)")
    parser.add_argument("--size", type=float, default=HALF, help="the plan's share of the original's non-embedding parameters")
    parser.add_argument("--minutes", type=float, default=6.0, help="healing CPU-minutes per variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--margin", type=float, default=0.03, help="relative KL gain a variant needs to replace the reference")
    parser.add_argument("--resume", action="store_true", help="keep the variants already in the JSON")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if "reference" not in args.variants:
        parser.error("--variants must include 'reference': every other variant is judged against it")

    frontier = Frontier(frontier_parser().parse_args(["--model", args.model, "--data", args.data, "--tasks"]))
    init, record = frontier.convert_arm("plan", args.size)
    results: dict[str, Any] = json.loads(args.results.read_text()) if args.resume and args.results.is_file() else {"variants": {}}
    results.update(
        model=args.model, data=args.data, size=args.size, plan=record["note"], minutes=args.minutes, local_share=LOCAL_SHARE,
        seq_len=SEQ_LEN, teacher_cache_k=TEACHER_TOP_K, original_ppl={k: v.value for k, v in frontier.reference.items()},
        torch_threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"),
        command=" ".join(["OMP_NUM_THREADS=1 python benchmarks/healing_sweep.py", *sys.argv[1:]]),
    )  # fmt: skip
    for name in args.variants:
        if name in results["variants"]:
            continue
        row = heal_variant(frontier, init, VARIANTS[name], args.minutes, frontier.work / f"sweep-{name.replace(' ', '_')}")
        results["variants"][name] = row
        write_json(args.results, results)
        print(f"{name}: KL {row['kl']:.3f}, held-out {row['ratio']['heldout']:.2f}x, manuals {row['ratio']['manuals']:.2f}x", flush=True)
    if "reference" in results["variants"] and len(results["variants"]) > 1:
        results["decision"] = decide(results["variants"], args.margin)
    write_json(args.results, results)
    print_table(results)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
