"""Time to convert the embedded SmolLM2-135M at loops 2 and 3, LoRA ranks 0 / 64 / 256.

Run: python benchmarks/convert_speed.py [--model smollm2-135m] [--repeats 1]
Prints a table and writes benchmarks/results/convert_speed.json. Source loading is reported
separately: "cold" is a first use (GGUF dequantised by transformers, then stored as float32
safetensors in the cache), "warm" every later use (the stored copy). Each conversion then times
tying + LoRA init on the loaded weights; end to end = warm load + conversion.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from recursify.conversion.convert import convert
from recursify.sources import REGISTRY, fetch_registry_model, load_source

RESULTS = Path(__file__).parent / "results" / "convert_speed.json"


def cold_load_seconds(alias: str) -> float:
    """Time a first use of a registry model: a fresh cache holding only the verified GGUF."""
    gguf = fetch_registry_model(alias)
    previous = os.environ.get("RECURSIFY_CACHE")
    with tempfile.TemporaryDirectory() as fresh:
        target = Path(fresh) / "models" / alias
        target.mkdir(parents=True)
        for path in (gguf, gguf.with_name(gguf.name + ".sha256")):
            shutil.copy2(path, target / path.name)
        os.environ["RECURSIFY_CACHE"] = fresh
        try:
            start = time.perf_counter()
            load_source(alias)
            return time.perf_counter() - start
        finally:
            if previous is None:
                del os.environ["RECURSIFY_CACHE"]
            else:
                os.environ["RECURSIFY_CACHE"] = previous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--loops", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 64, 256])
    parser.add_argument("--init", default="average")
    parser.add_argument("--repeats", type=int, default=1, help="conversions per cell; the minimum is reported")
    args = parser.parse_args()

    cold_s = cold_load_seconds(args.model) if args.model in REGISTRY else None
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
    cold = f"{cold_s:.1f} s" if cold_s is not None else "n/a"
    print(f"source load: cold (GGUF dequantise + store) {cold}, warm {load_s:.1f} s; torch threads: {torch.get_num_threads()}")
    print(f"{'loops':>5} {'rank':>5} {'convert s':>10} {'load+convert s':>15} {'params ratio':>13}")
    for row in rows:
        print(f"{row['loops']:>5} {row['rank']:>5} {row['convert_s']:>10.1f} {row['total_s']:>15.1f} {row['params_ratio']:>13.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": args.model,
        "init": args.init,
        "source_load_cold_s": cold_s,
        "source_load_warm_s": load_s,
        "rows": rows,
        "machine": {"cpus": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
