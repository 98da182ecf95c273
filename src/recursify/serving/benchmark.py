"""Measured serving throughput: one workload replayed through engines with different policies.

A workload is fixed by a seed (prompt and output lengths, arrival times); every row replays the
same one in real time, so rows differ only in the model, batching, exit policy and KV mode.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch

from recursify.config import SpeculativeConfig
from recursify.data import load_tokens
from recursify.errors import ConfigError
from recursify.modeling.model import RecursiveModel
from recursify.serving.config import EngineConfig
from recursify.serving.engine import Engine, EngineStats, RequestOutput
from recursify.serving.exit_policy import parse_exit_policy
from recursify.serving.roofline import ModelSizes, Roofline, measure_roofline, token_cost
from recursify.serving.simulate import simulate
from recursify.text import precision_context, require_tokenizer

ROW5, ROW6 = "5 recursive depthwise+exit", "6 relaxed depthwise+exit"

# Plain English to cut prompts from (the model's tokenizer turns it into ids).
PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type made books cheaper and faster "
    "to produce. Within a few decades printers in many European cities were producing pamphlets, calendars and bibles. "
    "Scholars argue about how quickly literacy spread, but the number of surviving books suggests that demand grew "
    "steadily. Paper mills expanded along rivers, and merchants carried printed sheets along trade routes. Governments "
    "soon learned to license presses, while reformers used cheap tracts to reach readers who had never owned a book. "
    "In the following centuries newspapers, scientific journals and novels changed how people learned about the world, "
    "and the steam press of the nineteenth century lowered costs again. Today the same questions return with digital "
    "publishing: who may print, who pays, and how readers decide what to trust."
)


@dataclass
class Workload:
    """Requests to replay: token prompts, output lengths and arrival offsets (seconds from the start)."""

    prompts: list[list[int]]
    max_new_tokens: list[int]
    arrivals: list[float]
    description: dict[str, Any] = field(default_factory=dict)


def parse_arrival(spec: str) -> float | None:
    """``all`` (every request at t=0) -> None, ``poisson:R`` -> R requests per second."""
    if spec == "all":
        return None
    kind, _, rate = spec.partition(":")
    try:
        value = float(rate)
    except ValueError:
        value = -1.0
    if kind != "poisson" or value <= 0:
        raise ConfigError(f"--arrival must be 'all' or 'poisson:RATE' with RATE > 0 requests/s, got {spec!r}")
    return value


def make_workload(
    tokenizer: Any,
    requests: int,
    arrival: str,
    seed: int = 0,
    prompt_tokens: tuple[int, int] = (8, 48),
    new_tokens: tuple[int, int] = (16, 32),
) -> Workload:
    """Mixed prompt and output lengths drawn with ``seed``; Poisson arrivals have exponential gaps."""
    if requests < 1:
        raise ConfigError(f"--requests must be positive, got {requests}")
    rate = parse_arrival(arrival)
    rng, arrival_rng = random.Random(seed), random.Random(seed + 1)  # arrivals never change the prompts drawn
    ids = list(tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"])
    prompts, lengths, arrivals, clock = [], [], [], 0.0
    for _ in range(requests):
        size = rng.randint(*prompt_tokens)
        start = rng.randrange(0, max(1, len(ids) - size))
        prompts.append(ids[start : start + size])
        lengths.append(rng.randint(*new_tokens))
        arrivals.append(clock)
        if rate is not None:
            clock += arrival_rng.expovariate(rate)
    description = {
        "requests": requests,
        "arrival": arrival,
        "seed": seed,
        "prompt_tokens": list(prompt_tokens),
        "new_tokens": list(new_tokens),
    }
    return Workload(prompts, lengths, arrivals, description)


@dataclass
class RowResult:
    """One measured configuration (field names are the JSON schema of ``bench-serve --json``).

    ``agreement`` is token-level: the fraction of generated tokens equal to the served model's own
    full-depth greedy token after the same prefix (recomputed by teacher forcing; what exit
    calibration targets); ``positional_agreement`` compares position by position with the same
    model's no-exit output (stricter: one early divergence changes the rest of a greedy
    continuation). Engine rows only; latencies are None for rows measured through ``generate``.
    """

    name: str
    model: str
    batching: str
    exit: str
    kv_mode: str
    tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p99_ms: float | None
    mean_loops: float
    agreement: float | None
    wall_s: float
    tokens: int
    steps: int
    mean_batch: float
    scheduler_share: float
    positional_agreement: float | None = None
    target_agreement: float | None = None
    identical_output: bool | None = None
    counts: dict[str, float] = field(default_factory=dict)  # per generated token: loop_passes, head_rows, loop_steps, head_steps
    roofline: dict[str, float] = field(default_factory=dict)  # flops/bytes per token, bound tokens/s, fractions of each bound

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def replay(engine: Engine, workload: Workload, progress: Callable[[int], None] | None = None) -> tuple[dict[str, RequestOutput], float]:
    """Submit requests at their arrival times (real time) and run the engine until all finish."""
    order = sorted(range(len(workload.prompts)), key=lambda i: workload.arrivals[i])
    outputs: dict[str, RequestOutput] = {}
    start = time.perf_counter()
    while order or engine.has_unfinished():
        now = time.perf_counter() - start
        while order and workload.arrivals[order[0]] <= now:
            i = order.pop(0)
            engine.add_request(
                workload.prompts[i],
                workload.max_new_tokens[i],
                stop_token_ids=[],
                request_id=f"w{i}",
                arrival_time=start + workload.arrivals[i],
            )
        if not engine.has_unfinished():
            time.sleep(max(0.0, workload.arrivals[order[0]] - now))
            continue
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
                if progress is not None:
                    progress(1)
    return outputs, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return float(torch.tensor(values, dtype=torch.float64).quantile(q)) if values else float("nan")


def measure(
    name: str, model: RecursiveModel, label: str, config: EngineConfig, workload: Workload, reference: dict[str, list[int]] | None = None
) -> tuple[RowResult, dict[str, list[int]]]:
    """Replay the workload through a fresh engine; latency and throughput from the engine's own timestamps."""
    engine = Engine(model, config)
    outputs, wall = replay(engine, workload)
    tokens = sum(len(out.token_ids) for out in outputs.values())
    ttft = [1000 * (out.first_token_time - out.arrival_time) for out in outputs.values() if out.first_token_time is not None]
    tpot = [
        1000 * (out.finish_time - out.first_token_time) / (len(out.token_ids) - 1)
        for out in outputs.values()
        if out.finish_time is not None and out.first_token_time is not None and len(out.token_ids) > 1
    ]
    loops = [loop for out in outputs.values() for loop in out.loops_run]
    generated = {rid: out.token_ids for rid, out in outputs.items()}
    stats = engine.stats
    counts = {
        "loop_passes": stats.row_loops / max(tokens, 1),
        "head_rows": stats.head_rows / max(tokens, 1),
        "loop_steps": stats.steps / max(tokens, 1),
        "head_steps": stats.head_steps / max(tokens, 1),
    }
    row = RowResult(
        name=name,
        model=label,
        batching=config.batching,
        exit=config.exit,
        kv_mode=config.kv_mode,
        tokens_per_s=tokens / wall,
        ttft_p50_ms=percentile(ttft, 0.5),
        ttft_p99_ms=percentile(ttft, 0.99),
        tpot_p50_ms=percentile(tpot, 0.5),
        tpot_p99_ms=percentile(tpot, 0.99),
        mean_loops=sum(loops) / max(len(loops), 1),
        agreement=None,
        positional_agreement=agreement(generated, reference) if reference is not None else None,
        target_agreement=engine.policy.target,
        wall_s=wall,
        tokens=tokens,
        steps=stats.steps,
        mean_batch=stats.items / max(stats.steps, 1),
        scheduler_share=(stats.schedule_s + stats.update_s) / max(stats.schedule_s + stats.update_s + stats.execute_s, 1e-9),
        counts=counts,
    )
    return row, generated


