"""The paper's hypothetical throughput (Bae et al. 2024, Appendix K), to set beside measured numbers.

Two measured ingredients: the time of one loop step and of the exit head as a function of batch
size, and per-token exit loops (oracle, or the exit policy's) from held-out text. A discrete-event
simulation then schedules requests under each batching policy with those costs; nothing is run
through the engine, which is exactly the gap the measured benchmark closes.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from recursify.modeling.model import RecursiveModel
from recursify.serving.engine import Engine
from recursify.serving.exit_policy import HEAD_SIGNALS, SIGNALS, ExitPolicy

BATCH_SIZES = (1, 2, 4, 8, 16, 32)


@dataclass
class StepCosts:
    """Seconds per loop step and per exit-head call, measured at a few batch sizes and interpolated."""

    batch_sizes: list[int]
    loop_s: list[float]
    head_s: list[float]

    def loop(self, batch: int) -> float:
        return _interpolate(self.batch_sizes, self.loop_s, batch)

    def head(self, batch: int) -> float:
        return _interpolate(self.batch_sizes, self.head_s, batch) if batch else 0.0


def _interpolate(xs: list[int], ys: list[float], x: float) -> float:
    if x <= xs[0]:
        return ys[0] * x / xs[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1] * x / xs[-1]


@torch.no_grad()
def measure_step_costs(model: RecursiveModel, batch_sizes: tuple[int, ...] = BATCH_SIZES, context: int = 48, repeats: int = 3) -> StepCosts:
    """Decode-step time of one loop through the engine's runner at each batch size, and of the exit head."""
    loop_s, head_s = [], []
    for batch in batch_sizes:
        engine = Engine(model, batching="sequence", max_batch=batch, exit="none", max_kv_tokens=batch * (context + 64))
        for i in range(batch):
            engine.add_request([(7 * i + j) % 1000 + 1 for j in range(context)], max_new_tokens=64, stop_token_ids=[])
        for _ in range(model.loops):  # prefill
            engine.step()
        start = time.perf_counter()
        steps = repeats * model.loops
        for _ in range(steps):
            engine.step()
        loop_s.append((time.perf_counter() - start) / steps)
        hidden = torch.randn(batch, model.arch.hidden_size)
        start = time.perf_counter()
        for _ in range(repeats):
            model.head(hidden)
        head_s.append((time.perf_counter() - start) / repeats)
    return StepCosts(list(batch_sizes), loop_s, head_s)


@torch.no_grad()
def exit_trajectories(model: RecursiveModel, tokens: torch.Tensor, policy: ExitPolicy | None, window: int = 256) -> list[int]:
    """Per held-out position, the loops a token would run: oracle (policy None) or the given signal policy."""
    from recursify.evaluation.calibration import collect_exit_data, exit_loops
    from recursify.evaluation.exits import oracle_exit_loops

    data = collect_exit_data(model, tokens, window)
    if policy is None:
        return oracle_exit_loops(data.exit_tokens.T).tolist()
    thresholds = torch.tensor([policy.threshold(loop) for loop in range(model.loops - 1)])
    return (exit_loops(policy.kind, data.scores[policy.kind], thresholds) + 1).tolist()


