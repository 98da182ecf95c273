"""The ``recursify`` command: a table of subcommands, each parsed into typed arguments.

User mistakes surface as one ``recursify: error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from recursify.config import LORA_INITS, NORM_MODES, SHARED_FITS, SHARED_INITS, STRATEGIES, parse_relax
from recursify.errors import ConfigError, RecursifyError

DEFAULT_MODEL = "smollm2-135m"


def _rank(value: str) -> int | str:
    if value == "full":
        return value
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"rank must be a non-negative integer or 'full', got {value!r}")
    return int(value)


def _relax(value: str) -> str:
    try:
        parse_relax(value)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def cmd_convert(args: argparse.Namespace) -> None:
    """Convert a pretrained model into a (relaxed) recursive one and save it."""
    from recursify.checkpoint import check_writable
    from recursify.conversion.convert import convert

    check_writable(args.out, args.overwrite)
    if args.quiet:
        quiet_transformers()
    model = convert(
        args.model,
        loops=args.loops,
        init=args.init,
        rank=args.rank,
        strategy=args.strategy,
        norms=args.norms,
        lora_init=args.lora_init,
        seed=args.seed,
        progress=not args.quiet,
        shared_init=args.shared_init,
        calib=args.calib,
        calib_tokens=args.calib_tokens,
        lora_params=args.lora_params,
        lsq_rounds=args.lsq_rounds,
        relax=args.relax,
    )
    model.save_pretrained(args.out, overwrite=args.overwrite)
    if not args.quiet:
        print(format_info(info_dict(model)))
        print(f"saved to {args.out}")


def quiet_transformers() -> None:
    """Silence transformers' own progress bars (weight loading, GGUF dequantisation)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def info_dict(model: Any) -> dict[str, Any]:
    """The machine-readable summary ``recursify info --json`` prints."""
    recursion = model.recursion
    return {
        "params": model.param_counts(),
        "loops": recursion.loops,
        "unique_layers": len(model.layers),
        "depths": model.num_depths,
        "strategy": recursion.strategy,
        "init": recursion.init,
        "rank": recursion.rank_spec,
        "ranks": recursion.ranks,
        "lora_init": recursion.lora_init,
        "norms": recursion.norms,
        "family": model.arch.family,
        "source": model.source.spec,
        "shared_init": recursion.shared_init,
        "calib": recursion.calib,
        "calib_tokens": recursion.calib_tokens,
        "lora_params": recursion.lora_params,
        "layer_ranks": recursion.layer_ranks,
        "relax": recursion.relax,
        "report": model.report,
    }


def format_info(info: dict[str, Any]) -> str:
    """A human-readable parameter table."""
    params = info["params"]
    rows = [
        ("embedding", params["embedding"]),
        ("non-embedding", params["non_embedding"]),
        ("LoRA", params["lora"]),
        ("total", params["total"]),
        ("source total", params["source_total"]),
    ]
    if params.get("frozen"):  # LoRA-XS factors: stored and used, never trained
        rows.insert(3, ("frozen (fixed)", params["frozen"]))
    capped = {name: r for name, r in info["ranks"].items() if isinstance(info["rank"], int) and r < info["rank"]}
    rank_note = f" (capped at full rank: {', '.join(f'{n}={r}' for n, r in capped.items())})" if capped else ""
    lines = [
        f"source      {info['source']} ({info['family']})",
        f"recursion   {info['loops']} loops x {info['unique_layers']} unique layers = {info['depths']} depths, "
        f"strategy {info['strategy']}, init {info['init']}",
        f"relaxation  {info.get('relax', 'lora')}, rank {info['rank']}{rank_note}, {info['lora_init']} init, "
        f"norms {info['norms']}, shared {info['shared_init']}",
        "",
        f"{'parameters':<15}{'count':>14}{'millions':>10}",
    ]
    lines += [f"{name:<15}{count:>14,}{count / 1e6:>10.2f}" for name, count in rows]
    lines.append(f"{'ratio':<15}{params['ratio']:>14.3f}")
    errors = info.get("report", {}).get("relative_error")
    if errors:
        lines += ["", f"relative reconstruction error on {info['calib_tokens']} calibration tokens ({info['calib']}), %:"]
        lines.append("depth " + "".join(f"{name:>8}" for name in errors))
        for depth in range(info["depths"]):
            lines.append(f"{depth:>5} " + "".join(f"{100 * errors[name][depth]:>8.2f}" for name in errors))
    return "\n".join(lines)