@torch.no_grad()
def token_agreement(model: RecursiveModel, workload: Workload, outputs: dict[str, list[int]], precision: str = "fp32") -> float:
    """Fraction of generated tokens equal to ``model``'s full-depth greedy token after the same prefix (teacher forcing)."""
    same = total = 0
    for i, prompt in enumerate(workload.prompts):
        tokens = outputs.get(f"w{i}", [])
        if not tokens:
            continue
        with precision_context(precision, model.device):
            logits = model(torch.tensor([prompt + tokens[:-1]], device=model.device)).logits[0, len(prompt) - 1 :]
        same += int((logits.argmax(-1).cpu() == torch.tensor(tokens)).sum())
        total += len(tokens)
    return same / max(total, 1)


def agreement(outputs: dict[str, list[int]], reference: dict[str, list[int]]) -> float:
    """Fraction of generated tokens equal to the reference's token at the same position of the same request."""
    same = total = 0
    for rid, ref in reference.items():
        got = outputs.get(rid, [])
        total += len(ref)
        same += sum(a == b for a, b in zip(got, ref, strict=False))
    return same / max(total, 1)


def format_table(rows: list[RowResult], ratios: dict[str, dict[str, float]]) -> str:
    header = (
        f"{'row':<36}{'tok/s':>8}{'x static':>9}{'x seq':>7}{'TTFT p50/p99 ms':>18}{'TPOT p50/p99 ms':>18}"
        f"{'loops':>7}{'agree':>7}{'pos.':>7}{'batch':>7}{'%comp':>7}{'%mem':>7}"
    )
    lines = [header, "-" * len(header)]

    def number(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for row in rows:
        ttft = "-" if row.ttft_p50_ms is None else f"{row.ttft_p50_ms:.0f}/{row.ttft_p99_ms:.0f}"
        tpot = "-" if row.tpot_p50_ms is None else f"{row.tpot_p50_ms:.0f}/{row.tpot_p99_ms:.0f}"
        compute, memory = row.roofline.get("compute_fraction"), row.roofline.get("memory_fraction")
        lines.append(
            f"{row.name:<36}{row.tokens_per_s:>8.1f}{ratios['vs_static'][row.name]:>9.2f}{ratios['vs_sequence'][row.name]:>7.2f}"
            f"{ttft:>18}{tpot:>18}{row.mean_loops:>7.2f}{number(row.agreement):>7}{number(row.positional_agreement):>7}"
            f"{row.mean_batch:>7.1f}{number(100 * compute if compute is not None else None, 0):>7}"
            f"{number(100 * memory if memory is not None else None, 0):>7}"
        )
    return "\n".join(lines)


@dataclass
class ExtraRows:
    """Rows beside the engine's baseline rows, all measured in the same rounds.

    Attributes:
        exits: row name -> exit spec of more depth-wise rows of the recursive model (5g gates, 5s
            saturation, 5e exit ensemble; e.g. ``agreement:0.95:gate``).
        speculative: row 7: self-speculative decoding vs greedy ``generate`` of the recursive model,
            at each of ``speculative_batches`` (static groups), plus the original's greedy at batch 1.
        single_requests: requests the batch-1 rows decode (one at a time: the slowest rows).
        transformers: the baseline as Hugging Face transformers' own model: row 8, its ``generate``
            at ``max_batch`` (static groups), and at batch 1 with and without ``assistant_early_exit``.
        transformers_early_exit: the layer its early-exit self-speculation drafts from (None: skip).
    """

    exits: dict[str, str] = field(default_factory=dict)
    speculative: SpeculativeConfig | None = None
    speculative_batches: tuple[int, ...] = (1, 4)
    single_requests: int | None = 8
    transformers: Any | None = None
    transformers_early_exit: int | None = None


@dataclass
class _Plan:
    name: str
    run: Callable[[], tuple[RowResult, dict[str, list[int]]]]
    model: RecursiveModel  # whose sizes price the row (and whose greedy tokens its agreement is measured against)
    reference: str | None = None  # the row whose outputs are the positional reference
    identical_to: str | None = None  # the row whose outputs must be identical (self-speculation vs greedy)
    exits: bool = False  # a recursive engine row: measure its token agreement


def bench_serve(
    model: RecursiveModel,
    baseline: RecursiveModel,
    workload: Workload,
    exit_spec: str = "confidence:0.9",
    max_batch: int = 32,
    precision: str = "fp32",
    model_label: str = "recursive",
    baseline_label: str = "vanilla",
    log: Callable[[str], None] = print,
    relaxed: RecursiveModel | None = None,
    relaxed_label: str = "relaxed",
    relaxed_exit: str | None = None,
    rounds: int = 1,
    extra: ExtraRows | None = None,
) -> dict[str, Any]:
    """The issue's rows on one workload: vanilla static/sequence vs recursive sequence/depth-wise, with and without exits.

    Rows 5k (KV ``share`` instead of ``propagate`` for exited tokens) and 5q (sequence-wise with
    exits) isolate what each ingredient gives; ``extra`` adds more exit rules (5g, 5s, 5e),
    self-speculation (7) and transformers' own generate (8); with ``relaxed``, row 6n (the relaxed
    model without exits) and row 6 (relaxed, depth-wise + exit) follow; ``relaxed_exit`` (default
    ``exit_spec``) is row 6's rule. With ``rounds`` > 1 every row runs again in each round and keeps
    its fastest round (outputs are deterministic; only timing varies), the usual best-of-N on a
    machine shared with other jobs.
    """
    if baseline.loops != 1:
        raise ConfigError(f"--baseline must be the original model (loops=1), got one with {baseline.loops} loops")
    extra = extra or ExtraRows()

    def engine(served: RecursiveModel, label: str, batching: str, rule: str, kv_mode: str, reference: str | None, name: str) -> _Plan:
        config = EngineConfig(batching=batching, max_batch=max_batch, exit=rule, kv_mode=kv_mode, precision=precision)
        return _Plan(
            name,
            lambda: measure(name, served, label, config, workload),
            served,
            reference,
            exits=served.loops > 1,
        )

    plans = [
        engine(baseline, baseline_label, "static", "none", "propagate", None, "1 vanilla static"),
        engine(baseline, baseline_label, "sequence", "none", "propagate", "1 vanilla static", "2 vanilla sequence"),
        engine(model, model_label, "sequence", "none", "propagate", None, "3 recursive sequence"),
        engine(model, model_label, "depthwise", "none", "propagate", "3 recursive sequence", "4 recursive depthwise"),
        engine(model, model_label, "depthwise", exit_spec, "propagate", "3 recursive sequence", ROW5),
        engine(model, model_label, "depthwise", exit_spec, "share", "3 recursive sequence", "5k recursive depthwise+exit share"),
        engine(model, model_label, "sequence", exit_spec, "propagate", "3 recursive sequence", "5q recursive sequence+exit"),
    ]
    plans += [
        engine(model, model_label, "depthwise", rule, "propagate", "3 recursive sequence", name) for name, rule in extra.exits.items()
    ]
    if relaxed is not None:
        plans += [
            engine(relaxed, relaxed_label, "depthwise", "none", "propagate", None, "6n relaxed depthwise"),
            engine(relaxed, relaxed_label, "depthwise", relaxed_exit or exit_spec, "propagate", "6n relaxed depthwise", ROW6),
        ]
    plans += _generate_plans(model, model_label, baseline, baseline_label, workload, max_batch, extra)
    best: dict[str, RowResult] = {}
    outputs: dict[str, dict[str, list[int]]] = {}
    for _ in range(rounds):  # whole rounds, so that load drift on a shared machine hits every row alike
        for plan in plans:
            row, outputs[plan.name] = plan.run()
            log(f"{plan.name}: {row.tokens_per_s:.1f} tokens/s, mean loops {row.mean_loops:.2f}, {row.wall_s:.1f}s")
            if plan.name not in best or row.tokens_per_s > best[plan.name].tokens_per_s:
                best[plan.name] = row
    for plan in plans:  # outputs are the same every round: compare them once
        row = best[plan.name]
        if plan.reference is not None:
            row.positional_agreement = agreement(outputs[plan.name], outputs[plan.reference])
        if plan.exits:
            row.agreement = token_agreement(plan.model, workload, outputs[plan.name], precision)
        if plan.identical_to is not None:
            row.identical_output = outputs[plan.name] == {rid: outputs[plan.identical_to][rid] for rid in outputs[plan.name]}
    rows = [best[plan.name] for plan in plans]
    static, sequence = best["1 vanilla static"].tokens_per_s, best["2 vanilla sequence"].tokens_per_s
    ratios: dict[str, Any] = {
        "vs_static": {row.name: row.tokens_per_s / static for row in rows},
        "vs_sequence": {row.name: row.tokens_per_s / sequence for row in rows},
    }
    if relaxed is not None:
        ratios["row6/row5"] = best[ROW6].tokens_per_s / best[ROW5].tokens_per_s
    ratios.update(_peer_ratios(best))
    return {
        "workload": workload.description,
        "rows": [row.to_dict() for row in rows],
        "ratios": ratios,
        "models": {plan.name: plan.model for plan in plans},  # for pricing; dropped before the report is written
    }


def _generate_plans(
    model: RecursiveModel, label: str, baseline: RecursiveModel, baseline_label: str, workload: Workload, max_batch: int, extra: ExtraRows
) -> list[_Plan]:
    """Row 7 (self-speculation vs greedy generate, per batch size) and row 8 (transformers' generate)."""
    from recursify.serving.benchmark_peers import generate_row, hf_row

    plans: list[_Plan] = []
    single = extra.single_requests
    if extra.speculative is not None:
        config = extra.speculative
        for batch in extra.speculative_batches:
            requests = single if batch == 1 else None
            greedy, spec = f"7g recursive greedy b{batch}", f"7 recursive speculative {config.spec} b{batch}"
            plans.append(_Plan(greedy, partial(generate_row, greedy, model, label, workload, batch, None, requests), model))
            plans.append(
                _Plan(spec, partial(generate_row, spec, model, label, workload, batch, config, requests), model, identical_to=greedy)
            )
        name = "7v vanilla greedy b1"
        plans.append(_Plan(name, lambda: generate_row(name, baseline, baseline_label, workload, 1, None, single), baseline))
    if extra.transformers is not None:
        hf = extra.transformers
        name8 = f"8 transformers static b{max_batch}"
        plans.append(_Plan(name8, lambda: hf_row(name8, hf, baseline_label, workload, max_batch), baseline))
        if extra.transformers_early_exit is not None:
            greedy, early = "8g transformers greedy b1", f"8e transformers early-exit@{extra.transformers_early_exit} b1"
            plans.append(_Plan(greedy, lambda: hf_row(greedy, hf, baseline_label, workload, 1, None, single), baseline))
            plans.append(
                _Plan(
                    early,
                    lambda: hf_row(early, hf, baseline_label, workload, 1, extra.transformers_early_exit, single),
                    baseline,
                    identical_to=greedy,
                )
            )
    return plans


def _peer_ratios(best: dict[str, RowResult]) -> dict[str, float]:
    """Row 7's and row 8's ratios: speculation vs greedy at equal batch, the engine vs transformers at equal batch."""
    ratios = {}
    for name, row in best.items():
        if name.startswith("7 recursive speculative"):
            batch = name.rsplit(" b", 1)[1]
            ratios[f"speculative_b{batch}_vs_greedy"] = row.tokens_per_s / best[f"7g recursive greedy b{batch}"].tokens_per_s
            if batch == "1" and "7v vanilla greedy b1" in best:
                ratios["speculative_b1_vs_vanilla_greedy"] = row.tokens_per_s / best["7v vanilla greedy b1"].tokens_per_s
        if name.startswith("8 transformers static"):
            ratios["engine_static_vs_transformers"] = best["1 vanilla static"].tokens_per_s / row.tokens_per_s
        if name.startswith("8e transformers early-exit"):
            ratios["transformers_early_exit_vs_greedy"] = row.tokens_per_s / best["8g transformers greedy b1"].tokens_per_s
    return ratios


def price_rows(run: dict[str, Any], roofline: Roofline, workload: Workload) -> None:
    """Every row's FLOPs and bytes per generated token (serving/roofline.py) and its fraction of either bound."""
    context = sum(len(p) + n / 2 for p, n in zip(workload.prompts, workload.max_new_tokens, strict=True)) / len(workload.prompts)
    models = run.pop("models")
    for row in run["rows"]:
        counts = row["counts"]
        if "loop_passes" not in counts:
            continue
        sizes = ModelSizes.of(models[row["name"]])
        cost = token_cost(sizes, counts["loop_passes"], counts["head_rows"], counts["loop_steps"], counts["head_steps"], context)
        compute_bound = roofline.matmul_flops_per_s / cost["flops"]
        memory_bound = roofline.memory_bytes_per_s / cost["bytes"]
        row["roofline"] = {
            "flops_per_token": cost["flops"],
            "bytes_per_token": cost["bytes"],
            "compute_bound_tokens_per_s": compute_bound,
            "memory_bound_tokens_per_s": memory_bound,
            "compute_fraction": row["tokens_per_s"] / compute_bound,
            "memory_fraction": row["tokens_per_s"] / memory_bound,
        }
    run["table"] = format_table([RowResult(**row) for row in run["rows"]], run["ratios"])


@torch.no_grad()
def measure_overhead(
    model: RecursiveModel, batch: int = 16, context: int = 32, tokens: int = 8, precision: str = "fp32"
) -> dict[str, float]:
    """Engine overhead at ``batch``: a decode token through the engine vs the bare model's cached forward.

    Both decode the same ``batch`` sequences of ``context`` tokens, one token each round, in the
    same precision; rounds alternate between the two so load drift hits both alike. The bare model
    forward (per-depth KV cache, all loops, one head call) is the model math plus the least
    bookkeeping any decoder needs; everything the engine spends beyond it per token (scheduling,
    packing rows, KV pool writes and gathers, exit bookkeeping, sampling, outputs) is overhead.
    """
    prompts = torch.randint(1, model.arch.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
    engine = Engine(
        model, batching="depthwise", max_batch=batch, exit="none", precision=precision, max_kv_tokens=batch * (context + tokens + 16)
    )
    for prompt in prompts.tolist():
        engine.add_request(prompt, max_new_tokens=tokens + 2, stop_token_ids=[])
    cache = model.new_cache(batch, context + tokens + 2)
    with precision_context(precision, model.device):
        next_ids = model(prompts, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(model.loops):  # prefill: the first token
        engine.step()
    engine.stats = EngineStats()
    engine_s = model_s = 0.0
    for _ in range(tokens):
        start = time.perf_counter()
        for _ in range(model.loops):
            engine.step()
        middle = time.perf_counter()
        with precision_context(precision, model.device):
            next_ids = model(next_ids, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        engine_s, model_s = engine_s + middle - start, model_s + time.perf_counter() - middle
    stats = engine.stats
    return {
        "batch": batch,
        "context": context,
        "engine_token_ms": 1000 * engine_s / tokens,
        "model_token_ms": 1000 * model_s / tokens,
        "engine_step_ms": 1000 * engine_s / (tokens * model.loops),
        "overhead_fraction": max(0.0, 1 - model_s / engine_s),
        "schedule_update_fraction": (stats.schedule_s + stats.update_s) / engine_s,
    }


def open_or_keep(model: RecursiveModel | str) -> RecursiveModel:
    """A model object as is; a checkpoint directory or model source opened (sources run as originals)."""
    if isinstance(model, RecursiveModel):
        return model
    from recursify.loading import load

    return load(model)


def exit_rows(model: RecursiveModel, target: float) -> dict[str, str]:
    """Rows 5g / 5s / 5e: gate, saturation and exit-ensemble exits at calibrated agreement ``target``, where the model has them."""
    calibration = model.addons.calibration
    if calibration is None:
        return {}
    curves = calibration["signals"]
    rows = {}
    for name, signal, present in (
        ("5g recursive depthwise+gate", "gate", model.addons.gates is not None),
        ("5s recursive depthwise+saturation", "saturation", True),
        ("5e recursive depthwise+ensemble", "ensemble", model.addons.ensemble is not None),
    ):
        if present and signal in curves:
            rows[name] = f"agreement:{target:g}:{signal}"
    return rows


def serving_benchmark(
    model: RecursiveModel | str,
    baseline: RecursiveModel | str = "smollm2-135m",
    relaxed: RecursiveModel | str | None = None,
    requests: int = 32,
    arrivals: Sequence[str] = ("all", "poisson:4"),
    prompt_tokens: tuple[int, int] = (8, 48),
    new_tokens: tuple[int, int] = (16, 32),
    seed: int = 0,
    exit_spec: str = "confidence:0.9",
    relaxed_exit: str | None = None,
    rounds: int = 1,
    max_batch: int = 16,
    precision: str = "fp32",
    data: str | None = None,
    data_tokens: int = 4096,
    log: Callable[[str], None] = print,
    agreement_target: float | None = 0.95,
    speculative: SpeculativeConfig | None = None,
    speculative_batches: tuple[int, ...] = (1, 4),
    single_requests: int | None = 8,
    transformers: bool = False,
    transformers_early_exit: int | None = None,
) -> dict[str, Any]:
    """Every row on the same workload under each arrival pattern, the engine overhead, the roofline, and the simulation.

    Returns ``{"threads", "load_average", "roofline", "runs": {arrival: {"workload", "rows", "ratios",
    "table"}}, "overhead": {...}, "exits": {...}, "simulated": {...}}``. ``agreement_target`` adds rows
    5g / 5s / 5e (gate, saturation, ensemble exits at that calibrated agreement) where the model has
    the gates / ensemble and a calibration (``recursify train-exits``); ``speculative`` adds row 7
    (self-speculation vs greedy generate at ``speculative_batches``); ``transformers`` adds row 8
    (transformers' own generate of the baseline; ``transformers_early_exit``: its early-exit
    self-speculation at batch 1). Rows 7 and 8 run with the first arrival pattern only; batch-1 rows
    decode the first ``single_requests`` requests. ``simulated`` only with ``data`` (held-out text for
    exit trajectories, any ``--data`` spec; ``teacher:N`` samples the baseline). Models may be
    objects or paths/sources; ``model_label``s in the rows are the paths when given.
    """
    served, original = open_or_keep(model), open_or_keep(baseline)
    second = open_or_keep(relaxed) if relaxed is not None else None
    labels = [m if isinstance(m, str) else name for m, name in ((model, "recursive"), (baseline, "vanilla"), (relaxed, "relaxed"))]
    tokenizer = require_tokenizer(served)
    roofline = measure_roofline()
    report: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "roofline": roofline.to_dict(),
        "runs": {},
    }
    hf = None
    if transformers:
        from recursify.serving.benchmark_peers import hf_causal_lm

        hf = hf_causal_lm(baseline if isinstance(baseline, str) else original.source.spec)[0]
    exits = exit_rows(served, agreement_target) if agreement_target is not None else {}
    for index, arrival in enumerate(arrivals):
        workload = make_workload(tokenizer, requests, arrival, seed, prompt_tokens, new_tokens)
        log(f"== arrival {arrival}: {requests} requests ==")
        extra = ExtraRows(exits=exits)
        if index == 0:
            extra = ExtraRows(exits, speculative, speculative_batches, single_requests, hf, transformers_early_exit)
        run = bench_serve(
            served,
            original,
            workload,
            exit_spec,
            max_batch,
            precision,
            labels[0],
            labels[1],
            log,
            second,
            labels[2],
            relaxed_exit,
            rounds,
            extra,
        )
        price_rows(run, roofline, workload)
        report["runs"][arrival] = run
    report["overhead"] = {
        label: measure_overhead(m, max_batch, precision=precision) for label, m in (("recursive", served), ("relaxed", second)) if m
    }
    if served.addons.calibration is not None:
        calibration = served.addons.calibration
        report["exits"] = {key: calibration.get(key) for key in ("data", "split", "positions", "per_loop_agreement", "at_targets", "gates")}
        report["exits"]["policies"] = {name: _expected(served, rule) for name, rule in exits.items()}
    if data is not None:
        tokens = load_tokens(data, tokenizer, split="heldout", max_tokens=data_tokens, teacher=original)  # teacher:N samples the baseline
        lengths = make_workload(tokenizer, requests, "all", seed, prompt_tokens, new_tokens).max_new_tokens
        sim = simulate(served, tokens, parse_exit_policy(exit_spec, served.loops, served.addons), lengths, max_batch)
        measured = report["runs"][arrivals[0]]["ratios"]
        sim["measured"] = {
            "arrival": arrivals[0],
            "5 vs static": measured["vs_static"][ROW5],
            "5 vs sequence": measured["vs_sequence"][ROW5],
        }
        report["simulated"] = sim
    return report


def _expected(model: RecursiveModel, rule: str) -> dict[str, Any]:
    """What an agreement rule resolved to: its thresholds and the calibration's agreement and mean loops there."""
    policy = parse_exit_policy(rule, model.loops, model.addons)
    return {"spec": policy.spec, "target": policy.target, **(policy.expected or {})}


def format_summary(report: dict[str, Any]) -> str:
    """``bench-serve``'s printout of one workload's report: the table, peer ratios, roofline, engine overhead, the simulation."""
    overhead, ratios = report["overhead"]["recursive"], report["ratios"]
    roof = report["roofline"]
    lines = [
        report["table"],
        f"roofline ({roof['threads']} threads): {roof['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s fp32 matmul, "
        f"{roof['memory_bytes_per_s'] / 1e9:.1f} GB/s copy; %comp / %mem: each row's tokens/s over its compute / memory bound",
        f"engine overhead at batch {overhead['batch']}: {100 * overhead['overhead_fraction']:.1f}% of a decode token "
        f"({overhead['engine_token_ms']:.1f} ms vs {overhead['model_token_ms']:.1f} ms for the bare model forward)",
    ]
    for key in sorted(k for k in ratios if k not in ("vs_static", "vs_sequence")):
        lines.append(f"{key}: {ratios[key]:.2f}")
    for row in report["rows"]:
        if row["identical_output"] is not None:
            lines.append(f"{row['name']}: identical output {row['identical_output']}")
    if "simulated" in report:
        sim = report["simulated"]
        lines.append(
            f"simulated (paper's method): depthwise+oracle {sim['vs_static']['depthwise+oracle']:.2f}x static, "
            f"{sim['vs_sequence']['depthwise+oracle']:.2f}x sequence; measured row 5: {report['ratios']['vs_static'][ROW5]:.2f}x static"
        )
    return "\n".join(lines)
