"""This CPU's roofline, measured with torch: fp32 matmul FLOP/s (compute bound) and copy bandwidth (memory bound).

Prints both at 1 thread and at the default thread count, plus what one decode token of SmolLM2-135M
(the original, loops 1) and of a loops-3 conversion would cost at either bound; writes
benchmarks/results/roofline.json. ``bench-serve`` / serve_throughput.py measure the roofline again in
their own run and give every row its fraction of both bounds (``recursify.serving.roofline``).

    OMP_NUM_THREADS=1 python benchmarks/roofline.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from recursify.serving.roofline import measure_roofline

RESULTS = Path(__file__).parent / "results" / "roofline.json"
SMOLLM2 = {"layers": 30, "per_layer": 3_540_096, "head": 49152 * 576}  # q/k/v/o + gated MLP multiply-adds; tied 49152 x 576 head


def main() -> None:
    report = {"load_average": list(os.getloadavg()), "measured": []}
    default = torch.get_num_threads()
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        roof = measure_roofline()
        report["measured"].append(roof.to_dict())
        decode = 2 * (SMOLLM2["layers"] * SMOLLM2["per_layer"] + SMOLLM2["head"])  # FLOPs of one token, all 30 depths + head
        weights = 4 * (SMOLLM2["layers"] * SMOLLM2["per_layer"] + SMOLLM2["head"])  # bytes streamed by one decode step
        print(
            f"{threads} thread(s): {roof.matmul_flops_per_s / 1e9:.1f} GFLOP/s fp32 matmul, {roof.memory_bytes_per_s / 1e9:.1f} GB/s copy; "
            f"SmolLM2 decode bounds: compute {roof.matmul_flops_per_s / decode:.0f} tokens/s, "
            f"memory {roof.memory_bytes_per_s / weights:.1f} steps/s (x batch tokens/s); "
            f"batch where compute binds: {decode and (roof.matmul_flops_per_s / decode) / (roof.memory_bytes_per_s / weights):.1f}"
        )
    torch.set_num_threads(default)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