def open_model(path: str) -> Any:
    """A recursify checkpoint directory, or any --model source run as the original (loops=1)."""
    from recursify.checkpoint import is_checkpoint, load
    from recursify.conversion.convert import convert

    return load(path) if is_checkpoint(path) else convert(path, loops=1, progress=False)


def cmd_info(args: argparse.Namespace) -> None:
    """Print the parameter table (or JSON) of a checkpoint or a source model."""
    info = info_dict(open_model(args.path))
    print(json.dumps(info, indent=2) if args.json else format_info(info))


def cmd_generate(args: argparse.Namespace) -> None:
    """Stream a continuation of each prompt to stdout."""
    from recursify.modeling.generation import SamplingConfig
    from recursify.text import stream_text

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    model = open_model(args.path)
    for prompt in args.prompt:
        print(prompt, end="", flush=True)
        pieces = stream_text(model, prompt, args.max_new_tokens, sampling, args.chat, args.precision, not args.no_cache)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()


def _count(value: str) -> int:
    from recursify.data import parse_count

    try:
        return parse_count(value)
    except RecursifyError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _count_or_zero(value: str) -> int:
    return 0 if value.strip() == "0" else _count(value)


def cmd_uptrain(args: argparse.Namespace) -> None:
    """Uptrain a converted model: KD from the original (online teacher), early-exit losses, resumable."""
    from recursify.training.config import UptrainConfig
    from recursify.training.losses import LossConfig
    from recursify.training.uptrain import default_teacher, uptrain

    teacher = None if args.no_teacher else (args.teacher or default_teacher(args.student))
    kd_weight = args.kd_weight if args.kd_weight is not None else (1.0 if teacher else 0.0)
    loss = LossConfig(args.kd, kd_weight, args.temperature, args.exit_loss, args.self_distill)
    fields = ["tokens", "cpu_minutes", "seq_len", "batch_tokens", "micro_batch", "lr", "min_lr_ratio", "warmup_steps"]
    fields += ["weight_decay", "clip"]
    fields += ["exit_ensemble", "precision", "gradient_checkpointing", "save_every", "eval_every", "eval_tokens", "seed"]
    options = {name: getattr(args, name) for name in fields}
    config = UptrainConfig(args.student, args.out, teacher, args.data, loss=loss, freeze=args.freeze or [], **options)
    config.resume, config.overwrite, config.quiet = args.resume, args.overwrite, args.quiet
    quiet_transformers()
    summary = uptrain(config)
    print(json.dumps(summary, indent=2))
    print(f"saved to {args.out}")


def cmd_heal(args: argparse.Namespace) -> None:
    """Heal a converted model: fit every depth to the original's hidden states (teacher forcing), then optional KD."""
    from recursify.training.healing import HealConfig, heal

    fields = ["teacher", "calib_tokens", "minutes", "kd_minutes", "seq_len", "micro_batch", "lr", "kd_lr", "kd_batch_tokens"]
    fields += ["eval_tokens", "eval_every_minutes", "precision", "seed", "overwrite", "quiet"]
    config = HealConfig(args.student, args.out, args.calib, **{name: getattr(args, name) for name in fields})
    quiet_transformers()
    report = heal(config)
    print(json.dumps(report.to_dict(), indent=2))
    print(f"saved to {args.out}")


def cmd_plot(args: argparse.Namespace) -> None:
    """Draw the loss curves (per exit) of an uptrain run to a PNG."""
    from recursify.training.plot import plot_run

    print(f"wrote {plot_run(args.run, args.out)}")


