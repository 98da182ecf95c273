"""Perplexity-evaluation throughput: recursify (loops=1) vs transformers' own model, side by side.

Run: python benchmarks/eval_speed.py [--model smollm2-135m] [--tokens 4096] [--ctx 512] [--batch-size 4]
Both models score the same token stream with the same sliding windows (``sliding_windows``), the
same batch and the same precision; transformers' side is the loop of its perplexity guide
(forward with ``logits_to_keep``, float32 log-softmax, gather). Rounds alternate between the two
models and the best round of each is reported, so background load hits both alike. Prints a
table and writes benchmarks/results/eval_speed.json. Goal (issue 4): ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoModelForCausalLM

from recursify.conversion.convert import convert
from recursify.evaluation.perplexity import evaluate_perplexity, sliding_windows
from recursify.sources import load_source
from recursify.text import precision_context

RESULTS = Path(__file__).parent / "results" / "eval_speed.json"
T = TypeVar("T")


def transformers_nll(model: torch.nn.Module, tokens: torch.Tensor, ctx: int, batch_size: int, precision: str) -> float:
    """Summed NLL of the stream with transformers' model, windowed exactly like recursify."""
    windows = sliding_windows(tokens.numel(), ctx, ctx)
    nll = 0.0
    with torch.no_grad(), precision_context(precision):
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            keep = max(w.scored for w in batch)
            inputs = torch.stack([tokens[w.begin : w.end] for w in batch])
            logp = model(inputs, logits_to_keep=keep).logits.float().log_softmax(-1)
            for row, window in enumerate(batch):
                targets = tokens[window.end + 1 - window.scored : window.end + 1]
                nll -= float(logp[row, keep - window.scored :].gather(-1, targets[:, None]).sum())
    return nll


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=4096, help="stream length (scored tokens = tokens - 1)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    loaded = load_source(args.model)
    reference = AutoModelForCausalLM.from_config(loaded.hf_config, dtype=torch.float32)
    missing, unexpected = reference.load_state_dict(loaded.state_dict, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # a tied head is not stored
    reference.tie_weights()
    reference.eval()
    ours = convert(args.model, loops=1, progress=False).eval()
    tokens = torch.randint(0, loaded.hf_config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0))
    scored = args.tokens - 1

    rows = []
    for precision in args.precisions:
        best = {"recursify": math.inf, "transformers": math.inf}
        nll = {}
        for _ in range(args.rounds):
            seconds, result = timed(
                lambda p=precision: evaluate_perplexity(ours, tokens, ctx=args.ctx, batch_size=args.batch_size, precision=p, progress=False)
            )
            best["recursify"], nll["recursify"] = min(best["recursify"], seconds), result.nll
            seconds, value = timed(lambda p=precision: transformers_nll(reference, tokens, args.ctx, args.batch_size, p))
            best["transformers"], nll["transformers"] = min(best["transformers"], seconds), value
        ours_tps, theirs_tps = scored / best["recursify"], scored / best["transformers"]
        rows.append(
            {
                "precision": precision,
                "recursify_tok_s": ours_tps,
                "transformers_tok_s": theirs_tps,
                "ratio": ours_tps / theirs_tps,
                "ppl_recursify": math.exp(nll["recursify"] / scored),
                "ppl_transformers": math.exp(nll["transformers"] / scored),
            }
        )

    print(f"{'precision':<10}{'recursify tok/s':>17}{'transformers tok/s':>20}{'ratio':>8}{'ppl ours':>12}{'ppl hf':>12}")
    for row in rows:
        print(
            f"{row['precision']:<10}{row['recursify_tok_s']:>17.1f}{row['transformers_tok_s']:>20.1f}{row['ratio']:>8.3f}"
            f"{row['ppl_recursify']:>12.2f}{row['ppl_transformers']:>12.2f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": args.model,
        "tokens": args.tokens,
        "ctx": args.ctx,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "results": rows,
    }
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
