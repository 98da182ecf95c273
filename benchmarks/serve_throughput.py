"""Serving throughput, measured: vanilla static/sequence vs recursive sequence/depth-wise with and without early exits,
gate / saturation / ensemble exits at a calibrated agreement, self-speculative decoding, and transformers' own generate.

Replays one fixed-seed workload (mixed prompt/output lengths) all-at-once and with Poisson
arrivals through the same engine with each policy (``recursify.serving.benchmark.serving_benchmark``),
prints the tables (ratios against vanilla static and vanilla sequence-wise, the fraction of this
CPU's compute and memory bounds every row reaches), the engine overhead at --max-batch and, with
--data, the simulated speedups beside the measured ones; writes benchmarks/results/serve_throughput.json.
``--relaxed`` adds row 6 (relaxed, depth-wise + exit); a checkpoint with exit gates and a calibration
(``recursify train-exits``) adds rows 5g / 5s (/ 5e with an exit ensemble) at ``--agreement-target``;
``--speculative 1x4`` adds row 7; ``--transformers`` row 8.

    OMP_NUM_THREADS=1 python benchmarks/serve_throughput.py RUN --baseline smollm2-135m --requests 32 --poisson 4 \\
        --exit confidence:0.9 --speculative 1x4 --transformers --transformers-early-exit 10 --data teacher:4000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from recursify.config import parse_speculative
from recursify.serving.benchmark import serving_benchmark

RESULTS = Path(__file__).parent / "results" / "serve_throughput.json"


def print_report(report: dict[str, Any]) -> None:
    roof = report["roofline"]
    print(f"roofline ({roof['threads']} threads): {roof['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s fp32 matmul, "
          f"{roof['memory_bytes_per_s'] / 1e9:.1f} GB/s copy; load average {report['load_average']}")  # fmt: skip
    for arrival, run in report["runs"].items():
        workload = run["workload"]
        print(f"\n== arrival {arrival}: {workload['requests']} requests, {workload['new_tokens']} new tokens ==")
        print(run.pop("table"))
        for key, value in run["ratios"].items():
            if key not in ("vs_static", "vs_sequence"):
                print(f"{key}: {value:.2f}")
        for row in run["rows"]:
            if row["identical_output"] is not None:
                print(f"{row['name']}: identical output {row['identical_output']}")
    for label, overhead in report["overhead"].items():
        print(f"\nengine overhead ({label}, batch {overhead['batch']}): {100 * overhead['overhead_fraction']:.1f}% "
              f"({overhead['engine_token_ms']:.1f} ms per decode token vs {overhead['model_token_ms']:.1f} ms bare forward; "
              f"scheduler {100 * overhead['schedule_update_fraction']:.1f}%)")  # fmt: skip
    if "simulated" in report:
        sim = report["simulated"]
        print("\n== simulated (paper's appendix-K method) vs measured ==")
        for name in sim["vs_static"]:
            print(f"{name:<24}{sim['vs_static'][name]:>8.2f}x static{sim['vs_sequence'][name]:>8.2f}x sequence")
        print(f"measured row 5 ({sim['measured']['arrival']}): {sim['measured']['5 vs static']:.2f}x static, "
              f"{sim['measured']['5 vs sequence']:.2f}x sequence; oracle mean loops {sim['mean_oracle_loops']:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="recursive checkpoint (rows 3-5)")
    parser.add_argument("--baseline", default="smollm2-135m")
    parser.add_argument("--relaxed", help="a relaxed checkpoint for row 6")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--poisson", type=float, default=4.0, help="Poisson arrival rate, requests/s (0 = skip)")
    parser.add_argument("--new-tokens", default="16,32")
    parser.add_argument("--exit", default="confidence:0.9")
    parser.add_argument("--relaxed-exit", help="row 6's exit rule (default: --exit)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all rows; each row keeps its fastest")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--data", help="held-out text for the simulated comparison")
    parser.add_argument("--agreement-target", type=float, default=0.95, help="rows 5g/5s/5e: calibrated agreement")
    parser.add_argument("--speculative", help="row 7: BxD self-speculative decoding (e.g. 1x4)")
    parser.add_argument("--single-requests", type=int, default=8, help="requests the batch-1 rows decode")
    parser.add_argument("--transformers", action="store_true", help="row 8: transformers' own generate of --baseline")
    parser.add_argument("--transformers-early-exit", type=int, help="row 8e: its assistant_early_exit layer (batch 1)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    low, high = (int(x) for x in args.new_tokens.split(","))
    arrivals = ["all"] + ([f"poisson:{args.poisson:g}"] if args.poisson > 0 else [])
    report = serving_benchmark(
        args.run,
        args.baseline,
        relaxed=args.relaxed,
        requests=args.requests,
        arrivals=arrivals,
        new_tokens=(low, high),
        exit_spec=args.exit,
        relaxed_exit=args.relaxed_exit,
        rounds=args.rounds,
        max_batch=args.max_batch,
        precision=args.precision,
        data=args.data,
        agreement_target=args.agreement_target,
        speculative=parse_speculative(args.speculative) if args.speculative else None,
        single_requests=args.single_requests,
        transformers=args.transformers,
        transformers_early_exit=args.transformers_early_exit,
    )
    report["command"] = "python benchmarks/serve_throughput.py " + " ".join(sys.argv[1:])
    print_report(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as handle:
        json.dump(report, handle, indent=2)
    os.chmod(handle.name, 0o644)
    os.replace(handle.name, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