def _add_training_commands(sub: Any) -> None:
    from recursify.training.losses import KD_KINDS

    up = sub.add_parser("uptrain", help="uptrain (KD, early exits) a converted model", description=cmd_uptrain.__doc__)
    up.add_argument("student", help="checkpoint directory written by 'recursify convert' (or a previous uptrain)")
    up.add_argument("--teacher", help="KD teacher, run with loops=1 (default: the model the student was converted from)")
    up.add_argument("--no-teacher", action="store_true", help="train on cross-entropy only (needs --data)")
    up.add_argument("--data", help="file, directory, teacher:N, hf:NAME[:CONFIG] (default: teacher:<--tokens>)")
    up.add_argument("--tokens", type=_count, default=1_000_000, help="training tokens, e.g. 2M (default: 1M)")
    up.add_argument("--cpu-minutes", type=float, default=None, help="also stop after this many CPU-minutes of training (process time)")
    up.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per row (default: 512)")
    up.add_argument("--batch-tokens", type=_count, default=16_384, help="tokens per optimizer step (default: 16384)")
    up.add_argument("--micro-batch", type=_positive_int, default=4, help="rows per forward; gradients accumulate (default: 4)")
    up.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default: 2e-4)")
    up.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr (default: 0.1)")
    up.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: 5%% of the steps)")
    up.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decay on weight matrices (default: 0)")
    up.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping, 0 = off (default: 1.0)")
    up.add_argument("--kd", choices=KD_KINDS, default="forward-kl", help="KD divergence (default: forward-kl)")
    up.add_argument("--kd-weight", type=float, default=None, help="w in (1-w) CE + w KD (default: 1 with a teacher, else 0)")
    up.add_argument("--temperature", type=float, default=1.0, help="KD softmax temperature (default: 1)")
    up.add_argument("--exit-loss", default="none", help="none | weighted | aggressive:C (default: none)")
    up.add_argument("--self-distill", action="store_true", help="earlier exits also learn from the final exit")
    up.add_argument("--exit-ensemble", action="store_true", help="learn weights combining exits 1..b at exit b")
    up.add_argument("--freeze", action="append", metavar="PATTERN", help="freeze matching parameters; '!PATTERN' keeps them (repeat)")
    up.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto = bf16 where the hardware has it, else fp32"
    )
    up.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    up.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps, 0 = end only (default: 200)")
    up.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (default: start and end)")
    up.add_argument("--eval-tokens", type=_count_or_zero, default=16_384, help="held-out tokens per evaluation, 0 = none (default: 16384)")
    up.add_argument("--seed", type=int, default=0, help="data order and teacher-corpus seed (default: 0)")
    up.add_argument("--out", required=True, help="output checkpoint directory (training state in OUT/training)")
    up.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    up.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    up.add_argument("--quiet", action="store_true", help="no progress bar")
    up.set_defaults(func=cmd_uptrain)

    _add_heal_command(sub)
    plot = sub.add_parser("plot", help="draw an uptrain run's loss curves to PNG", description=cmd_plot.__doc__)
    plot.add_argument("run", help="uptrain output directory (holds metrics.jsonl)")
    plot.add_argument("--out", help="PNG path (default: RUN/loss.png)")
    plot.set_defaults(func=cmd_plot)


def _add_heal_command(sub: Any) -> None:
    heal = sub.add_parser("heal", help="local block-wise healing of a converted model, then optional KD", description=cmd_heal.__doc__)
    heal.add_argument("student", help="checkpoint directory written by 'recursify convert'")
    heal.add_argument("--teacher", help="the original model, run with loops=1 (default: the model the student was converted from)")
    heal.add_argument("--calib", required=True, help="data: its train split trains, its held-out split evaluates (file, dir, teacher:N)")
    heal.add_argument("--calib-tokens", type=_count, default=16_384, help="training tokens; all depths' states are kept (default: 16384)")
    heal.add_argument("--minutes", type=float, required=True, help="CPU-minutes of local reconstruction, 0 = skip (process time)")
    heal.add_argument("--kd-minutes", type=float, default=0.0, help="CPU-minutes of end-to-end KD afterwards (default: 0 = none)")
    heal.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per row (default: 128)")
    heal.add_argument("--micro-batch", type=_positive_int, default=4, help="rows per step (default: 4)")
    heal.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the local phase (default: 5e-4)")
    heal.add_argument("--kd-lr", type=float, default=5e-4, help="peak learning rate of the KD phase (default: 5e-4)")
    heal.add_argument("--kd-batch-tokens", type=_count, default=1024, help="tokens per KD optimizer step (default: 1024)")
    heal.add_argument("--eval-tokens", type=_count_or_zero, default=4096, help="held-out tokens for KL/ppl, 0 = none (default: 4096)")
    heal.add_argument(
        "--eval-every-minutes", type=float, default=0.0, help="also evaluate every N CPU-minutes of local phase (default: no)"
    )
    heal.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto = bf16 where the hardware has it, else fp32"
    )
    heal.add_argument("--seed", type=int, default=0, help="data order (default: 0)")
    heal.add_argument("--out", required=True, help="output checkpoint directory (+ heal.jsonl, heal_report.json)")
    heal.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    heal.add_argument("--quiet", action="store_true", help="no progress bars")
    heal.set_defaults(func=cmd_heal)


