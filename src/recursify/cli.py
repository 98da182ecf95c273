"""The ``recursify`` command: a table of subcommands, each a thin layer over one library call.

Every ``cmd_*`` parses its arguments into the library's own config objects and calls the library;
nothing here is imported by the library. Defaults come from those config dataclasses where an option
maps onto a field, and ``--help`` prints each default from the value the parser really uses, so a
default is stated once. Importing this module (and ``recursify --help``) does not import torch: the
library is imported inside each command. User mistakes surface as one ``recursify: error: ...`` line
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from recursify.config import (
    CALIB_TOKENS,
    EMBED_INITS,
    LORA_INITS,
    NORM_MODES,
    PRECISIONS,
    SHARED_FITS,
    SHARED_INITS,
    STRATEGIES,
    VOCAB_SHARES,
    RecursionConfig,
    SamplingConfig,
    parse_embed_rank,
    parse_relax,
)
from recursify.errors import ConfigError, RecursifyError
from recursify.serving.config import BATCHING, KV_MODES, EngineConfig
from recursify.serving.http.config import ServerConfig

DEFAULT_MODEL = "smollm2-135m"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" from the parser's actual default; options without one (None, False) or that explain theirs get nothing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _rank(value: str) -> int | str:
    if value == "full":
        return value
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"rank must be a non-negative integer or 'full', got {value!r}")
    return int(value)


def _embed_rank(value: str) -> int | str:
    try:
        return parse_embed_rank(value, "rank")
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _share(value: str) -> float:
    try:
        share = float(value)
    except ValueError:
        share = float("nan")
    if not 0 < share <= 1:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"a share must be a fraction in (0, 1], got {value!r}")
    return share


def _relax(value: str) -> str:
    try:
        parse_relax(value)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _command(sub: Any, name: str, func: Callable[[argparse.Namespace], None], help: str) -> argparse.ArgumentParser:
    """One row of the command table: ``recursify NAME`` runs ``func``, described by its docstring."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=func.__doc__, formatter_class=_HelpFormatter)
    parser.set_defaults(func=func)
    return parser


def _speculative(value: str) -> Any:
    from recursify.config import parse_speculative

    try:
        return parse_speculative(value)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


EXIT_HELP = "none | confidence:TAU | gate:P | saturation:D | ensemble:TAU | agreement:A[:SIGNAL] | fixed:B | oracle"


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def cmd_convert(args: argparse.Namespace) -> None:
    """Convert a pretrained model into a (relaxed) recursive one and save it.

    --plan auto chooses loops, prelude/coda and LoRA ranks under --target-params; --keep-layers makes the
    layer-dropped baseline instead (the original's most influential layers, or its first ones).
    """
    from recursify.checkpoint import check_writable
    from recursify.info import format_model_info, model_info
    from recursify.sources import quiet_transformers

    check_writable(args.out, args.overwrite)
    if args.quiet:
        quiet_transformers()
    vocabulary_options = args.embed_rank != "full" or args.head_rank is not None or args.embed_params is not None
    if args.embed_exact_rows and (args.keep_layers is not None or (args.plan == "auto" and args.target_total is None)):
        raise ConfigError("--embed-exact-rows applies to a low-rank vocabulary: a plain conversion's or --plan auto --target-total's")
    if vocabulary_options and (args.keep_layers is not None or args.plan == "auto"):
        raise ConfigError(
            "--embed-rank/--head-rank/--embed-params apply to a plain conversion; --plan auto chooses the vocabulary itself with "
            "--target-total (and --vocab-shares), --keep-layers keeps it dense"
        )
    if args.plan != "auto" and (args.target_total is not None or args.vocab_shares is not None):
        raise ConfigError("--target-total and --vocab-shares are the budget of --plan auto; add --plan auto")
    if args.keep_layers is not None:
        model = _dropped_model(args)
    elif args.plan == "auto":
        model = _auto_plan_model(args)
    else:
        from recursify.conversion.convert import convert

        if args.target_params is not None:
            raise ConfigError("--target-params is the budget of --plan auto (or use --lora-params for a LoRA budget at fixed --loops)")
        model = convert(
            args.model,
            loops=args.loops or 2,
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
            embed_rank=args.embed_rank,
            head_rank=args.head_rank,
            embed_init=args.embed_init,
            embed_params=args.embed_params,
            embed_exact_rows=args.embed_exact_rows,
            prelude=args.prelude,
            coda=args.coda,
        )
    model.save_pretrained(args.out, overwrite=args.overwrite)
    if not args.quiet:
        print(format_model_info(model_info(model)))
        print(f"saved to {args.out}")


def _refuse_plan_options(args: argparse.Namespace, what: str, allowed: tuple[str, ...] = ()) -> None:
    """--plan auto and --keep-layers decide the plan themselves: refuse options that would be ignored."""
    recursion = RecursionConfig()
    given = {
        "--loops": args.loops is not None,
        "--prelude": args.prelude != recursion.prelude,
        "--coda": args.coda != recursion.coda,
        "--rank": args.rank != recursion.rank_spec,
        "--lora-params": args.lora_params is not None,
        "--strategy": args.strategy != recursion.strategy,
        "--relax": args.relax != recursion.relax,
        "--shared-init": args.shared_init != recursion.shared_init,
        "--lora-init": args.lora_init != recursion.lora_init and "--lora-init" not in allowed,
        "--init": args.init != recursion.init and "--init" not in allowed,
    }
    clashes = [flag for flag, present in given.items() if present]
    if clashes:
        raise ConfigError(f"{what} chooses the plan itself; drop {', '.join(clashes)}")


