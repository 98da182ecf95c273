"""Serving throughput, measured: vanilla static/sequence vs recursive sequence/depth-wise with and without early exits.

Replays one fixed-seed workload (mixed prompt/output lengths) twice, all-at-once and with Poisson
arrivals, through the same engine with each policy, prints the tables (ratios against vanilla
static and vanilla sequence-wise) and writes benchmarks/results/serve_throughput.json. An optional
second recursive model (``--relaxed``) adds the issue's row 6 (relaxed, depth-wise + exit).

    RECURSIFY_CACHE=/tmp/rcache python benchmarks/serve_throughput.py RUN --baseline smollm2-135m \\
        --requests 32 --poisson 4 --exit confidence:0.5 [--relaxed RUN_R64] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from recursify.cli import open_model
from recursify.data import load_tokens
from recursify.serving.benchmark import bench_serve, make_workload, measure
from recursify.serving.engine import EngineConfig
from recursify.serving.exit_policy import parse_exit_policy
from recursify.serving.simulate import simulate

RESULTS = Path(__file__).parent / "results" / "serve_throughput.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="recursive checkpoint (rows 3-5)")
    parser.add_argument("--baseline", default="smollm2-135m")
    parser.add_argument("--relaxed", help="a second (relaxed) checkpoint for row 6")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--poisson", type=float, default=4.0, help="Poisson arrival rate, requests/s (0 = skip)")
    parser.add_argument("--new-tokens", default="16,32")
    parser.add_argument("--exit", default="confidence:0.5")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--data", help="held-out text for the simulated comparison")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    low, high = (int(x) for x in args.new_tokens.split(","))
    model, baseline = open_model(args.run), open_model(args.baseline)
    relaxed = open_model(args.relaxed) if args.relaxed else None
    report: dict[str, object] = {"threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    arrivals = ["all"] + ([f"poisson:{args.poisson:g}"] if args.poisson > 0 else [])
    for arrival in arrivals:
        workload = make_workload(model.tokenizer, args.requests, arrival, seed=0, new_tokens=(low, high))
        result = bench_serve(model, baseline, workload, args.exit, args.max_batch, args.precision, args.run, args.baseline)
        if relaxed is not None:
            config = EngineConfig(batching="depthwise", max_batch=args.max_batch, exit=args.exit, precision=args.precision)
            row, _ = measure("6 relaxed depthwise+exit", relaxed, args.relaxed, config, workload)
            result["rows"].append(row.to_dict())
            for key, base in (("vs_static", 0), ("vs_sequence", 1)):
                result["ratios"][key][row.name] = row.tokens_per_s / result["rows"][base]["tokens_per_s"]
        print(f"\n== arrival {arrival}: {args.requests} requests, {low}-{high} new tokens, max batch {args.max_batch} ==")
        print(result.pop("table"))
        if relaxed is not None:
            row6 = result["rows"][-1]
            print(f"{row6['name']}: {row6['tokens_per_s']:.1f} tokens/s, mean loops {row6['mean_loops']:.2f}, "
                  f"{result['ratios']['vs_static'][row6['name']]:.2f}x static")  # fmt: skip
        report[arrival] = result
    if args.data:
        tokens = load_tokens(args.data, model.tokenizer, split="heldout", max_tokens=4096)
        lengths = make_workload(model.tokenizer, args.requests, "all", seed=0, new_tokens=(low, high)).max_new_tokens
        sim = simulate(model, tokens, parse_exit_policy(args.exit, model.loops), lengths, args.max_batch)
        measured = report["all"]["ratios"]  # type: ignore[index]
        sim["measured"] = {
            "5 vs static": measured["vs_static"]["5 recursive depthwise+exit"],
            "5 vs sequence": measured["vs_sequence"]["5 recursive depthwise+exit"],
        }
        report["simulated"] = sim
        print("\n== simulated (paper's appendix-K method) vs measured, all-at-once ==")
        for name in sim["vs_static"]:
            print(f"{name:<24}{sim['vs_static'][name]:>8.2f}x static{sim['vs_sequence'][name]:>8.2f}x sequence")
        print(f"measured row 5: {sim['measured']['5 vs static']:.2f}x static, {sim['measured']['5 vs sequence']:.2f}x sequence; "
              f"oracle mean loops {sim['mean_oracle_loops']:.2f}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as handle:
        json.dump(report, handle, indent=2)
    os.chmod(handle.name, 0o644)
    os.replace(handle.name, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