def _eval_options(args: argparse.Namespace, per_loop: bool) -> Any:
    from recursify.evaluation.evaluate import EvalOptions

    return EvalOptions(
        ppl_data=args.ppl,
        split=args.split,
        max_tokens=args.max_tokens,
        ctx=args.ctx,
        stride=args.stride,
        per_loop=per_loop,
        tasks=args.tasks or [],
        shots=args.shots,
        limit=args.limit,
        batch_size=args.batch_size,
        precision=args.precision,
        seed=args.seed,
        progress=not args.quiet,
    )


def _write_report(destination: str | None, payload: Any) -> None:
    from recursify.files import write_json

    if destination == "-":
        print(json.dumps(payload, indent=2))
    elif destination:
        write_json(destination, payload)


def cmd_eval(args: argparse.Namespace) -> None:
    """Measure perplexity (with per-loop exits and a teacher) and few-shot multiple-choice accuracy."""
    from recursify.evaluation.evaluate import evaluate_model
    from recursify.evaluation.report import format_markdown

    if args.ppl is None and not args.tasks:
        raise ConfigError("nothing to evaluate: pass --ppl DATA and/or --tasks TASK ...")
    if args.quiet:
        quiet_transformers()
    teacher = open_model(args.teacher) if args.teacher else None
    report = evaluate_model(open_model(args.path), args.path, _eval_options(args, args.per_loop), teacher)
    _write_report(args.json, report.to_dict())
    if args.json != "-":
        print(format_markdown(report))


