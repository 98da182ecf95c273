"""Benchmark rows measured outside the engine, on the same workload: generate-style decoding in static batches.

- the model's own ``generate``: plain greedy and self-speculative (modeling/speculative.py), at a
  given batch size, so row 7 compares speculation with greedy decoding of the same model at the same
  batch and checks the output is identical;
- Hugging Face transformers' own ``generate`` of the original model (the peer the engine serving the
  original is held against), and its ``assistant_early_exit`` self-speculation (LayerSkip's), where
  it runs on the model.

Requests are taken in arrival order in groups of ``batch``, left-padded, and each group generates
the longest of its requested lengths with no stop token (as the engine rows do); only each request's
own tokens count. Timing is the wall time of the ``generate`` calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from recursify.config import SpeculativeConfig
from recursify.modeling.model import RecursiveModel
from recursify.modeling.speculative import SpeculativeStats
from recursify.serving.benchmark import RowResult, Workload


def _groups(workload: Workload, batch: int, requests: int | None) -> list[list[int]]:
    order = sorted(range(len(workload.prompts)), key=lambda i: workload.arrivals[i])[:requests]
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def _left_padded(prompts: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _row(
    name: str, label: str, batching: str, exit_rule: str, wall: float, tokens: int, steps: int, batch: float, counts: dict[str, float]
) -> RowResult:
    return RowResult(
        name=name, model=label, batching=batching, exit=exit_rule, kv_mode="-", tokens_per_s=tokens / wall, ttft_p50_ms=None,
        ttft_p99_ms=None, tpot_p50_ms=None, tpot_p99_ms=None, mean_loops=counts.pop("mean_loops"), agreement=None, wall_s=wall,
        tokens=tokens, steps=steps, mean_batch=batch, scheduler_share=0.0, counts=counts,
    )  # fmt: skip


def _run_groups(
    workload: Workload, batch: int, requests: int | None, pad: int, decode: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
) -> tuple[dict[str, list[int]], float, dict[str, int]]:
    """Run ``decode(ids, mask, new_tokens) -> [rows, width + new_tokens]`` per group; outputs, seconds and padded sizes."""
    outputs: dict[str, list[int]] = {}
    wall = 0.0
    sizes = {"prompt_rows": 0, "decode_rows": 0, "forwards": 0}
    for group in _groups(workload, batch, requests):
        ids, mask = _left_padded([workload.prompts[i] for i in group], pad)
        new = max(workload.max_new_tokens[i] for i in group)
        start = time.perf_counter()
        out = decode(ids, mask, new)
        wall += time.perf_counter() - start
        for row, i in enumerate(group):
            outputs[f"w{i}"] = out[row, ids.shape[1] : ids.shape[1] + workload.max_new_tokens[i]].tolist()
        sizes["prompt_rows"] += ids.numel()
        sizes["decode_rows"] += len(group) * (new - 1)
        sizes["forwards"] += new
    return outputs, wall, sizes


@torch.no_grad()
def generate_row(
    name: str,
    model: RecursiveModel,
    label: str,
    workload: Workload,
    batch: int,
    speculative: SpeculativeConfig | None = None,
    requests: int | None = None,
) -> tuple[RowResult, dict[str, list[int]]]:
    """The model's own ``generate`` over the workload in static groups of ``batch`` (greedy, or self-speculative)."""
    stats = SpeculativeStats()
    pad = model.arch.pad_token_id if model.arch.pad_token_id is not None else 0

    def decode(ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
        options: dict[str, Any] = {"speculative": speculative, "speculative_stats": stats} if speculative else {}
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_ids=[], **options)

    outputs, wall, sizes = _run_groups(workload, batch, requests, pad, decode)
    tokens = sum(len(out) for out in outputs.values())
    loops = model.loops
    if speculative is None:  # every forward: all loops of every row, one head call
        counts = {
            "mean_loops": float(loops),
            "loop_passes": (sizes["prompt_rows"] + sizes["decode_rows"]) * loops / tokens,
            "head_rows": (sizes["forwards"] * batch) / tokens,
            "loop_steps": sizes["forwards"] * loops / tokens,
            "head_steps": sizes["forwards"] / tokens,
        }
        return _row(name, label, f"static b{batch}", "none (greedy)", wall, tokens, sizes["forwards"], batch, counts), outputs
    b, d = speculative.draft_loops, speculative.draft_tokens
    rounds = stats.rounds
    prefills = len(_groups(workload, batch, requests))
    rows_per_round = stats.row_rounds / max(rounds, 1)
    counts = {  # a round: D + 1 one-token steps through b loops (D draft heads), one pass of D + 1 tokens through B - b (one head)
        "mean_loops": float(loops),
        "loop_passes": (sizes["prompt_rows"] * loops + rounds * rows_per_round * (d + 1) * loops) / tokens,
        "head_rows": (prefills * batch + rounds * rows_per_round * (2 * d + 1)) / tokens,
        "loop_steps": (prefills * loops + rounds * ((d + 1) * b + loops - b)) / tokens,
        "head_steps": (prefills + rounds * (d + 1)) / tokens,
        **{f"speculative_{key}": value for key, value in stats.to_dict().items()},
    }
    row = _row(name, label, f"static b{batch}", f"speculative {speculative.spec}", wall, tokens, rounds, batch, counts)
    return row, outputs


def hf_causal_lm(spec: str) -> tuple[Any, Any]:
    """Hugging Face transformers' own model (fp32, eval) and tokenizer for any ``--model`` source."""
    import transformers

    from recursify.sources import load_source

    loaded = load_source(spec)
    model = transformers.AutoModelForCausalLM.from_config(loaded.hf_config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict, strict=False)  # tied LM heads are not in the state dict
    model.tie_weights()
    return model.eval(), loaded.tokenizer


@torch.no_grad()
def hf_row(
    name: str,
    hf_model: Any,
    label: str,
    workload: Workload,
    batch: int,
    early_exit: int | None = None,
    requests: int | None = None,
) -> tuple[RowResult, dict[str, list[int]]]:
    """transformers' ``generate`` (greedy, static groups of ``batch``); with ``early_exit``, its assistant_early_exit speculation."""
    config = hf_model.config
    pad = config.pad_token_id if config.pad_token_id is not None else 0

    def decode(ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
        options: dict[str, Any] = {"assistant_early_exit": early_exit} if early_exit is not None else {}
        return hf_model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad, **options
        )

    outputs, wall, sizes = _run_groups(workload, batch, requests, pad, decode)
    tokens = sum(len(out) for out in outputs.values())
    counts = {  # plain generate: every forward runs the whole model on every row and the head once (assisted: not counted)
        "mean_loops": 1.0,
        "loop_passes": (sizes["prompt_rows"] + sizes["decode_rows"]) / tokens,
        "head_rows": sizes["forwards"] * batch / tokens,
        "loop_steps": sizes["forwards"] / tokens,
        "head_steps": sizes["forwards"] / tokens,
    }
    rule = f"assistant_early_exit={early_exit}" if early_exit is not None else "none (greedy)"
    return _row(name, label, f"transformers static b{batch}", rule, wall, tokens, sizes["forwards"], batch, counts), outputs