def _auto_plan_model(args: argparse.Namespace) -> Any:
    from recursify.conversion.plan_search import format_plan_search, search_plan

    if (args.target_params is None) == (args.target_total is None):
        raise ConfigError(
            "--plan auto needs one budget: --target-params (e.g. 55M non-embedding + per-depth parameters) or --target-total "
            "(e.g. 47M, every parameter: the vocabulary is factorised where that pays)"
        )
    if args.vocab_shares is not None and args.target_total is None:
        raise ConfigError("--vocab-shares go with --target-total (a budget that counts the vocabulary)")
    _refuse_plan_options(args, "--plan auto", allowed=("--init", "--lora-init"))
    init = args.init if args.init != RecursionConfig().init else "average"  # auto's default: average, the best init measured
    lora_init = args.lora_init if args.lora_init != RecursionConfig().lora_init else "asvd"
    total = args.target_total is not None
    choice = search_plan(
        args.model, args.target_total if total else args.target_params, args.calib, args.calib_tokens, init=init, lora_init=lora_init,
        norms=args.norms, seed=args.seed, progress=not args.quiet, embed_init=args.embed_init,
        vocab_shares=tuple(args.vocab_shares or VOCAB_SHARES) if total else None, embed_exact_rows=args.embed_exact_rows,
    )  # fmt: skip
    if not args.quiet:
        print(format_plan_search(choice))
    return choice.model


def _dropped_model(args: argparse.Namespace) -> Any:
    from recursify.conversion.layer_drop import drop_layers

    _refuse_plan_options(args, "--keep-layers")
    if args.plan is not None or args.target_params is not None:
        raise ConfigError("--keep-layers makes a layer-dropped model; it takes no --plan or --target-params")
    return drop_layers(args.model, args.keep_layers, args.drop_by, args.calib, args.calib_tokens, args.seed, not args.quiet)


def cmd_info(args: argparse.Namespace) -> None:
    """Print the parameter table (or JSON) of a checkpoint or a source model."""
    from recursify import load
    from recursify.info import format_model_info, model_info

    info = model_info(load(args.path))
    print(json.dumps(info, indent=2) if args.json else format_model_info(info))


def cmd_generate(args: argparse.Namespace) -> None:
    """Stream a continuation of each prompt to stdout."""
    from recursify import load
    from recursify.text import stream_text

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    model = load(args.path)
    stats = None
    if args.speculative is not None:
        from recursify.modeling.speculative import SpeculativeStats

        stats = SpeculativeStats()
    for prompt in args.prompt:
        print(prompt, end="", flush=True)
        pieces = stream_text(
            model, prompt, args.max_new_tokens, sampling, args.chat, args.precision, not args.no_cache, args.speculative, stats, args.exit
        )
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
    if stats is not None:
        print(
            f"speculative {args.speculative.spec}: {stats.acceptance_rate:.2f} of drafts accepted, "
            f"{stats.tokens_per_pass:.2f} tokens per verify pass ({stats.rounds} passes)",
            file=sys.stderr,
        )


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
    from recursify.sources import quiet_transformers
    from recursify.training.common import default_teacher
    from recursify.training.config import LossConfig, UptrainConfig
    from recursify.training.uptrain import uptrain

    teacher = None if args.no_teacher else (args.teacher or default_teacher(args.student))
    kd_weight = args.kd_weight if args.kd_weight is not None else (1.0 if teacher else 0.0)
    loss = LossConfig(args.kd, kd_weight, args.temperature, args.exit_loss, args.self_distill, args.early_exit_target)
    fields = ["tokens", "cpu_minutes", "seq_len", "batch_tokens", "micro_batch", "lr", "min_lr_ratio", "warmup_steps"]
    fields += ["weight_decay", "clip"]
    fields += ["exit_ensemble", "exit_heads", "freeze_model", "precision", "gradient_checkpointing", "save_every", "eval_every"]
    fields += ["eval_tokens", "seed", "compile", "fused_adamw", "stream", "peak_flops", "teacher_cache"]
    options = {name: getattr(args, name) for name in fields}
    config = UptrainConfig(args.student, args.out, teacher, args.data, loss=loss, freeze=args.freeze or [], **options)
    config.resume, config.overwrite, config.quiet = args.resume, args.overwrite, args.quiet
    quiet_transformers()
    summary = uptrain(config)
    if summary["process"]["index"] == 0:  # under accelerate launch, one report, not one per process
        print(json.dumps(summary, indent=2))
        print(f"saved to {args.out}")


def cmd_heal(args: argparse.Namespace) -> None:
    """Heal a converted model: fit every depth to the original's hidden states (teacher forcing), then optional KD."""
    from recursify.sources import quiet_transformers
    from recursify.training.config import HealConfig
    from recursify.training.healing import heal

    fields = ["teacher", "calib_tokens", "minutes", "kd_minutes", "seq_len", "micro_batch", "lr", "kd_lr", "kd_batch_tokens"]
    fields += ["eval_tokens", "eval_every_minutes", "precision", "seed", "overwrite", "quiet", "teacher_cache", "save_every", "resume"]
    options = {name: getattr(args, name) for name in fields}
    config = HealConfig(args.student, args.out, args.calib, freeze=args.freeze or [], **options)
    quiet_transformers()
    report = heal(config)
    print(json.dumps(report.to_dict(), indent=2))
    print(f"saved to {args.out}")


