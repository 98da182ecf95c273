"""The quality frontier: recursive plans against the models a user would make instead, at equal size and CPU-minutes.

Run: OMP_NUM_THREADS=1 python benchmarks/quality_frontier.py [--sizes 0.55 0.35] [--budgets 20 60] [--arms ...] [--resume]
     OMP_NUM_THREADS=1 python benchmarks/quality_frontier.py --cache-bench 4 --resume      # teacher cache: k=64 vs online
Writes benchmarks/results/quality_frontier.json (one row per arm x size x budget, summary fields),
benchmarks/results/quality_frontier.png (parameters vs perplexity ratio, one line per budget, baselines dashed) and
benchmarks/results/quality_frontier_curves.png (every row's held-out KL and perplexity ratio against log CPU-minutes).

Arms, each converted to at most ``size`` x the original's non-embedding parameters (per-depth ones counted):

- ``plan``: the plan ``--plan auto`` chooses (loops, prelude/coda and LoRA ranks by calibration KL; average +
  asvd), converted with it, then local healing for ``--local-share`` of the training budget and KD for the
  rest. The search itself is a one-off cost per (model, size, data), like a hyperparameter search, reported
  apart as ``plan_search_cpu_minutes`` and not counted in the row's budget; converting with the plan is;
- ``cycle``: today's recipe (cycle, loops 2 at sizes >= 0.5 else 3, average + asvd, a ``--lora-params``
  budget filling the size), same training;
- ``drop-influence`` / ``drop-first``: layer dropping to the same size (ShortGPT block influence / the first
  layers, ``convert --keep-layers``), same training;
- ``paper``: the paper's recipe (cycle, average, plain SVD, tied norms, the largest uniform rank that fits),
  end-to-end KD only.

The CPU-minute budget of a row covers everything: conversion (calibration and the plan search included,
measured as this process's CPU time) and training (``recursify.training.heal``: local phase, then KD). KD
runs against the teacher's cached top-64 log-probabilities (``--teacher-cache``), computed once per data
set; that one-off cost is reported apart (``teacher_cache_cpu_minutes``). Data: ``--data`` (default
``teacher:64000``, text sampled from the original: broad by construction) trains and calibrates; its
held-out split is the primary evaluation ("held-out perplexity"); human-written text the runs never see
(Debian manuals, fetched with apt-get; the license texts of /usr/share/common-licenses) is evaluated too.
Every arm's result is written as soon as it is measured, so ``--resume`` continues an interrupted run (a row whose
healing was cut short continues from its last checkpoint, ``heal --resume``).

``--train-data SPEC`` trains on other data than ``--data`` (e.g. ``teacher:256000`` so that a 60-minute row
does not repeat 64k tokens a dozen times); calibration and the held-out evaluation stay on ``--data``, and a
row's curve is then measured on the held-out split of the training data (its ``curve_reference``).
``--total-sizes T ...`` adds ``plan`` rows sized by the original's *total* parameters (embedding and head
included): the plan search (``convert --plan auto --target-total``) also tries the vocabulary factorised to
each of ``--vocab-shares`` of its dense parameters, trading embedding rank against LoRA rank and loops.
Every row carries ``total_params`` / ``total_ratio`` and the vocabulary share it kept;
``--exact-rows N`` gives every factorised vocabulary of that search N exact rows (``--embed-exact-rows``; the
row's size reads ``total:T:exactN``). ``factorised_vs_dense_20min`` compares the best factorised row at <= 0.35x
the original's total parameters with the best dense-vocabulary row at <= 0.5x. Every trained row is also scored on ``--tasks``
(BIG-bench multiple choice, the first ``--task-limit`` questions, 0-shot; the original's scores in
``original_tasks``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from conversion_quality import license_prose
from recursify import load
from recursify.conversion.convert import convert
from recursify.conversion.layer_drop import drop_layers
from recursify.conversion.plan_search import PlanSpace, base_params, search_plan
from recursify.data import load_tokens
from recursify.evaluation.bigbench import bigbench_task_path
from recursify.evaluation.multiple_choice import evaluate_task, load_task
from recursify.evaluation.perplexity import evaluate_perplexity
from recursify.files import pyplot, save_figure, write_json
from recursify.modeling.model import RecursiveModel
from recursify.sources import cache_root, load_source
from recursify.training import HealConfig, heal, heal_state
from recursify.training.common import ExitModel, exit_metrics, heldout_rows
from recursify.training.metrics import read_metrics

RESULTS = Path(__file__).parent / "results" / "quality_frontier.json"
ARMS = ("plan", "cycle", "drop-influence", "drop-first", "paper")
BASELINES = ("drop-influence", "drop-first", "paper")
HALF = 0.55  # "half size": at most this fraction of the original's non-embedding parameters
SEQ_LEN = 128  # training rows (local phase, KD, the runs' own evaluations)
TEACHER_TOP_K = 64
# BIG-bench tasks the original SmolLM2-135M answers clearly above chance, 0-shot (benchmarks/bigbench_tasks.py)
TASKS = ("date_understanding", "general_knowledge", "code_line_description", "movie_recommendation")
TOTAL_SMALL, TOTAL_HALF = 0.35, 0.5  # total-parameter ratios (embedding included) of the factorised comparison
RATIOS = {"3x": 3.0, "2x": 2.0, "1_5x": 1.5}  # cpu_minutes_to_<key>: the CPU-minutes a curve needs to reach each ratio
DEBIAN_PACKAGES = {"debian-faq": "usr/share/doc/debian/FAQ/debian-faq.en.txt.gz", "debian-reference-en": None}


def debian_manuals() -> Path:
    """The Debian FAQ and Debian Reference as .txt files in the cache (``apt-get download``, ``dpkg-deb -x``, gunzip)."""
    import gzip

    target = cache_root() / "data" / "debian-manuals"
    if target.is_dir() and any(target.glob("*.txt")):
        return target
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES], cwd=work, check=True, capture_output=True)
        for deb in Path(work).glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), f"{work}/x"], check=True)
        staging = target.with_suffix(".part")
        staging.mkdir(parents=True, exist_ok=True)
        for text in Path(work, "x").rglob("*.en.txt.gz"):
            (staging / text.name.removesuffix(".gz")).write_text(gzip.decompress(text.read_bytes()).decode("utf-8", errors="replace"))
        staging.replace(target)
    return target


class Frontier:
    """Shared state of one benchmark run: the source, the original, the evaluation sets and their reference numbers."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.source = load_source(args.model)
        self.original = convert(self.source, loops=1, progress=False)
        self.original_params = int(self.original.param_counts()["non_embedding"])
        self.original_total = int(self.original.param_counts()["total"])
        tokenizer = self.source.tokenizer
        self.evals = {"heldout": args.data, "manuals": str(debian_manuals()), "licenses": str(license_prose())}
        self.tokens = {
            name: load_tokens(spec, tokenizer, "heldout", args.eval_tokens, teacher=self.original) for name, spec in self.evals.items()
        }
        self.reference = {name: self._ppl(self.original, name) for name in self.evals}
        self.train_data = args.train_data or args.data
        self.curve_reference = self._curve_reference(self.train_data)
        self.work = cache_root() / "quality_frontier"

    def _curve_reference(self, spec: str) -> float:
        """The original's perplexity on the held-out rows healing evaluates (those of its training data)."""
        rows = heldout_rows(spec, self.source.tokenizer, self.args.eval_tokens, SEQ_LEN, 0, self.original)
        assert rows is not None
        return float(exit_metrics(ExitModel(self.original, None, exits=False), None, rows, 4, "fp32")["ppl"])

    def tasks(self, model: RecursiveModel) -> dict[str, dict[str, float]]:
        """acc / acc_norm on each of ``--tasks`` (0-shot, the first ``--task-limit`` questions)."""
        scores = {}
        for name in self.args.tasks:
            task = load_task(bigbench_task_path(name), name)
            result = evaluate_task(model, task, shots=0, seed=0, limit=self.args.task_limit, batch_size=8, precision="fp32")
            scores[name] = {"acc": result.acc, "acc_norm": result.acc_norm, "n": result.n}
        return scores

    def _ppl(self, model: RecursiveModel, name: str, teacher: RecursiveModel | None = None) -> Any:
        return evaluate_perplexity(model, self.tokens[name], ctx=self.args.ctx, teacher=teacher, progress=False)

    def measure(self, model: RecursiveModel) -> dict[str, Any]:
        """Perplexity on every evaluation set, its ratio to the original's, and KL(original || model) on the held-out split."""
        out: dict[str, Any] = {"ppl": {}, "ratio": {}}
        for name in self.evals:
            result = self._ppl(model, name, self.original if name == "heldout" else None)
            out["ppl"][name] = result.value
            out["ratio"][name] = result.value / self.reference[name].value
            if name == "heldout":
                assert result.per_loop is not None
                out["kl"] = result.per_loop[-1].kl_teacher
        return out

    def measure_loops(self, model: RecursiveModel) -> dict[str, Any]:
        """Held-out KL, perplexity and every loop's exit perplexity (``loop1_ppl``: the first loop's)."""
        result = self._ppl(model, "heldout", self.original)
        assert result.per_loop is not None
        loops = [{"loop": e.loop, "ppl": e.ppl, "kl": e.kl_teacher} for e in result.per_loop]
        return {"kl": result.per_loop[-1].kl_teacher, "ppl": result.value, "loop1_ppl": result.per_loop[0].ppl, "per_loop": loops}

    # --- conversion ---------------------------------------------------------------------------

    def budget(self, size: float | str) -> int:
        """Parameters an arm may have: a float is a share of the non-embedding ones, "total:T" of all of them."""
        if isinstance(size, str):
            return int(float(size.split(":")[1]) * self.original_total)
        return int(size * self.original_params)

    def convert_arm(self, arm: str, size: float | str) -> tuple[Path, dict[str, Any]]:
        """The arm's initial checkpoint (converted once, kept in the work directory) and its conversion record."""
        directory = self.work / f"init-{arm}-{size_name(size)}"
        record_file = directory / "conversion.json"
        if record_file.is_file():
            record = json.loads(record_file.read_text())
            if "total_params" not in record:  # converted before the record counted the vocabulary
                counts = load(directory).param_counts()
                record.update(total_params=int(counts["total"]), total_ratio=float(counts["ratio"]))
            if "vocab_share" not in record:  # converted before plans could choose the vocabulary's share
                record["vocab_share"] = (record.get("plan") or {}).get("chosen", {}).get("vocab_share", 1.0)
                write_json(record_file, record)
            return directory, record
        budget = self.budget(size)
        extra: dict[str, Any] = {}
        if arm == "plan":  # the search is a one-off design cost per (model, size, data), reported apart
            began = time.process_time()
            space = PlanSpace(loops=tuple(self.args.plan_loops), preludes=tuple(self.args.plan_preludes), codas=tuple(self.args.plan_codas))
            shares = tuple(self.args.vocab_shares) if isinstance(size, str) else None
            choice = search_plan(
                self.source, budget, self.args.data, self.args.calib_tokens, space=space, progress=False, vocab_shares=shares,
                embed_exact_rows=exact_rows(size),
            )  # fmt: skip
            extra = {"plan_search_cpu_minutes": (time.process_time() - began) / 60, "plan": choice.model.report["plan"]}
            del choice
        began = time.process_time()
        model, note = self._convert(arm, size, budget, extra.get("plan"))
        cpu = (time.process_time() - began) / 60
        counts = model.param_counts()
        record = {
            "convert_cpu_minutes": cpu, "params": int(counts["non_embedding"] + counts["lora"]), "total_params": int(counts["total"]),
            "total_ratio": float(counts["ratio"]), "embedding": model.embedding_counts(), "note": note,
            "vocab_share": (extra.get("plan") or {}).get("chosen", {}).get("vocab_share", 1.0), **extra,
        }  # fmt: skip
        record["init"] = self.measure(model)
        model.save_pretrained(directory, overwrite=True)
        write_json(record_file, record)
        print(f"  converted {arm} @ {size_name(size)}: {record['params'] / 1e6:.1f}M params, {cpu:.2f} CPU-min; {note}", flush=True)
        return directory, record

    def _convert(self, arm: str, size: float | str, budget: int, plan: dict[str, Any] | None) -> tuple[RecursiveModel, str]:
        data, calib_tokens = self.args.data, self.args.calib_tokens
        if isinstance(size, str) and arm != "plan":
            raise SystemExit(f"--total-sizes rows are plan rows (the search chooses the vocabulary), not {arm!r}")
        if arm == "plan":  # converting with the chosen plan: what a user who knows the plan pays
            assert plan is not None
            chosen = dict(plan["chosen"])
            share = chosen.pop("vocab_share", 1.0)
            vocabulary = {k: chosen.pop(k) for k in ("embed_rank", "head_rank", "embed_exact_rows") if k in chosen}
            lora = next(
                c["lora_budget"] for c in plan["candidates"] if all(c[k] == v for k, v in chosen.items()) and c["vocab_share"] == share
            )
            model = convert(
                self.source, **chosen, init="average", lora_init="asvd", lora_params=lora, calib=data, calib_tokens=calib_tokens,
                **vocabulary,
            )  # fmt: skip
            model.report["plan"] = plan
            vocab_note = ""
            if vocabulary:
                vocab_note = f", vocabulary {share:g} (embed rank {vocabulary['embed_rank']}, head rank {vocabulary['head_rank']}"
                vocab_note += f", {vocabulary['embed_exact_rows']} exact rows)" if vocabulary.get("embed_exact_rows") else ")"
            return (
                model,
                f"loops {chosen['loops']}, prelude {chosen['prelude']}, coda {chosen['coda']}{vocab_note}, LoRA budget {lora:,}: "
                f"{plan['reason']}",
            )
        assert isinstance(size, float)
        loops = 2 if size >= 0.5 else 3
        if arm == "cycle":
            base, _ = base_params(self.original.arch, loops, 0, 0, "per-depth")
            lora = budget - base
            if lora < 0:
                raise SystemExit(f"cycle loops {loops} does not fit size {size}")
            model = convert(
                self.source, loops=loops, init="average", lora_init="asvd", lora_params=lora, calib=data, calib_tokens=calib_tokens
            )
            return model, f"cycle loops {loops}, LoRA budget {lora:,}"
        if arm.startswith("drop-"):
            per_layer = (self.original_params - self.original.arch.hidden_size) / self.original.num_depths
            keep = int((budget - self.original.arch.hidden_size) // per_layer)
            by = arm.removeprefix("drop-")
            model = drop_layers(self.source, keep, by, calib=data if by == "influence" else None, calib_tokens=calib_tokens)
            return model, f"{keep} layers kept: {model.recursion.kept_layers}"
        if arm == "paper":
            rank = paper_rank(self.original, loops, budget)
            model = convert(self.source, loops=loops, init="average", rank=rank, lora_init="svd", norms="tied")
            return model, f"cycle loops {loops}, average, plain SVD rank {rank}, tied norms"
        raise SystemExit(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")

    # --- training -----------------------------------------------------------------------------

    def train_arm(self, arm: str, init: Path, minutes: float, out: Path) -> dict[str, Any]:
        """Local healing for --local-share of ``minutes`` (not for the paper recipe), then KD; the healed model in ``out``."""
        local = 0.0 if arm == "paper" else self.args.local_share * minutes
        resume = self.args.resume and heal_state.interrupted(out)  # a row cut short by a kill continues from its checkpoint
        config = HealConfig(
            str(init), str(out), self.train_data, teacher=self.args.model, calib_tokens=self.args.calib_tokens, minutes=local,
            kd_minutes=minutes - local, seq_len=SEQ_LEN, eval_tokens=self.args.eval_tokens, eval_every_minutes=self.args.curve_every,
            kd_eval_every=self.args.kd_eval_every, teacher_cache=self.args.teacher_cache, overwrite=not resume, resume=resume,
            quiet=True,
        )  # fmt: skip
        report = heal(config)
        local_s = report.local_cpu_minutes * 60
        curve = [(r["cpu_s"], r["kl"], r["ppl"]) for r in read_metrics(out / "heal.jsonl") if r["event"] == "eval" and "kl" in r]
        if report.kd is not None:
            curve += [(local_s + r["cpu_s"], r["kl"], r["ppl"]) for r in read_metrics(out / "metrics.jsonl") if r["event"] == "eval"][1:]
        kd = report.kd or {}
        return {
            "local_cpu_minutes": report.local_cpu_minutes,
            "kd_cpu_minutes": kd.get("cpu_minutes", 0.0),
            "kd_tokens": kd.get("tokens_seen", 0),
            "kd_tokens_per_s": kd.get("tokens_per_s", 0.0),
            "teacher_cache": kd.get("teacher_cache"),
            "curve": [
                {"train_cpu_minutes": s / 60, "kl": kl, "ppl": ppl, "ratio": ppl / self.curve_reference} for s, kl, ppl in sorted(curve)
            ],
        }


def paper_rank(original: RecursiveModel, loops: int, budget: int) -> int:
    """The largest uniform LoRA rank whose tied-norm cycle model fits ``budget`` (non-embedding + LoRA)."""
    from recursify.config import LINEARS, RecursionConfig

    def params(rank: int) -> int:
        recursion = RecursionConfig(loops=loops, norms="tied", ranks=dict.fromkeys(LINEARS, rank))
        with torch.device("meta"):
            counts = RecursiveModel(original.arch, recursion).param_counts()
        return int(counts["non_embedding"] + counts["lora"])

    rank = 0
    while params(rank + 1) <= budget:
        rank += 1
    return rank


# --- results ---------------------------------------------------------------------------------


def size_name(size: float | str) -> str:
    """0.55 -> "0.55" (of the non-embedding parameters); "total:0.35" -> "total0.35" (of all of them);
    "total:0.35:exact2048" -> "total0.35exact2048" (its factorised vocabularies keep 2048 exact rows)."""
    return f"{size:g}" if isinstance(size, float) else size.replace(":", "")


def exact_rows(size: float | str) -> int:
    """The ``--exact-rows`` a total size was searched with (0: none)."""
    return int(size.split(":exact")[1]) if isinstance(size, str) and ":exact" in size else 0


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two rows the same run (rows of older results default to the dense vocabulary and ``data``)."""
    return row["arm"], row["size"], row["budget"], row.get("vocab_share", 1.0), row.get("train_data")


def load_results(path: Path, resume: bool) -> dict[str, Any]:
    if resume and path.is_file():
        return json.loads(path.read_text())
    return {"rows": []}


def summarise(results: dict[str, Any], original_params: int) -> None:
    """The summary fields of the issue from the rows (and the curves), in place."""
    rows = [r for r in results["rows"] if "ppl" in r]
    half = [r for r in rows if r["params"] <= HALF * original_params]
    for minutes in (20, 60):
        # a row run at budget B stops at the first step past B (its measured cpu_minutes may exceed B by part of a step)
        fitting = [r for r in half if r["budget"] <= minutes]
        for metric, suffix in (("heldout", ""), ("manuals", "_human")):
            best = min(fitting, key=lambda r: r["ratio"][metric], default=None)
            results[f"best_half_ppl_ratio_{minutes}min{suffix}"] = best["ratio"][metric] if best else None
            results[f"best_half_{minutes}min{suffix}_arm"] = best["arm"] if best else None
    versus = {}
    for size in sorted({r["size"] for r in rows if isinstance(r["size"], float)}):
        for budget in sorted({r["budget"] for r in rows}):
            same = [r for r in rows if r["size"] == size and r["budget"] == budget]
            recursive = [r["ppl"]["heldout"] for r in same if r["arm"] in ("plan", "cycle")]
            dropped = [r["ppl"]["heldout"] for r in same if r["arm"].startswith("drop-")]
            if recursive and dropped:
                versus[f"{size:g}@{budget:g}min"] = min(recursive) / min(dropped)
    results["recursive_vs_layerdrop_ppl"] = versus
    for key, ratio in RATIOS.items():
        reached: dict[str, float | None] = {}
        for r in rows:
            points = [p for p in r.get("curve", []) if p["ratio"] <= ratio]
            reached[row_label(r)] = r["convert_cpu_minutes"] + points[0]["train_cpu_minutes"] if points else None
        results[f"cpu_minutes_to_{key}"] = reached
    results["factorised_vs_dense_20min"] = factorised_vs_dense(rows, 20)


def arm_label(row: dict[str, Any]) -> str:
    """The arm, marked with its vocabulary share when factorised ("plan+vocab0.35")."""
    share = row.get("vocab_share", 1.0)
    return row["arm"] + (f"+vocab{share:g}" if share < 1 else "")


def row_label(row: dict[str, Any]) -> str:
    return f"{arm_label(row)}@{size_name(row['size'])}/{row['budget']:g}min"


def factorised_vs_dense(rows: list[dict[str, Any]], minutes: float) -> dict[str, Any] | None:
    """The best factorised-vocabulary row at <= TOTAL_SMALL x the original's total parameters against the best
    dense-vocabulary row at <= TOTAL_HALF x, both within ``minutes`` CPU-minutes: held-out perplexity ratio."""
    within = [r for r in rows if 0 < r["budget"] <= minutes and "total_ratio" in r]
    small = [r for r in within if r.get("vocab_share", 1.0) < 1 and r["total_ratio"] <= TOTAL_SMALL]
    dense = [r for r in within if r.get("vocab_share", 1.0) == 1 and r["total_ratio"] <= TOTAL_HALF]
    if not small or not dense:
        return None
    best_small = min(small, key=lambda r: r["ppl"]["heldout"])
    best_dense = min(dense, key=lambda r: r["ppl"]["heldout"])
    return {
        "ppl_ratio": best_small["ppl"]["heldout"] / best_dense["ppl"]["heldout"],
        "manuals_ppl_ratio": best_small["ppl"]["manuals"] / best_dense["ppl"]["manuals"],
        "factorised": row_label(best_small), "factorised_total_ratio": best_small["total_ratio"],
        "dense": row_label(best_dense), "dense_total_ratio": best_dense["total_ratio"],
    }  # fmt: skip


def pareto_plot(results: dict[str, Any], path: Path) -> None:
    """Parameters vs held-out perplexity ratio, one line per budget (recursive solid, baselines dashed): left the
    non-embedding + per-depth parameters; right the total, embedding included, where factorised vocabularies
    (``--total-sizes``) are the hollow markers."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    rows = [r for r in results["rows"] if "ppl" in r]
    for index, budget in enumerate(sorted({r["budget"] for r in rows})):
        color = f"C{index}"
        for baseline, style in ((False, "-o"), (True, "--s")):
            chosen: dict[tuple[float, float], dict[str, Any]] = {}
            for r in rows:
                if r["budget"] == budget and (r["arm"] in BASELINES) == baseline:
                    key = (r["size"], r.get("vocab_share", 1.0))
                    best = chosen.get(key)
                    if best is None or r["ratio"]["heldout"] < best["ratio"]["heldout"]:
                        chosen[key] = r
            label = f"{budget:g} CPU-min, {'best baseline' if baseline else 'best recursive'}"
            dense = sorted((r for r in chosen.values() if r.get("vocab_share", 1.0) == 1), key=lambda r: r["params"])
            if dense:
                axes[0].plot([p["params"] / 1e6 for p in dense], [p["ratio"]["heldout"] for p in dense], style, color=color, label=label)
            points = sorted(chosen.values(), key=lambda r: r["total_params"])
            if points:
                axes[1].plot([p["total_params"] / 1e6 for p in points], [p["ratio"]["heldout"] for p in points], style, color=color)
                factorised = [p for p in points if p.get("vocab_share", 1.0) < 1]
                hollow = ([p["total_params"] / 1e6 for p in factorised], [p["ratio"]["heldout"] for p in factorised])
                axes[1].plot(*hollow, "o", mfc="white", color=color)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("non-embedding + per-depth parameters (M)")
    axes[1].set_xlabel("total parameters, embedding included (M); hollow: factorised vocabulary")
    axes[0].set_ylabel("held-out perplexity / original's")
    for axis in axes:
        axis.axhline(1.0, color="grey", lw=0.8)
    axes[0].legend(fontsize=8)
    save_figure(figure, path)
    plt.close(figure)


def curves_plot(results: dict[str, Any], path: Path) -> None:
    """Every trained row's healing curve against its CPU-minutes, conversion included (log scale): held-out KL on the
    left, perplexity over the original's on the right with the 3x / 2x / 1.5x marks (baselines dashed)."""
    plt = pyplot()
    figure, (kl_axis, ratio_axis) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    trained = sorted((r for r in results["rows"] if r.get("curve")), key=lambda r: (r["budget"], r["arm"] in BASELINES, row_label(r)))
    for index, row in enumerate(trained):
        minutes = [max(row["convert_cpu_minutes"] + p["train_cpu_minutes"], 0.05) for p in row["curve"]]
        style = "--" if row["arm"] in BASELINES else "-"
        label = row_label(row) + (f" ({row['train_data']})" if row.get("train_data") != results["data"] else "")
        kl_axis.plot(minutes, [p["kl"] for p in row["curve"]], style, color=f"C{index % 10}", label=label)
        ratio_axis.plot(minutes, [p["ratio"] for p in row["curve"]], style, color=f"C{index % 10}")
    for ratio in RATIOS.values():
        ratio_axis.axhline(ratio, color="grey", lw=0.8, ls=":")
        ratio_axis.annotate(f"{ratio:g}x", (1.0, ratio), xycoords=("axes fraction", "data"), fontsize=8, ha="right", va="bottom")
    kl_axis.set_xscale("log")
    ratio_axis.set_yscale("log")
    kl_axis.set_ylabel("held-out KL(original || model), nats")
    ratio_axis.set_ylabel("held-out perplexity / original's")
    for axis in (kl_axis, ratio_axis):
        axis.set_xlabel("CPU-minutes, conversion included")
    kl_axis.legend(fontsize=7)
    save_figure(figure, path)
    plt.close(figure)


def print_table(results: dict[str, Any]) -> None:
    print(f"{'arm':<22}{'size':>10}{'budget':>7}{'params M':>9}{'total':>7}{'CPU-min':>8}{'KL':>7}{'ppl':>10}", end="")
    print(f"{'x orig':>8}{'x manuals':>10}{'x licenses':>11}{'tasks':>7}")
    for r in results["rows"]:
        if "ppl" not in r:
            continue
        ratio = r["ratio"]
        arm = arm_label(r) + ("*" if r.get("train_data") != results["data"] else "")
        tasks = r.get("tasks", {})
        mean_acc = f"{sum(t['acc'] for t in tasks.values()) / len(tasks):.2f}" if tasks else "-"
        print(
            f"{arm:<22}{size_name(r['size']):>10}{r['budget']:>7g}{r['params'] / 1e6:>9.1f}{r['total_ratio']:>7.3f}{r['cpu_minutes']:>8.1f}"
            f"{r['kl']:>7.2f}{r['ppl']['heldout']:>10.4g}{ratio['heldout']:>8.2f}{ratio['manuals']:>10.2f}{ratio['licenses']:>11.2f}"
            f"{mean_acc:>7}"
        )
    print("total: x the original's parameters, embedding included; tasks: mean acc over --tasks; *: trained on --train-data")


def cache_bench(frontier: Frontier, results: dict[str, Any], minutes: float, save: Callable[[], None]) -> None:
    """KD from one init for ``minutes`` CPU-minutes with the online teacher vs the cached top-64: tokens/s and held-out KL."""
    init, _ = frontier.convert_arm("cycle", HALF)
    bench = results.setdefault("teacher_cache_bench", {"minutes": minutes})
    for name, k in (("online", 0), (f"top-{TEACHER_TOP_K}", TEACHER_TOP_K)):
        if name in bench:
            continue
        out = frontier.work / f"cache-bench-{name}"
        config = HealConfig(
            str(init), str(out), frontier.args.data, teacher=frontier.args.model, calib_tokens=frontier.args.calib_tokens, minutes=0,
            kd_minutes=minutes, seq_len=SEQ_LEN, eval_tokens=frontier.args.eval_tokens, teacher_cache=k, overwrite=True, quiet=True,
        )  # fmt: skip
        report = heal(config)
        assert report.kd is not None
        bench[name] = {
            "kd_tokens_per_s": report.kd["tokens_per_s"],
            "kd_tokens": report.kd["tokens_seen"],
            "kd_cpu_minutes": report.kd["cpu_minutes"],
            "teacher_cache": report.kd.get("teacher_cache"),
            **frontier.measure(load(out)),
        }
        shutil.rmtree(out, ignore_errors=True)
        print(f"  cache bench {name}: {bench[name]['kd_tokens_per_s']:.1f} tok/s, KL {bench[name]['kl']:.3f}", flush=True)
        save()


def frontier_parser() -> argparse.ArgumentParser:
    """The frontier's options; other benchmarks on its machinery build a ``Frontier`` from ``frontier_parser().parse_args([...])``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--data", default="teacher:64000", help="trains and calibrates (train split); its held-out split is the primary evaluation"
    )
    parser.add_argument("--sizes", type=float, nargs="*", default=[HALF, 0.35], help="fractions of the original's non-embedding parameters")
    parser.add_argument("--budgets", type=float, nargs="+", default=[20.0, 60.0], help="CPU-minutes per row, conversion included")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--train-data", default=None, help="trains instead of --data (calibration and held-out evaluation stay on --data)")
    parser.add_argument(
        "--total-sizes", type=float, nargs="*", default=[], help="plan rows at these fractions of the original's total parameters"
    )
    parser.add_argument(
        "--vocab-shares", type=float, nargs="+", default=[1.0, 0.5, 0.35], help="vocabulary shares the --total-sizes plan search tries"
    )
    parser.add_argument("--exact-rows", type=int, default=0, help="exact rows of each factorised vocabulary of the --total-sizes search")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), help="BIG-bench tasks scored on every trained row (none: skip)")
    parser.add_argument("--task-limit", type=int, default=50, help="questions per task")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--local-share", type=float, default=0.3, help="share of the training budget spent on local healing")
    parser.add_argument("--teacher-cache", type=int, default=TEACHER_TOP_K, help="KD top-k (0 = online teacher)")
    parser.add_argument("--curve-every", type=float, default=2.0, help="CPU-minutes between local-phase curve points")
    parser.add_argument("--kd-eval-every", type=int, default=40, help="KD steps between curve points")
    parser.add_argument("--plan-loops", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--plan-preludes", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--plan-codas", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--init-only", action="store_true", help="convert and evaluate every arm at initialisation, no training")
    parser.add_argument(
        "--cache-bench", type=float, default=0.0, help="CPU-minutes of KD per arm of the teacher-cache comparison (0 = skip)"
    )
    parser.add_argument("--resume", action="store_true", help="keep the rows already in the JSON and the converted inits")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON to write (the plot goes beside it)")
    return parser


def main() -> None:
    parser = frontier_parser()
    args = parser.parse_args()
    if not all(0 < share <= 1 for share in args.vocab_shares):
        parser.error(f"--vocab-shares must be in (0, 1], got {args.vocab_shares}")

    frontier = Frontier(args)
    results = load_results(args.results, args.resume)
    vocabulary = frontier.original_total - frontier.original_params
    for old in results["rows"]:  # rows written before these fields existed: the dense vocabulary, trained on --data
        old.setdefault("vocab_share", 1.0)
        old.setdefault("train_data", results.get("data", args.data))
        old.setdefault("total_params", old["params"] + vocabulary)
        old.setdefault("total_ratio", old["total_params"] / frontier.original_total)
    results.update(
        model=args.model, data=args.data, eval_sets=frontier.evals, eval_tokens=args.eval_tokens, ctx=args.ctx,
        original_params=frontier.original_params, original_ppl={k: v.value for k, v in frontier.reference.items()},
        original_curve_ppl=frontier.curve_reference, torch_threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"),
        local_share=args.local_share, teacher_cache_k=args.teacher_cache,
    )  # fmt: skip

    def save() -> None:
        summarise(results, frontier.original_params)
        write_json(args.results, results)

    print(
        f"original: {frontier.original_params / 1e6:.1f}M non-embedding; held-out ppl "
        + ", ".join(f"{k} {v.value:.2f}" for k, v in frontier.reference.items())
    )
    if args.tasks and set(args.tasks) - set(results.get("original_tasks", {})):
        results["original_tasks"] = frontier.tasks(frontier.original)
    train_data = frontier.train_data
    done = {row_key(r) for r in results["rows"]}
    jobs: list[tuple[float | str, str]] = [(size, arm) for size in args.sizes for arm in args.arms]
    jobs += [(f"total:{size:g}" + (f":exact{args.exact_rows}" if args.exact_rows else ""), "plan") for size in args.total_sizes]
    for size, arm in jobs:
        init, record = frontier.convert_arm(arm, size)
        budgets = [0.0] if args.init_only else args.budgets
        for budget in budgets:
            row: dict[str, Any] = {
                "arm": arm, "size": size, "budget": budget, "vocab_share": record["vocab_share"], "train_data": train_data,
                "params": record["params"], "total_params": record["total_params"], "total_ratio": record["total_ratio"],
                "note": record["note"],
            }  # fmt: skip
            if row_key(row) in done:
                continue
            row["convert_cpu_minutes"] = record["convert_cpu_minutes"]
            if "plan" in record:
                row["plan_search_cpu_minutes"] = record["plan_search_cpu_minutes"]
                results.setdefault("plans", {})[size_name(size)] = record["plan"]
            train_minutes = budget - record["convert_cpu_minutes"]
            if budget == 0.0:
                row.update(cpu_minutes=record["convert_cpu_minutes"], **record["init"])
            elif train_minutes <= 0:
                row["skipped"] = f"conversion alone took {record['convert_cpu_minutes']:.1f} CPU-minutes"
            else:
                out = frontier.work / f"run-{init.name.removeprefix('init-')}-{budget:g}"
                row.update(frontier.train_arm(arm, init, train_minutes, out), curve_reference=frontier.curve_reference)
                row["cpu_minutes"] = row["convert_cpu_minutes"] + row["local_cpu_minutes"] + row["kd_cpu_minutes"]
                trained = load(out)
                row.update(frontier.measure(trained))
                if args.tasks:
                    row["tasks"] = frontier.tasks(trained)
                del trained
                shutil.rmtree(out, ignore_errors=True)
            cache = row.get("teacher_cache") or {}
            if cache.get("built"):
                results["teacher_cache_cpu_minutes"] = cache["cpu_minutes"]
            results["rows"].append(row)
            save()
            if "ppl" in row:
                ppl, ratio = row["ppl"]["heldout"], row["ratio"]["heldout"]
                print(f"  {arm} @ {size_name(size)}, {budget:g} min: ppl {ppl:.4g} ({ratio:.2f}x)", flush=True)
    if args.cache_bench > 0:
        cache_bench(frontier, results, args.cache_bench, save)
    save()
    if any("ppl" in r for r in results["rows"]):
        pareto_plot(results, args.results.with_suffix(".png"))
        curves_plot(results, args.results.with_name(args.results.stem + "_curves.png"))
    print_table(results)
    print({k: v for k, v in results.items() if k.startswith(("best_", "recursive_vs", "cpu_minutes_to", "factorised"))})
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