def cmd_compare(args: argparse.Namespace) -> None:
    """Evaluate several models on the same data and tasks; table, JSON, Pareto and exit plots."""
    from recursify.evaluation.evaluate import evaluate_model
    from recursify.evaluation.plots import exit_plot, pareto_plot
    from recursify.evaluation.report import format_comparison

    if args.ppl is None and not args.tasks:
        raise ConfigError("nothing to compare: pass --ppl DATA and/or --tasks TASK ...")
    if args.exit_plot and args.ppl is None:
        raise ConfigError("--exit-plot needs per-loop perplexities: pass --ppl DATA")
    if args.quiet:
        quiet_transformers()
    teacher = open_model(args.teacher) if args.teacher else None
    options = _eval_options(args, per_loop=args.ppl is not None)
    reports = [evaluate_model(open_model(path), path, options, teacher) for path in args.paths]
    if args.plot:
        pareto_plot(reports, args.plot, args.metric or ("ppl" if args.ppl is not None else "acc"))
    if args.exit_plot:
        exit_plot(reports, args.exit_plot)
    _write_report(args.json, {"models": [report.to_dict() for report in reports]})
    if args.json != "-":
        print(format_comparison(reports))


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ppl",
        metavar="DATA",
        help="perplexity on a --data source (text/jsonl/parquet file or directory, teacher:N, hf:NAME); "
        "uses its held-out split by default (see --split)",
    )
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout", help="split of --ppl data (default: heldout)")
    parser.add_argument("--max-tokens", type=_count, default=None, help="evaluate at most this many tokens (e.g. 50k)")
    parser.add_argument("--ctx", type=_positive_int, default=512, help="sliding-window length in tokens (default: 512)")
    parser.add_argument(
        "--stride", type=_positive_int, default=None, help="tokens scored per window after the first; <= ctx (default: ctx)"
    )
    parser.add_argument(
        "--teacher", help="reference model (checkpoint or source, e.g. smollm2-135m): adds KL and agreement per loop; implies --per-loop"
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="BIG-bench-format task.json paths or globs, or bigbench:NAME fetched from PyPI once "
        "(e.g. bigbench:general_knowledge bigbench:hindu_knowledge bigbench:logical_deduction/three_objects)",
    )
    parser.add_argument("--shots", type=int, default=0, help="few-shot examples per prompt (default: 0)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="score only the first N questions of each task")
    parser.add_argument("--batch-size", type=_positive_int, default=4, help="windows / continuations per forward pass (default: 4)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast is ~2x faster on CPU (default: fp32)")
    parser.add_argument("--seed", type=int, default=0, help="data order and few-shot sampling (default: 0)")
    parser.add_argument("--json", metavar="OUT", help="write the JSON report to OUT ('-' = stdout instead of the table)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recursify", description="Turn a pretrained decoder LLM into a (Relaxed) Recursive Transformer.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = sub.add_parser("convert", help="convert a pretrained model into a recursive one", description=cmd_convert.__doc__)
    convert.add_argument("--model", default=DEFAULT_MODEL, help=f"HF directory, .gguf file, hub id or alias (default: {DEFAULT_MODEL})")
    convert.add_argument("--loops", type=_positive_int, default=2, help="B: loops over K = L/B shared layers (default: 2)")
    convert.add_argument("--init", choices=SHARED_INITS, default="stepwise", help="shared-layer init (default: stepwise)")
    convert.add_argument(
        "--rank",
        type=_rank,
        default=0,
        help="per-depth LoRA rank; 0 = pure recursive, 'full' = exact; capped at each linear's min(in, out) (default: 0)",
    )
    convert.add_argument("--strategy", choices=STRATEGIES, default="cycle", help="which shared layer serves each depth (default: cycle)")
    convert.add_argument(
        "--norms", choices=NORM_MODES, default="per-depth", help="RMSNorm gains: per-depth (exact at full rank), tied, fold"
    )
    convert.add_argument(
        "--lora-init", choices=LORA_INITS, default="svd", help="LoRA init: residual SVD, activation-aware SVD (needs --calib) or standard"
    )
    convert.add_argument(
        "--shared-init", choices=SHARED_FITS, default="init", help="shared weights: the --init rule, or lsq (needs --calib)"
    )
    convert.add_argument("--calib", default=None, help="calibration data for asvd/lsq/--lora-params (e.g. teacher:16k, a .txt/.jsonl file)")
    convert.add_argument("--calib-tokens", type=_positive_int, default=16384, help="calibration tokens (default: 16384)")
    convert.add_argument("--lora-params", default=None, help="LoRA parameter budget (e.g. 8M) instead of --rank: ranks chosen per layer")
    convert.add_argument("--lsq-rounds", type=_positive_int, default=2, help="lsq / asvd alternation rounds (default: 2)")
    convert.add_argument(
        "--relax",
        type=_relax,
        default="lora",
        help="per-depth relaxation: lora (default), lora-xs (frozen SVD factors, trainable r x r cores; needs --rank), "
        "prefix:N (N learned key/value tokens per depth) or bias (a bias per depth on every linear)",
    )
    convert.add_argument("--seed", type=int, default=0, help="seed for random init (default: 0)")
    convert.add_argument("--out", required=True, help="output directory")
    convert.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    convert.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    convert.set_defaults(func=cmd_convert)

    info = sub.add_parser("info", help="parameter table of a converted (or source) model", description=cmd_info.__doc__)
    info.add_argument("path", help="checkpoint directory written by 'recursify convert', or any --model source")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    generate = sub.add_parser("generate", help="generate text from a checkpoint or source model", description=cmd_generate.__doc__)
    generate.add_argument("path", help="checkpoint directory, or any --model source (run as the original, loops=1)")
    generate.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=32, help="tokens to generate (default: 32)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    generate.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    generate.add_argument("--seed", type=int, default=None, help="sampling seed")
    generate.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    generate.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast is ~2x faster on CPU (default: fp32)"
    )
    generate.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step instead of the KV cache")
    generate.set_defaults(func=cmd_generate)

    evaluate = sub.add_parser("eval", help="perplexity, per-loop exits and multiple-choice accuracy", description=cmd_eval.__doc__)
    evaluate.add_argument("path", help="checkpoint directory, or any --model source (run as the original, loops=1)")
    evaluate.add_argument("--per-loop", action="store_true", help="with --ppl: perplexity and agreement after every loop, oracle exits")
    _add_eval_arguments(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    compare = sub.add_parser("compare", help="evaluate several models side by side, plot size vs quality", description=cmd_compare.__doc__)
    compare.add_argument("paths", nargs="+", help="checkpoint directories or sources (sources run as originals: the reference line)")
    compare.add_argument("--plot", metavar="PNG", help="Pareto plot: non-embedding parameters vs --metric")
    compare.add_argument("--exit-plot", metavar="PNG", help="per-loop exit perplexity and agreement with the final loop")
    compare.add_argument("--metric", choices=("ppl", "acc"), default=None, help="y axis of --plot (default: ppl with --ppl, else acc)")
    _add_eval_arguments(compare)
    compare.set_defaults(func=cmd_compare)
    _add_training_commands(sub)
    _add_serving_commands(sub)
    _add_demo_command(sub)
    _add_plan_train_command(sub)
    _add_export_command(sub)
    return parser


def _serve_data(args: argparse.Namespace, model: Any) -> Any:
    from recursify.data import load_tokens
    from recursify.text import require_tokenizer

    return load_tokens(args.data, require_tokenizer(model), split="heldout", max_tokens=args.max_tokens)


def _lengths(value: str) -> tuple[int, int]:
    low, _, high = value.partition(",")
    if not (low.isdigit() and high.isdigit()) or not 0 < int(low) <= int(high):
        raise argparse.ArgumentTypeError(f"expected MIN,MAX with 0 < MIN <= MAX, got {value!r}")
    return int(low), int(high)


def cmd_bench_serve(args: argparse.Namespace) -> None:
    """Measure serving throughput and latency: vanilla static/sequence vs recursive sequence/depth-wise (+ early exit)."""
    from recursify.serving.benchmark import ROW5, serving_benchmark

    result = serving_benchmark(
        args.run,
        args.baseline,
        relaxed=args.relaxed,
        requests=args.requests,
        arrivals=[args.arrival],
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        seed=args.seed,
        exit_spec=args.exit,
        relaxed_exit=args.relaxed_exit,
        max_batch=args.max_batch,
        precision=args.precision,
        data=args.data,
        data_tokens=args.max_tokens,
        log=lambda line: None,
    )
    report = {**result.pop("runs")[args.arrival], **result}  # one workload: the JSON shape
    print(report.pop("table"))
    overhead = report["overhead"]["recursive"]
    print(f"engine overhead at batch {overhead['batch']}: {100 * overhead['overhead_fraction']:.1f}% of a decode token "
          f"({overhead['engine_token_ms']:.1f} ms vs {overhead['model_token_ms']:.1f} ms for the bare model forward)")  # fmt: skip
    if "row6/row5" in report["ratios"]:
        print(f"row 6 / row 5: {report['ratios']['row6/row5']:.2f}")
    if "simulated" in report:
        sim = report["simulated"]
        print(f"simulated (paper's method): depthwise+oracle {sim['vs_static']['depthwise+oracle']:.2f}x static, "
              f"{sim['vs_sequence']['depthwise+oracle']:.2f}x sequence; measured row 5: "
              f"{report['ratios']['vs_static'][ROW5]:.2f}x static")  # fmt: skip
    if args.json:
        _write_report(args.json, report)


def cmd_simulate(args: argparse.Namespace) -> None:
    """The paper's hypothetical throughput: measured step costs x oracle/confidence exit trajectories on --data."""
    from recursify.serving.exit_policy import parse_exit_policy
    from recursify.serving.simulate import simulate

    model = open_model(args.run)
    lengths = [args.new_tokens] * args.requests
    report = simulate(model, _serve_data(args, model), parse_exit_policy(args.exit, model.loops), lengths, args.max_batch)
    print(f"{'policy':<24}{'tokens/s':>10}{'x static':>10}{'x sequence':>12}")
    for name, value in report["tokens_per_s"].items():
        print(f"{name:<24}{value:>10.1f}{report['vs_static'][name]:>10.2f}{report['vs_sequence'][name]:>12.2f}")
    print(f"mean loops per token: oracle {report['mean_oracle_loops']:.2f} of {model.loops} over {report['positions']} held-out positions")
    if args.json:
        _write_report(args.json, report)


def _add_serving_commands(sub: Any) -> None:
    bench = sub.add_parser("bench-serve", help="measure serving throughput against the vanilla model", description=cmd_bench_serve.__doc__)
    bench.add_argument("run", help="recursive checkpoint directory")
    bench.add_argument("--baseline", default=DEFAULT_MODEL, help=f"the original model, run with loops=1 (default: {DEFAULT_MODEL})")
    bench.add_argument("--relaxed", help="a relaxed (LoRA) checkpoint for row 6: depth-wise + exit, and its no-exit reference")
    bench.add_argument("--relaxed-exit", help="row 6's exit rule; thresholds are calibrated per model (default: --exit)")
    bench.add_argument("--requests", type=_positive_int, default=64, help="requests in the workload (default: 64)")
    bench.add_argument("--arrival", default="all", help="'all' at once or 'poisson:RATE' requests/s (default: all)")
    bench.add_argument("--prompt-tokens", type=_lengths, default=(8, 48), help="prompt length range MIN,MAX (default: 8,48)")
    bench.add_argument("--new-tokens", type=_lengths, default=(16, 32), help="output length range MIN,MAX (default: 16,32)")
    bench.add_argument("--data", help="held-out text for the simulated comparison (file, directory, hf:NAME); omitted: no simulation")
    bench.add_argument("--max-tokens", type=_positive_int, default=4096, help="held-out tokens for --data trajectories (default: 4096)")
    _add_engine_arguments(bench)
    bench.set_defaults(func=cmd_bench_serve)

    sim = sub.add_parser("simulate", help="the paper's hypothetical depth-wise batching throughput", description=cmd_simulate.__doc__)
    sim.add_argument("run", help="recursive checkpoint directory")
    sim.add_argument("--data", required=True, help="held-out text for exit trajectories (file, directory, hf:NAME)")
    sim.add_argument("--max-tokens", type=_positive_int, default=4096, help="held-out tokens (default: 4096)")
    sim.add_argument("--requests", type=_positive_int, default=64, help="simulated requests (default: 64)")
    sim.add_argument("--new-tokens", type=_positive_int, default=32, help="tokens per simulated request (default: 32)")
    _add_engine_arguments(sim)
    sim.set_defaults(func=cmd_simulate)


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exit", default="confidence:0.9", help="none | confidence:TAU[,..] | fixed:B | oracle (default: confidence:0.9)")
    parser.add_argument("--max-batch", type=_positive_int, default=32, help="requests per step (default: 32)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast is ~2x faster on CPU (default: fp32)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    parser.add_argument("--json", metavar="OUT", help="write the JSON report to OUT ('-' = stdout)")


def cmd_demo(args: argparse.Namespace) -> None:
    """The main job on the embedded model: convert a grid, uptrain with KD, post-train exits, evaluate, serve, report.

    Sized to --minutes on this machine (measured first), resumable (rerun to continue, --fresh to redo);
    writes OUT/report.md, OUT/report.json and OUT/plots/*.png with the exact command behind every row.
    """
    from recursify.demo import DemoOptions, run_demo

    options = DemoOptions(args.out, args.minutes, args.quick, args.model, args.data, args.tasks, args.seed)
    quiet_transformers()
    run_demo(options, fresh=args.fresh)


def _add_demo_command(sub: Any) -> None:
    help_text = "the main job: convert, uptrain, evaluate and serve the embedded model"
    demo = sub.add_parser("demo", help=help_text, description=cmd_demo.__doc__)
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget of the whole run (default: 20)")
    demo.add_argument("--quick", action="store_true", help="tiny budgets: every stage once, a smoke run of a few minutes")
    demo.add_argument("--model", default=DEFAULT_MODEL, help=f"source model (default: {DEFAULT_MODEL}, embedded)")
    demo.add_argument("--data", help="train and evaluate on this --data spec (default: text sampled from the model, teacher:N)")
    demo.add_argument(
        "--tasks", nargs="+", metavar="TASK", help="multiple-choice tasks (default: bigbench:general_knowledge when cached or fetchable)"
    )
    demo.add_argument("--seed", type=int, default=0, help="data and sampling seed (default: 0)")
    demo.add_argument("--fresh", action="store_true", help="discard an earlier run in --out and start over")
    demo.set_defaults(func=cmd_demo)


def cmd_plan_train(args: argparse.Namespace) -> None:
    """Plan uptraining on GPUs from the architecture alone (no weights read): parameters, memory per GPU,
    the largest micro-batch, gradient accumulation to ~2M-token batches, tokens/s at --mfu and wall time.
    """
    from recursify.planning import TrainPlanConfig, format_plan, plan_training

    fields = ("rank", "gpus", "gpu_mem", "seq_len", "mfu", "sharding", "gpu_flops", "batch_tokens")
    plan = plan_training(TrainPlanConfig(args.model, args.loops, **{name: getattr(args, name) for name in fields}))
    if args.json != "-":
        print(format_plan(plan))
    _write_report(args.json, plan.to_dict())


def _add_plan_train_command(sub: Any) -> None:
    from recursify.planning import BUILTIN_ARCHITECTURES, PAPER_BATCH_TOKENS, SHARDINGS, parse_bytes

    def memory(value: str) -> int:
        try:
            return parse_bytes(value)
        except RecursifyError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    plan = sub.add_parser("plan-train", help="memory, batch and time plan for uptraining on GPUs", description=cmd_plan_train.__doc__)
    plan.add_argument(
        "--model", required=True, help=f"built-in ({', '.join(BUILTIN_ARCHITECTURES)}), a config.json or its directory, or a hub id"
    )
    plan.add_argument("--loops", type=_positive_int, required=True, help="B: loops of the student")
    plan.add_argument("--rank", type=_rank, default=0, help="per-depth LoRA rank, or 'full' (default: 0)")
    plan.add_argument("--gpus", type=_positive_int, default=8, help="GPUs (default: 8)")
    plan.add_argument("--gpu-mem", type=memory, default=80 * 2**30, help="memory per GPU, e.g. 80G (binary units; default: 80G)")
    plan.add_argument("--seq-len", type=_positive_int, default=2048, help="tokens per sequence (default: 2048)")
    plan.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default: 0.4)")
    plan.add_argument("--sharding", choices=SHARDINGS, default="fsdp", help="how model states are split (default: fsdp)")
    plan.add_argument("--gpu-flops", type=float, default=989e12, help="peak bf16 FLOP/s per GPU (default: 989e12, H100 SXM dense)")
    plan.add_argument(
        "--batch-tokens", type=_count, default=PAPER_BATCH_TOKENS, help="tokens per optimizer step to reach (default: 2097152)"
    )
    plan.add_argument("--json", metavar="OUT", help="also write the plan as JSON to OUT ('-' = stdout instead of the table)")
    plan.set_defaults(func=cmd_plan_train)


def cmd_export(args: argparse.Namespace) -> None:
    """Export a recursify checkpoint for another ecosystem. transformers: a directory AutoModelForCausalLM opens with
    trust_remote_code=True (generate, lm-eval's hf model, engines' Transformers backends); it needs recursify installed.
    """
    from recursify.export import export_transformers

    out = export_transformers(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")


def _add_export_command(sub: Any) -> None:
    from recursify.export import FORMATS

    export = sub.add_parser("export", help="export a checkpoint to another format (transformers)", description=cmd_export.__doc__)
    export.add_argument("checkpoint", help="checkpoint directory written by 'recursify convert' or 'uptrain'")
    export.add_argument("--format", choices=FORMATS, default="transformers", help="output format (default: transformers)")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.set_defaults(func=cmd_export)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recursify")
    except PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except RecursifyError as err:
        print(f"recursify: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recursify: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
