"""Time to convert the embedded SmolLM2-135M at loops 2 and 3, LoRA ranks 0 / 64 / 256.

Run: python benchmarks/convert_speed.py [--model smollm2-135m] [--repeats 1]
Prints a table and writes benchmarks/results/convert_speed.json. The source model is loaded
once (GGUF dequantisation, reported separately); each conversion then times tying + LoRA init.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from recursify.conversion.convert import convert
from recursify.sources import load_source

RESULTS = Path(__file__).parent / "results" / "convert_speed.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--loops", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 64, 256])
    parser.add_argument("--init", default="average")
    parser.add_argument("--repeats", type=int, default=1, help="conversions per cell; the minimum is reported")
    args = parser.parse_args()

    start = time.perf_counter()
    source = load_source(args.model)
    load_s = time.perf_counter() - start
    rows = []
    for loops in args.loops:
        for rank in args.ranks:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                model = convert(source, loops=loops, init=args.init, rank=rank, progress=False)
                times.append(time.perf_counter() - start)
            params = model.param_counts()
            rows.append(
                {"loops": loops, "rank": rank, "convert_s": min(times), "total_s": load_s + min(times), "params_ratio": params["ratio"]}
            )
    print(f"source load (GGUF dequantise): {load_s:.1f} s   torch threads: {torch.get_num_threads()}")
    print(f"{'loops':>5} {'rank':>5} {'convert s':>10} {'load+convert s':>15} {'params ratio':>13}")
    for row in rows:
        print(f"{row['loops']:>5} {row['rank']:>5} {row['convert_s']:>10.1f} {row['total_s']:>15.1f} {row['params_ratio']:>13.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": args.model,
        "init": args.init,
        "source_load_s": load_s,
        "rows": rows,
        "machine": {"cpus": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
