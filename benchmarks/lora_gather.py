"""Depth-mixed LoRA: ways to apply each token's own visit's (A_v, B_v) inside one batched linear.

A depth-wise serving step packs rows at different loops; each row needs the LoRA of its loop.
Candidates, timed on SmolLM2-135M's linear shapes at rank 64 and 3 visits:

- ``stacked``: project every row through all visits' A at once, zero the other visits' slices,
  one matmul with all B side by side (visits x the LoRA FLOPs, no data movement);
- ``grouped``: sort rows by visit, one pair of matmuls per visit present, scatter back
  (the LoRA FLOPs once, a loop over the <= B visits present);
- ``gathered``: gather [rows, r, in] / [rows, out, r] factors per row and two bmm calls
  (the LoRA FLOPs once, but reads rows x the factor bytes);
- ``uniform``: every row at one visit (the int path; the lower bound) and ``base``: no LoRA.

Run: OMP_NUM_THREADS=1 python benchmarks/lora_gather.py [--repeats 200]
Prints a table (microseconds per call of the LoRA term plus the shared linear) and writes
benchmarks/results/lora_gather.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from recursify.modeling.lora import lora_delta

RESULTS = Path(__file__).parent / "results" / "lora_gather.json"
SHAPES = {"q/o": (576, 576), "k/v": (576, 192), "gate/up": (576, 1536), "down": (1536, 576)}
VISITS, RANK = 3, 64


def stacked(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, visit: torch.Tensor) -> torch.Tensor:
    """The former per-token path: all visits' A, a one-hot mask, all B side by side."""
    visits, rank, fan_in = a.shape
    projected = (x @ a.reshape(visits * rank, fan_in).transpose(0, 1)).unflatten(-1, (visits, rank))
    own = torch.nn.functional.one_hot(visit, visits).to(projected.dtype)[..., None]
    stacked_b = b.permute(1, 0, 2).reshape(b.shape[1], visits * rank)
    return (projected * own).flatten(-2) @ stacked_b.transpose(0, 1)


def gathered(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, visit: torch.Tensor) -> torch.Tensor:
    """Per-row factors gathered, two bmm calls (one row per token)."""
    flat, rows = x.reshape(-1, 1, x.shape[-1]), visit.reshape(-1)
    out = torch.bmm(torch.bmm(flat, a[rows].transpose(1, 2)), b[rows].transpose(1, 2))
    return out.reshape(*x.shape[:-1], b.shape[1])


def candidates(
    x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, visit: torch.Tensor
) -> dict[str, Callable[[], torch.Tensor]]:
    """Each candidate as a closure: the shared linear plus its LoRA term."""
    base = torch.nn.functional.linear
    return {
        "base": lambda: base(x, weight),
        "uniform": lambda: base(x, weight) + lora_delta(x, a, b, 1),
        "stacked": lambda: base(x, weight) + stacked(x, a, b, visit),
        "grouped": lambda: base(x, weight) + lora_delta(x, a, b, visit),
        "gathered": lambda: base(x, weight) + gathered(x, a, b, visit),
    }


def time_call(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--rows", default="16,64,256", help="tokens per depth-mixed batch")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    results = []
    header = f"{'linear':<9}{'rows':>6}" + "".join(f"{name:>10}" for name in ("base", "uniform", "stacked", "grouped", "gathered"))
    print(f"LoRA rank {RANK}, {VISITS} visits, microseconds per call (shared linear + LoRA term), {torch.get_num_threads()} thread(s)")
    print(header + f"{'grouped/stacked':>17}")
    for label, (fan_in, fan_out) in SHAPES.items():
        weight = torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5
        a = torch.randn(VISITS, RANK, fan_in, generator=generator) / fan_in**0.5
        b = torch.randn(VISITS, fan_out, RANK, generator=generator) / RANK**0.5
        for rows in (int(n) for n in args.rows.split(",")):
            x = torch.randn(1, rows, fan_in, generator=generator)
            visit = (torch.arange(rows) % VISITS)[None]  # every visit present, interleaved as a mixed batch is
            reference = stacked(x, a, b, visit)
            assert torch.allclose(lora_delta(x, a, b, visit), reference, atol=1e-4)
            assert torch.allclose(gathered(x, a, b, visit), reference, atol=1e-4)
            micros = {name: time_call(fn, args.repeats) for name, fn in candidates(x, weight, a, b, visit).items()}
            results.append({"linear": label, "in": fan_in, "out": fan_out, "rows": rows, "us": micros})
            cells = "".join(f"{value:>10.1f}" for value in micros.values())
            print(f"{label:<9}{rows:>6}{cells}{micros['grouped'] / micros['stacked']:>17.2f}")
    report = {"rank": RANK, "visits": VISITS, "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "results": results}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
