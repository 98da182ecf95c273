"""The ``recursify`` command: a table of subcommands, each parsed into typed arguments.

User mistakes surface as one ``recursify: error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from recursify.config import NORM_MODES, SHARED_INITS, STRATEGIES
from recursify.errors import RecursifyError

DEFAULT_MODEL = "smollm2-135m"


def _rank(value: str) -> int | str:
    if value == "full":
        return value
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"rank must be a non-negative integer or 'full', got {value!r}")
    return int(value)


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
    capped = {name: r for name, r in info["ranks"].items() if isinstance(info["rank"], int) and r < info["rank"]}
    rank_note = f" (capped at full rank: {', '.join(f'{n}={r}' for n, r in capped.items())})" if capped else ""
    lines = [
        f"source      {info['source']} ({info['family']})",
        f"recursion   {info['loops']} loops x {info['unique_layers']} unique layers = {info['depths']} depths, "
        f"strategy {info['strategy']}, init {info['init']}",
        f"relaxation  rank {info['rank']}{rank_note}, {info['lora_init']} init, norms {info['norms']}",
        "",
        f"{'parameters':<15}{'count':>14}{'millions':>10}",
    ]
    lines += [f"{name:<15}{count:>14,}{count / 1e6:>10.2f}" for name, count in rows]
    lines.append(f"{'ratio':<15}{params['ratio']:>14.3f}")
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
    convert.add_argument("--lora-init", choices=("svd", "zero"), default="svd", help="LoRA init: residual SVD or standard (default: svd)")
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
    return parser


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