def cmd_train_exits(args: argparse.Namespace) -> None:
    """Train exit gates on a frozen checkpoint and calibrate its exit signals; writes exit_gates.safetensors and
    exit_calibration.json into the checkpoint (then serve with --exit gate:P, saturation:D or agreement:A).
    """
    from recursify.sources import quiet_transformers
    from recursify.training.config import TrainExitsConfig
    from recursify.training.exit_training import train_exits

    fields = ["data", "teacher", "tokens", "calib_tokens", "window", "gate_width", "steps", "batch", "lr", "seed", "quiet"]
    config = TrainExitsConfig(args.checkpoint, **{name: getattr(args, name) for name in fields})
    quiet_transformers()
    print(json.dumps(train_exits(config), indent=2))
    print(f"saved to {args.checkpoint}")


def _gate_width(value: str) -> int | None:
    if value == "none":
        return None
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of hidden units (0 = linear) or 'none', got {value!r}")
    return int(value)


def cmd_plot(args: argparse.Namespace) -> None:
    """Draw the loss curves (per exit) of an uptrain run to a PNG."""
    from recursify.training.plot import plot_run

    print(f"wrote {plot_run(args.run, args.out)}")


def _add_training_commands(sub: Any) -> None:
    from recursify.training.config import EXIT_TARGETS, KD_KINDS, LossConfig, UptrainConfig

    loss, run = LossConfig(), UptrainConfig
    up = _command(sub, "uptrain", cmd_uptrain, help="uptrain (KD, early exits) a converted model")
    up.add_argument("student", help="checkpoint directory written by 'recursify convert' (or a previous uptrain)")
    up.add_argument("--teacher", help="KD teacher, run with loops=1 (default: the model the student was converted from)")
    up.add_argument("--no-teacher", action="store_true", help="train on cross-entropy only (needs --data)")
    up.add_argument("--data", help="file, directory, teacher:N, hf:NAME[:CONFIG] (default: teacher:<--tokens>)")
    up.add_argument("--tokens", type=_count, default=run.tokens, help="training tokens, e.g. 2M")
    up.add_argument(
        "--cpu-minutes", type=float, default=run.cpu_minutes, help="also stop after this many CPU-minutes of training (process time)"
    )
    up.add_argument("--seq-len", type=_positive_int, default=run.seq_len, help="tokens per row")
    up.add_argument("--batch-tokens", type=_count, default=run.batch_tokens, help="tokens per optimizer step")
    up.add_argument("--micro-batch", type=_positive_int, default=run.micro_batch, help="rows per forward; gradients accumulate")
    up.add_argument("--lr", type=float, default=run.lr, help="peak learning rate")
    up.add_argument("--min-lr-ratio", type=float, default=run.min_lr_ratio, help="cosine floor as a fraction of --lr")
    up.add_argument("--warmup-steps", type=int, default=run.warmup_steps, help="linear warmup steps (default: 5%% of the steps)")
    up.add_argument("--weight-decay", type=float, default=run.weight_decay, help="AdamW decay on weight matrices")
    up.add_argument("--clip", type=float, default=run.clip, help="gradient-norm clipping, 0 = off")
    up.add_argument("--kd", choices=KD_KINDS, default=loss.kd, help="KD divergence")
    up.add_argument("--kd-weight", type=float, default=None, help="w in (1-w) CE + w KD (default: 1 with a teacher, else 0)")
    up.add_argument("--temperature", type=float, default=loss.temperature, help="KD softmax temperature")
    up.add_argument("--exit-loss", default=loss.exit_loss, help="none | weighted | aggressive:C")
    up.add_argument("--self-distill", action="store_true", help="earlier exits also learn from the final exit")
    _add_teacher_cache(up)
    up.add_argument("--exit-ensemble", action="store_true", help="learn weights combining exits 1..b at exit b")
    up.add_argument(
        "--early-exit-target",
        choices=EXIT_TARGETS,
        default=loss.early_exit_target,
        help="what earlier exits learn from: teacher or final exit",
    )
    up.add_argument(
        "--exit-heads", type=int, default=run.exit_heads, metavar="RANK", help="add per-loop exit heads of this rank (0 = none)"
    )
    up.add_argument("--freeze-model", action="store_true", help="train exit heads / ensemble only; the last loop's output cannot change")
    up.add_argument("--freeze", action="append", metavar="PATTERN", help="freeze matching parameters; '!PATTERN' keeps them (repeat)")
    _add_training_precision(up, run.precision)
    up.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer visit's activations to save memory")
    up.add_argument("--compile", action="store_true", help="torch.compile each shared layer")
    up.add_argument(
        "--fused-adamw",
        action=argparse.BooleanOptionalAction,
        default=run.fused_adamw,
        help="AdamW's fused kernel (default: on CUDA devices)",
    )
    stream_help = "stream the data, each process its own share, one pass (default: for hf: datasets; else all in memory)"
    up.add_argument("--stream", action=argparse.BooleanOptionalAction, default=run.stream, help=stream_help)
    up.add_argument(
        "--peak-flops",
        type=float,
        default=run.peak_flops,
        help="one device's peak FLOP/s, for the MFU log (default: known GPUs' bf16 peak)",
    )
    up.add_argument("--save-every", type=int, default=run.save_every, help="checkpoint every N steps, 0 = end only")
    up.add_argument("--eval-every", type=int, default=run.eval_every, help="held-out evaluation every N steps (default: start and end)")
    up.add_argument("--eval-tokens", type=_count_or_zero, default=run.eval_tokens, help="held-out tokens per evaluation, 0 = none")
    up.add_argument("--seed", type=int, default=run.seed, help="data order and teacher-corpus seed")
    up.add_argument("--out", required=True, help="output checkpoint directory (training state in OUT/training)")
    up.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    up.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    up.add_argument("--quiet", action="store_true", help="no progress bar")

    _add_heal_command(sub)
    _add_train_exits_command(sub)
    plot = _command(sub, "plot", cmd_plot, help="draw an uptrain run's loss curves to PNG")
    plot.add_argument("run", help="uptrain output directory (holds metrics.jsonl)")
    plot.add_argument("--out", help="PNG path (default: RUN/loss.png)")