def simulate_throughput(
    costs: StepCosts, loops: int, lengths: list[int], trajectory: list[int] | None, batching: str, max_batch: int, head_every_loop: bool
) -> float:
    """Tokens per simulated second for requests of ``lengths`` tokens (all queued at t=0).

    ``trajectory`` gives each successive token's loop count (None: every token runs all loops).
    Depth-wise batching refills a slot at every loop boundary; sequence-wise at token boundaries,
    with exited tokens idling until the round ends; static only when the batch is empty.
    """
    source = iter(trajectory * (sum(lengths) // max(len(trajectory), 1) + 1)) if trajectory else None
    queue = list(lengths)
    running: list[list[int]] = []  # [tokens left, loops this token needs, loop it is at]
    clock, done = 0.0, 0

    def draw() -> int:
        return next(source) if source else loops

    def admit() -> None:
        while queue and len(running) < max_batch:
            running.append([queue.pop(0), draw(), 0])

    admit()
    while running:
        active = [r for r in running if r[2] < r[1]]
        checks = sum(1 for r in active if head_every_loop or r[2] + 1 == r[1])
        clock += costs.loop(len(active)) + costs.head(checks)
        for r in active:
            r[2] += 1
            if r[2] == r[1]:
                r[0] -= 1
                done += 1
                if batching == "depthwise":  # the next token starts at loop 0 in the next step
                    r[1], r[2] = draw(), 0
        running[:] = [r for r in running if r[0] > 0]
        round_over = all(r[2] >= r[1] for r in running)
        if batching != "depthwise" and round_over:  # lock step: every token of the batch has left the stack
            for r in running:
                r[1], r[2] = draw(), 0
        if batching == "depthwise" or (batching == "sequence" and round_over) or not running:
            admit()
    return done / clock


def simulate(
    model: RecursiveModel, tokens: torch.Tensor, policy: ExitPolicy, lengths: list[int], max_batch: int, seed: int = 0
) -> dict[str, Any]:
    """Simulated throughputs and speedups for the same rows as the measured benchmark."""
    costs = measure_step_costs(model, tuple(b for b in BATCH_SIZES if b <= max_batch) or (1,))
    oracle = exit_trajectories(model, tokens, None)
    confident = exit_trajectories(model, tokens, policy) if policy.kind in SIGNALS else None
    random.Random(seed).shuffle(oracle)
    B = model.loops
    rows = {
        "static": simulate_throughput(costs, B, lengths, None, "static", max_batch, False),
        "sequence": simulate_throughput(costs, B, lengths, None, "sequence", max_batch, False),
        "depthwise": simulate_throughput(costs, B, lengths, None, "depthwise", max_batch, False),
        "sequence+oracle": simulate_throughput(costs, B, lengths, oracle, "sequence", max_batch, False),
        "depthwise+oracle": simulate_throughput(costs, B, lengths, oracle, "depthwise", max_batch, False),
    }
    if confident is not None:  # confidence and ensemble run the head at every loop; gate and saturation once per token
        rows[f"depthwise+{policy.kind}"] = simulate_throughput(
            costs, B, lengths, confident, "depthwise", max_batch, policy.kind in HEAD_SIGNALS
        )
    return {
        "tokens_per_s": rows,
        "vs_static": {name: value / rows["static"] for name, value in rows.items()},
        "vs_sequence": {name: value / rows["sequence"] for name, value in rows.items()},
        "mean_oracle_loops": sum(oracle) / len(oracle),
        "mean_policy_loops": (sum(confident) / len(confident)) if confident else None,
        "positions": len(oracle),
        "step_costs": {
            "batch_sizes": costs.batch_sizes,
            "loop_ms": [1000 * s for s in costs.loop_s],
            "head_ms": [1000 * s for s in costs.head_s],
        },
        "note": "vanilla rows are simulated with the recursive model's own step cost (same depth), as in the paper's appendix K",
    }


def format_simulation(report: dict[str, Any], loops: int) -> str:
    """``recursify simulate``'s table: tokens/s per policy, its ratios to static and sequence-wise batching, oracle loops."""
    lines = [f"{'policy':<24}{'tokens/s':>10}{'x static':>10}{'x sequence':>12}"]
    for name, value in report["tokens_per_s"].items():
        lines.append(f"{name:<24}{value:>10.1f}{report['vs_static'][name]:>10.2f}{report['vs_sequence'][name]:>12.2f}")
    lines.append(f"mean loops per token: oracle {report['mean_oracle_loops']:.2f} of {loops} over {report['positions']} held-out positions")
    return "\n".join(lines)
