"""Training-step throughput: recursify's CE step vs a plain transformers model, and the KD overhead.

Run: python benchmarks/uptrain_speed.py [--model smollm2-135m] [--batch 2] [--seq-len 128] [--steps 3] [--precision bf16]
All rows run in one process on the same random batch, interleaved round-robin so load drift hits
every row alike. Rows: transformers (loops=1, CE), recursify loops=1 (CE), recursify loops=3
rank-64 (CE; its per-layer-application rate is comparable since it applies as many layers), and
recursify loops=3 with forward-KL KD from the loops=1 teacher (the teacher forward is timed too).
Prints a table and writes benchmarks/results/uptrain_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from recursify.conversion.convert import convert
from recursify.sources import load_source
from recursify.text import precision_context
from recursify.training.losses import kd_divergence, next_token_ce

RESULTS = Path(__file__).parent / "results" / "uptrain_speed.json"


def step_fn(
    forward: Callable[[torch.Tensor], torch.Tensor], params: list[torch.nn.Parameter], precision: str
) -> Callable[..., dict[str, float]]:
    """One AdamW training step on ``forward``'s logits; ``teacher`` adds a forward-KL term."""
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step(ids: torch.Tensor, teacher: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        start = time.perf_counter()
        teacher_s = 0.0
        with precision_context(precision):
            logits = forward(ids)
            if teacher is not None:
                t0 = time.perf_counter()
                with torch.no_grad():
                    teacher_logits = teacher(ids)
                teacher_s = time.perf_counter() - t0
        loss = kd_divergence(logits, teacher_logits) if teacher is not None else next_token_ce(logits, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"seconds": time.perf_counter() - start, "teacher_seconds": teacher_s}

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    args = parser.parse_args()
    source = load_source(args.model)
    hf = transformers.AutoModelForCausalLM.from_config(source.hf_config, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(source.state_dict, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # a tied head is the embedding
    hf.train()
    original = convert(args.model, loops=1, progress=False).train()
    teacher = convert(args.model, loops=1, progress=False).eval().requires_grad_(False)
    recursive = convert(args.model, loops=3, init="average", rank=64, progress=False).train()
    recursive_kd = convert(args.model, loops=3, init="average", rank=64, progress=False).train()
    ids = torch.randint(0, source.hf_config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    rows = {
        "transformers loops=1 CE": (step_fn(lambda x: hf(x).logits, list(hf.parameters()), args.precision), None),
        "recursify loops=1 CE": (step_fn(lambda x: original(x).logits, list(original.parameters()), args.precision), None),
        "recursify loops=3 r64 CE": (step_fn(lambda x: recursive(x).logits, list(recursive.parameters()), args.precision), None),
        "recursify loops=3 r64 KD": (
            step_fn(lambda x: recursive_kd(x).logits, list(recursive_kd.parameters()), args.precision),
            lambda x: teacher(x).logits,
        ),
    }
    times: dict[str, list[dict[str, float]]] = {name: [] for name in rows}
    for round_index in range(args.steps + 1):  # round 0 warms up
        for name, (step, teacher_fn) in rows.items():
            result = step(ids, teacher_fn)
            if round_index > 0:
                times[name].append(result)
    tokens = args.batch * args.seq_len
    base = sum(t["seconds"] for t in times["transformers loops=1 CE"]) / args.steps
    report = {"model": args.model, "batch": args.batch, "seq_len": args.seq_len, "precision": args.precision, "steps": args.steps}
    report |= {"threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(), "rows": {}}
    print(f"{'row':<28}{'tokens/s':>10}{'vs transformers':>17}{'teacher share':>15}")
    for name, samples in times.items():
        seconds = sum(s["seconds"] for s in samples) / args.steps
        teacher_share = sum(s["teacher_seconds"] for s in samples) / sum(s["seconds"] for s in samples)
        row = {"tokens_per_s": tokens / seconds, "ratio_vs_transformers": base / seconds, "teacher_share": teacher_share}
        report["rows"][name] = row
        print(f"{name:<28}{row['tokens_per_s']:>10.1f}{row['ratio_vs_transformers']:>17.3f}{teacher_share:>15.1%}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