TEACHER_TOP_K = 64  # --teacher-cache without a value


def _add_teacher_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--teacher-cache",
        type=int,
        nargs="?",
        const=TEACHER_TOP_K,
        default=0,
        metavar="K",
        help=f"KD against the teacher's top-K log-probabilities, computed once per data set and cached "
        f"(K = {TEACHER_TOP_K} when omitted); no teacher forward per step",
    )


def _add_training_precision(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--precision", choices=("auto", *PRECISIONS), default=default, help="auto = bf16 where the hardware computes it natively, else fp32"
    )


def _add_train_exits_command(sub: Any) -> None:
    from recursify.training.config import TrainExitsConfig

    run = TrainExitsConfig
    exits = _command(sub, "train-exits", cmd_train_exits, help="train exit gates and calibrate exit thresholds of a frozen checkpoint")
    exits.add_argument("checkpoint", help="checkpoint directory (loops >= 2); gates and calibration are written into it")
    exits.add_argument("--data", help="file, directory, teacher:N, hf:NAME: train split for gates, held-out split for calibration")
    exits.add_argument("--teacher", help="samples teacher:N data (default: the model the checkpoint was converted from)")
    exits.add_argument("--tokens", type=_count, default=run.tokens, help="training tokens for the gates")
    exits.add_argument("--calib-tokens", type=_count, default=run.calib_tokens, help="held-out tokens for the calibration curves")
    exits.add_argument("--window", type=_positive_int, default=run.window, help="tokens per forward pass")
    exits.add_argument("--gate-width", type=_gate_width, default=run.gate_width, help="MLP units per gate, 0 = linear, none = no gates")
    exits.add_argument("--steps", type=_positive_int, default=run.steps, help="gate training steps")
    exits.add_argument("--batch", type=_positive_int, default=run.batch, help="(position, loop) samples per step")
    exits.add_argument("--lr", type=float, default=run.lr, help="gate learning rate")
    exits.add_argument("--seed", type=int, default=run.seed, help="data order and gate initialisation")
    exits.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_heal_command(sub: Any) -> None:
    from recursify.training.config import HealConfig

    run = HealConfig
    heal = _command(sub, "heal", cmd_heal, help="local block-wise healing of a converted model, then optional KD")
    heal.add_argument("student", help="checkpoint directory written by 'recursify convert'")
    heal.add_argument("--teacher", help="the original model, run with loops=1 (default: the model the student was converted from)")
    heal.add_argument("--calib", required=True, help="data: its train split trains, its held-out split evaluates (file, dir, teacher:N)")
    heal.add_argument("--calib-tokens", type=_count, default=run.calib_tokens, help="training tokens; all depths' states are kept")
    heal.add_argument("--minutes", type=float, required=True, help="CPU-minutes of local reconstruction, 0 = skip (process time)")
    heal.add_argument("--kd-minutes", type=float, default=run.kd_minutes, help="CPU-minutes of end-to-end KD afterwards, 0 = none")
    heal.add_argument("--seq-len", type=_positive_int, default=run.seq_len, help="tokens per row")
    heal.add_argument("--micro-batch", type=_positive_int, default=run.micro_batch, help="rows per step")
    heal.add_argument("--lr", type=float, default=run.lr, help="peak learning rate of the local phase")
    heal.add_argument("--kd-lr", type=float, default=run.kd_lr, help="peak learning rate of the KD phase")
    heal.add_argument("--kd-batch-tokens", type=_count, default=run.kd_batch_tokens, help="tokens per KD optimizer step")
    heal.add_argument("--eval-tokens", type=_count_or_zero, default=run.eval_tokens, help="held-out tokens for KL/ppl, 0 = none")
    heal.add_argument(
        "--eval-every-minutes", type=float, default=run.eval_every_minutes, help="also evaluate every N CPU-minutes of local phase, 0 = no"
    )
    heal.add_argument(
        "--freeze", action="append", metavar="PATTERN", help="parameters neither phase trains; '!PATTERN' keeps them (repeat)"
    )
    _add_teacher_cache(heal)
    _add_training_precision(heal, run.precision)
    heal.add_argument("--seed", type=int, default=run.seed, help="data order")
    heal.add_argument("--out", required=True, help="output checkpoint directory (+ heal.jsonl, heal_report.json)")
    heal.add_argument("--save-every", type=_count_or_zero, default=run.save_every, help="checkpoint every N steps of either phase")
    heal.add_argument("--resume", action="store_true", help="continue the interrupted run of --out from its last checkpoint")
    heal.add_argument("--overwrite", action="store_true", help="replace --out (and any interrupted run of it) if it exists")
    heal.add_argument("--quiet", action="store_true", help="no progress bars")


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
    from recursify import load
    from recursify.evaluation.evaluate import evaluate_model
    from recursify.evaluation.report import format_markdown
    from recursify.sources import quiet_transformers

    if args.ppl is None and not args.tasks:
        raise ConfigError("nothing to evaluate: pass --ppl DATA and/or --tasks TASK ...")
    if args.quiet:
        quiet_transformers()
    teacher = load(args.teacher) if args.teacher else None
    report = evaluate_model(load(args.path), args.path, _eval_options(args, args.per_loop), teacher)
    _write_report(args.json, report.to_dict())
    if args.json != "-":
        print(format_markdown(report))


def cmd_compare(args: argparse.Namespace) -> None:
    """Evaluate several models on the same data and tasks; table, JSON, Pareto and exit plots."""
    from recursify import load
    from recursify.evaluation.evaluate import evaluate_model
    from recursify.evaluation.plots import exit_plot, pareto_plot
    from recursify.evaluation.report import format_comparison
    from recursify.sources import quiet_transformers

    if args.ppl is None and not args.tasks:
        raise ConfigError("nothing to compare: pass --ppl DATA and/or --tasks TASK ...")
    if args.exit_plot and args.ppl is None:
        raise ConfigError("--exit-plot needs per-loop perplexities: pass --ppl DATA")
    if args.quiet:
        quiet_transformers()
    teacher = load(args.teacher) if args.teacher else None
    options = _eval_options(args, per_loop=args.ppl is not None)
    reports = [evaluate_model(load(path), path, options, teacher) for path in args.paths]
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
        "uses its held-out split by default (see --split; 'all' for a whole test file)",
    )
    parser.add_argument(
        "--split",
        choices=("heldout", "train", "all"),
        default="heldout",
        help="split of --ppl data; 'all' scores local files whole, in their own order (as published test-file perplexities)",
    )
    parser.add_argument("--max-tokens", type=_count, default=None, help="evaluate at most this many tokens (e.g. 50k)")
    parser.add_argument("--ctx", type=_positive_int, default=512, help="sliding-window length in tokens")
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
    parser.add_argument("--shots", type=int, default=0, help="few-shot examples per prompt")
    parser.add_argument("--limit", type=_positive_int, default=None, help="score only the first N questions of each task")
    parser.add_argument("--batch-size", type=_positive_int, default=4, help="windows / continuations per forward pass")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16 autocast is ~2x faster on CPUs with bf16 units")
    parser.add_argument("--seed", type=int, default=0, help="data order and few-shot sampling")
    parser.add_argument("--json", metavar="OUT", help="write the JSON report to OUT ('-' = stdout instead of the table)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recursify", description="Turn a pretrained decoder LLM into a (Relaxed) Recursive Transformer.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    recursion = RecursionConfig()
    convert = _command(sub, "convert", cmd_convert, help="convert a pretrained model into a recursive one")
    convert.add_argument("--model", default=DEFAULT_MODEL, help="HF directory, .gguf file, hub id or alias")
    convert.add_argument(
        "--loops", type=_positive_int, default=None, help="B: loops over K = (L - prelude - coda)/B shared layers (default: 2)"
    )
    convert.add_argument("--init", choices=SHARED_INITS, default=recursion.init, help="shared-layer init")
    convert.add_argument(
        "--rank",
        type=_rank,
        default=recursion.rank_spec,
        help="per-depth LoRA rank; 0 = pure recursive, 'full' = exact; capped at each linear's min(in, out)",
    )
    convert.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=recursion.strategy,
        help="which shared layer serves each looped depth; middle-cycle = cycle with --prelude 1 --coda 1",
    )
    convert.add_argument(
        "--prelude", type=int, default=recursion.prelude, help="keep the first N original layers unique (run once, before the loops)"
    )
    convert.add_argument(
        "--coda", type=int, default=recursion.coda, help="keep the last M original layers unique (run once, before the head)"
    )
    convert.add_argument(
        "--norms", choices=NORM_MODES, default=recursion.norms, help="RMSNorm gains: per-depth (exact at full rank), tied, fold"
    )
    convert.add_argument(
        "--lora-init",
        choices=LORA_INITS,
        default=recursion.lora_init,
        help="LoRA init: residual SVD, activation-aware SVD (needs --calib) or standard",
    )
    convert.add_argument(
        "--shared-init", choices=SHARED_FITS, default=recursion.shared_init, help="shared weights: the --init rule, or lsq (needs --calib)"
    )
    convert.add_argument("--calib", default=None, help="calibration data for asvd/lsq/--lora-params (e.g. teacher:16k, a .txt/.jsonl file)")
    convert.add_argument("--calib-tokens", type=_positive_int, default=CALIB_TOKENS, help="calibration tokens")
    convert.add_argument("--lora-params", default=None, help="LoRA parameter budget (e.g. 8M) instead of --rank: ranks chosen per layer")
    convert.add_argument("--lsq-rounds", type=_positive_int, default=recursion.lsq_rounds, help="lsq / asvd alternation rounds")
    convert.add_argument(
        "--relax",
        type=_relax,
        default=recursion.relax,
        help="per-depth relaxation: lora, lora-xs (frozen SVD factors, trainable r x r cores; needs --rank), "
        "prefix:N (N learned key/value tokens per depth) or bias (a bias per depth on every linear)",
    )
    convert.add_argument(
        "--embed-rank",
        type=_embed_rank,
        default=recursion.embed_rank,
        help="rank of the input embedding as low-rank factors (and of the head unless --head-rank); 'full' = the original matrix, exact",
    )
    convert.add_argument(
        "--head-rank",
        type=_embed_rank,
        default=None,
        help="the output head's own rank, untied from the input side ('full' = its own dense matrix) (default: follow --embed-rank)",
    )
    convert.add_argument(
        "--embed-init",
        choices=EMBED_INITS,
        default=recursion.embed_init,
        help="embedding/head factors: frequency-weighted input + logit-preserving head (needs --calib), or plain truncated SVD",
    )
    convert.add_argument(
        "--embed-params",
        default=None,
        help="parameter budget for input embedding + head (e.g. 12M) instead of --embed-rank: tied or untied and the ranks "
        "chosen by KL on calibration tokens (needs --calib)",
    )
    convert.add_argument(
        "--embed-exact-rows",
        type=_count_or_zero,
        default=recursion.embed_exact_rows,
        metavar="N",
        help="keep the rows of the N tokens calibration uses most exact (dense) in a low-rank embedding/head; the rank covers "
        "the rest; counted in --embed-params and --target-total (needs --calib)",
    )
    convert.add_argument(
        "--plan",
        choices=("auto",),
        default=None,
        help="auto: compare plans (loops, prelude, coda, LoRA ranks) under --target-params or --target-total by calibration KL; "
        "needs --calib",
    )
    convert.add_argument("--target-params", default=None, help="budget of --plan auto: non-embedding + per-depth parameters, e.g. 55M")
    convert.add_argument(
        "--target-total",
        default=None,
        help="budget of --plan auto counting every parameter, embedding and head included, e.g. 47M: each plan is also tried with "
        "a factorised vocabulary (--vocab-shares), trading embedding rank against LoRA and loops",
    )
    convert.add_argument(
        "--vocab-shares",
        type=_share,
        nargs="+",
        default=None,
        help="with --target-total: the vocabulary parameters to try, as shares of the dense ones "
        f"(default: {' '.join(map(str, VOCAB_SHARES))})",
    )
    convert.add_argument(
        "--keep-layers", type=_positive_int, default=None, help="instead: the layer-dropped baseline, K original layers (loops 1)"
    )
    convert.add_argument(
        "--drop-by", choices=("influence", "first"), default="influence", help="which layers --keep-layers keeps (influence needs --calib)"
    )
    convert.add_argument("--seed", type=int, default=recursion.seed, help="seed for random init")
    convert.add_argument("--out", required=True, help="output directory")
    convert.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    convert.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    info = _command(sub, "info", cmd_info, help="parameter table of a converted (or source) model")
    info.add_argument("path", help="checkpoint directory written by 'recursify convert', or any --model source")
    info.add_argument("--json", action="store_true", help="machine-readable output")

    sampling = SamplingConfig()
    generate = _command(sub, "generate", cmd_generate, help="generate text from a checkpoint or source model")
    generate.add_argument("path", help="checkpoint directory, or any --model source (run as the original, loops=1)")
    generate.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    generate.add_argument("--max-new-tokens", type=_positive_int, default=32, help="tokens to generate")
    generate.add_argument("--temperature", type=float, default=sampling.temperature, help="0 = greedy")
    generate.add_argument("--top-k", type=int, default=sampling.top_k, help="sample from the k most likely tokens (0 = off)")
    generate.add_argument("--top-p", type=float, default=sampling.top_p, help="nucleus sampling mass (1.0 = off)")
    generate.add_argument("--seed", type=int, default=sampling.seed, help="sampling seed")
    generate.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    generate.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16 autocast is ~2x faster on CPUs with bf16 units")
    generate.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step instead of the KV cache")
    generate.add_argument(
        "--speculative", type=_speculative, metavar="BxD", help="self-speculative decoding: draft D tokens with B loops (same output)"
    )
    generate.add_argument("--exit", default="none", help=EXIT_HELP + " (served through the engine)")

    evaluate = _command(sub, "eval", cmd_eval, help="perplexity, per-loop exits and multiple-choice accuracy")
    evaluate.add_argument("path", help="checkpoint directory, or any --model source (run as the original, loops=1)")
    evaluate.add_argument("--per-loop", action="store_true", help="with --ppl: perplexity and agreement after every loop, oracle exits")
    _add_eval_arguments(evaluate)

    compare = _command(sub, "compare", cmd_compare, help="evaluate several models side by side, plot size vs quality")
    compare.add_argument("paths", nargs="+", help="checkpoint directories or sources (sources run as originals: the reference line)")
    compare.add_argument("--plot", metavar="PNG", help="Pareto plot: non-embedding parameters vs --metric")
    compare.add_argument("--exit-plot", metavar="PNG", help="per-loop exit perplexity and agreement with the final loop")
    compare.add_argument("--metric", choices=("ppl", "acc"), default=None, help="y axis of --plot (default: ppl with --ppl, else acc)")
    _add_eval_arguments(compare)
    _add_training_commands(sub)
    _add_serving_commands(sub)
    _add_demo_command(sub)
    _add_plan_train_command(sub)
    _add_export_command(sub)
    return parser


def _lengths(value: str) -> tuple[int, int]:
    low, _, high = value.partition(",")
    if not (low.isdigit() and high.isdigit()) or not 0 < int(low) <= int(high):
        raise argparse.ArgumentTypeError(f"expected MIN,MAX with 0 < MIN <= MAX, got {value!r}")
    return int(low), int(high)


def cmd_bench_serve(args: argparse.Namespace) -> None:
    """Measure serving throughput and latency: vanilla static/sequence vs recursive sequence/depth-wise (+ early exit)."""
    from recursify.serving.benchmark import format_summary, serving_benchmark

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
        agreement_target=args.agreement_target,
        speculative=args.speculative,
        single_requests=args.single_requests,
        transformers=args.transformers,
        transformers_early_exit=args.transformers_early_exit,
    )
    report = {**result.pop("runs")[args.arrival], **result}  # one workload: the JSON shape
    print(format_summary(report))
    report.pop("table")  # printed above; the JSON keeps the numbers
    if args.json:
        _write_report(args.json, report)


def cmd_simulate(args: argparse.Namespace) -> None:
    """The paper's hypothetical throughput: measured step costs x oracle/confidence exit trajectories on --data."""
    from recursify import load
    from recursify.data import load_tokens
    from recursify.serving.exit_policy import parse_exit_policy
    from recursify.serving.simulate import format_simulation, simulate
    from recursify.text import require_tokenizer

    model = load(args.run)
    tokens = load_tokens(args.data, require_tokenizer(model), split="heldout", max_tokens=args.max_tokens)
    lengths = [args.new_tokens] * args.requests
    report = simulate(model, tokens, parse_exit_policy(args.exit, model.loops, model.addons), lengths, args.max_batch)
    print(format_simulation(report, model.loops))
    if args.json:
        _write_report(args.json, report)


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve a checkpoint or any model source over HTTP with the OpenAI API (completions, chat, streaming), /health and /metrics.

    Binds 127.0.0.1 unless --host says otherwise. SIGINT/SIGTERM stop admitting, give running requests
    --shutdown-timeout seconds, then cancel them, and exit 0.
    """
    from recursify.serving.http import require_server_packages

    require_server_packages()
    from recursify.serving.http.server import serve

    engine_fields = ["batching", "max_batch", "exit", "kv_mode", "precision", "max_kv_tokens", "block_size", "max_prefill_chunk"]
    engine = EngineConfig(**{name: getattr(args, name) for name in [*engine_fields, "max_model_len"]})
    server_fields = ["host", "port", "max_waiting", "shutdown_timeout", "log_level"]
    server = ServerConfig(model_name=args.served_model_name, **{name: getattr(args, name) for name in server_fields})
    serve(args.path, engine, server)


def _add_serve_command(sub: Any) -> None:
    engine, server = EngineConfig(), ServerConfig()
    serve = _command(sub, "serve", cmd_serve, help="serve a model over HTTP with the OpenAI API")
    serve.add_argument("path", help="checkpoint directory, or any --model source (run as the original, loops=1)")
    serve.add_argument("--host", default=server.host, help="address to bind (0.0.0.0 exposes the server to the network)")
    serve.add_argument("--port", type=int, default=server.port, help="TCP port (0: any free port)")
    serve.add_argument("--served-model-name", help="the name clients pass as 'model' (default: the path's last component)")
    serve.add_argument(
        "--max-waiting", type=_positive_int, default=server.max_waiting, help="requests queued beyond the running batch; more get 429"
    )
    serve.add_argument("--shutdown-timeout", type=float, default=server.shutdown_timeout, help="seconds running requests get after SIGTERM")
    serve.add_argument(
        "--log-level", choices=("critical", "error", "warning", "info", "debug"), default=server.log_level, help="uvicorn's log level"
    )
    serve.add_argument("--batching", choices=BATCHING, default=engine.batching, help="continuous batching policy")
    serve.add_argument("--max-batch", type=_positive_int, default=engine.max_batch, help="requests running at once")
    serve.add_argument("--exit", default=engine.exit, help="early-exit policy: none | confidence:TAU[,..] | fixed:B")
    serve.add_argument("--kv-mode", choices=KV_MODES, default=engine.kv_mode, help="keys/values of early-exited tokens at deeper loops")
    serve.add_argument(
        "--precision", choices=PRECISIONS, default=engine.precision, help="bf16 autocast is ~2x faster on CPUs with bf16 units"
    )
    serve.add_argument("--max-kv-tokens", type=_positive_int, default=engine.max_kv_tokens, help="KV pool size in positions (every depth)")
    serve.add_argument("--block-size", type=_positive_int, default=engine.block_size, help="positions per KV block")
    serve.add_argument("--max-prefill-chunk", type=_positive_int, default=engine.max_prefill_chunk, help="longest prompt chunk per step")
    context = "longest prompt + output (default: the model's max_position_embeddings; the KV pool caps it too)"
    serve.add_argument("--max-model-len", type=_positive_int, default=engine.max_model_len, help=context)


def _add_serving_commands(sub: Any) -> None:
    _add_serve_command(sub)
    bench = _command(sub, "bench-serve", cmd_bench_serve, help="measure serving throughput against the vanilla model")
    bench.add_argument("run", help="recursive checkpoint directory")
    bench.add_argument("--baseline", default=DEFAULT_MODEL, help="the original model, run with loops=1")
    bench.add_argument("--relaxed", help="a relaxed (LoRA) checkpoint for row 6: depth-wise + exit, and its no-exit reference")
    bench.add_argument("--relaxed-exit", help="row 6's exit rule; thresholds are calibrated per model (default: --exit)")
    bench.add_argument("--requests", type=_positive_int, default=64, help="requests in the workload")
    bench.add_argument("--arrival", default="all", help="'all' at once or 'poisson:RATE' requests/s")
    bench.add_argument("--prompt-tokens", type=_lengths, default=(8, 48), help="prompt length range MIN,MAX")
    bench.add_argument("--new-tokens", type=_lengths, default=(16, 32), help="output length range MIN,MAX")
    bench.add_argument("--data", help="held-out text for the simulated comparison (file, directory, hf:NAME); omitted: no simulation")
    bench.add_argument("--max-tokens", type=_positive_int, default=4096, help="held-out tokens for --data trajectories")
    bench.add_argument(
        "--agreement-target", type=float, default=0.95, help="rows 5g/5s/5e: gate/saturation/ensemble exits calibrated to this agreement"
    )
    bench.add_argument(
        "--speculative", type=_speculative, metavar="BxD", help="row 7: self-speculative vs greedy generate at batch 1 and 4"
    )
    bench.add_argument("--single-requests", type=_positive_int, default=8, help="requests the batch-1 rows (7, 8) decode")
    bench.add_argument("--transformers", action="store_true", help="row 8: transformers' own generate of --baseline (static batches)")
    bench.add_argument(
        "--transformers-early-exit", type=_positive_int, metavar="LAYER", help="row 8e: transformers' assistant_early_exit at batch 1"
    )
    _add_engine_arguments(bench)

    sim = _command(sub, "simulate", cmd_simulate, help="the paper's hypothetical depth-wise batching throughput")
    sim.add_argument("run", help="recursive checkpoint directory")
    sim.add_argument("--data", required=True, help="held-out text for exit trajectories (file, directory, hf:NAME)")
    sim.add_argument("--max-tokens", type=_positive_int, default=4096, help="held-out tokens")
    sim.add_argument("--requests", type=_positive_int, default=64, help="simulated requests")
    sim.add_argument("--new-tokens", type=_positive_int, default=32, help="tokens per simulated request")
    _add_engine_arguments(sim)


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exit", default="confidence:0.9", help=EXIT_HELP)
    parser.add_argument("--max-batch", type=_positive_int, default=EngineConfig.max_batch, help="requests per step")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default=EngineConfig.precision, help="bf16 autocast is ~2x faster on CPUs with bf16 units"
    )
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--json", metavar="OUT", help="write the JSON report to OUT ('-' = stdout)")


def cmd_demo(args: argparse.Namespace) -> None:
    """The main job on the embedded model: convert a grid, uptrain with KD, post-train exits, evaluate, serve, report.

    Sized to --minutes on this machine (measured first), resumable (rerun to continue, --fresh to redo);
    writes OUT/report.md, OUT/report.json and OUT/plots/*.png with the exact command behind every row.
    """
    from recursify.demo import DemoOptions, run_demo
    from recursify.sources import quiet_transformers

    options = DemoOptions(args.out, args.minutes, args.quick, args.model, args.data, args.tasks, args.seed)
    quiet_transformers()
    run_demo(options, execute=run_command, fresh=args.fresh)


def _add_demo_command(sub: Any) -> None:
    help_text = "the main job: convert, uptrain, evaluate and serve the embedded model"
    demo = _command(sub, "demo", cmd_demo, help=help_text)
    demo.add_argument("--out", default="runs/demo", help="run directory")
    demo.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget of the whole run")
    demo.add_argument("--quick", action="store_true", help="tiny budgets: every stage once, a smoke run of a few minutes")
    demo.add_argument("--model", default=DEFAULT_MODEL, help="source model")
    demo.add_argument("--data", help="train and evaluate on this --data spec (default: text sampled from the model, teacher:N)")
    demo.add_argument(
        "--tasks", nargs="+", metavar="TASK", help="multiple-choice tasks (default: bigbench:general_knowledge when cached or fetchable)"
    )
    demo.add_argument("--seed", type=int, default=0, help="data and sampling seed")
    demo.add_argument("--fresh", action="store_true", help="discard an earlier run in --out and start over")


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
    from recursify.planning import BUILTIN_ARCHITECTURES, SHARDINGS, TrainPlanConfig, parse_bytes

    defaults = TrainPlanConfig

    def memory(value: str) -> int:
        try:
            return parse_bytes(value)
        except RecursifyError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    plan = _command(sub, "plan-train", cmd_plan_train, help="memory, batch and time plan for uptraining on GPUs")
    plan.add_argument(
        "--model", required=True, help=f"built-in ({', '.join(BUILTIN_ARCHITECTURES)}), a config.json or its directory, or a hub id"
    )
    plan.add_argument("--loops", type=_positive_int, required=True, help="B: loops of the student")
    plan.add_argument("--rank", type=_rank, default=defaults.rank, help="per-depth LoRA rank, or 'full'")
    plan.add_argument("--gpus", type=_positive_int, default=defaults.gpus, help="GPUs")
    plan.add_argument("--gpu-mem", type=memory, default=defaults.gpu_mem, help="memory per GPU in bytes, e.g. 80G (binary units)")
    plan.add_argument("--seq-len", type=_positive_int, default=defaults.seq_len, help="tokens per sequence")
    plan.add_argument("--mfu", type=float, default=defaults.mfu, help="model FLOPs utilisation to assume")
    plan.add_argument("--sharding", choices=SHARDINGS, default=defaults.sharding, help="how model states are split")
    plan.add_argument("--gpu-flops", type=float, default=defaults.gpu_flops, help="peak bf16 FLOP/s per GPU (H100 SXM dense)")
    plan.add_argument("--batch-tokens", type=_count, default=defaults.batch_tokens, help="tokens per optimizer step to reach")
    plan.add_argument("--json", metavar="OUT", help="also write the plan as JSON to OUT ('-' = stdout instead of the table)")


def cmd_export(args: argparse.Namespace) -> None:
    """Export a recursify checkpoint for another ecosystem. transformers: a directory AutoModelForCausalLM opens with
    trust_remote_code=True (generate, lm-eval's hf model, engines' Transformers backends); it needs recursify installed.
    """
    from recursify.export import export_transformers

    out = export_transformers(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")


def _add_export_command(sub: Any) -> None:
    from recursify.export import FORMATS

    export = _command(sub, "export", cmd_export, help="export a checkpoint to another format (transformers)")
    export.add_argument("checkpoint", help="checkpoint directory written by 'recursify convert' or 'uptrain'")
    export.add_argument("--format", choices=FORMATS, default="transformers", help="output format")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recursify")
    except PackageNotFoundError:
        return "unknown"


def run_command(argv: Sequence[str]) -> None:
    """Run ``recursify ARGV`` in this process, raising the command's errors instead of exiting (the demo's steps)."""
    args = build_parser().parse_args(argv)
    args.func(args)


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
