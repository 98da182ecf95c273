"""Naive single-request references for the serving tests: one token at a time, one depth at a time.

Independent of the engine's packing, KV pool, batching and lazy fills: keys/values live in the core
per-depth KVCache and exits/fills are applied right where they happen.
"""

from __future__ import annotations

import torch

from recursify.modeling.model import RecursiveModel
from recursify.serving.exit_policy import ExitPolicy


@torch.no_grad()
def truncated_greedy(model: RecursiveModel, prompt: list[int], new_tokens: int, loops: int) -> list[int]:
    """Greedy decoding of the model cut after ``loops`` loops (exit head there), recomputing the whole sequence."""
    ids = list(prompt)
    for _ in range(new_tokens):
        out = model(torch.tensor([ids]), output_exits=True)
        assert out.exit_logits is not None
        ids.append(int(out.exit_logits[loops - 1][0, -1].argmax()))
    return ids[len(prompt) :]


@torch.no_grad()
def early_exit_greedy(
    model: RecursiveModel, prompt: list[int], new_tokens: int, policy: ExitPolicy, kv_mode: str
) -> tuple[list[int], list[int]]:
    """Greedy tokens and loops run per token, with early exits and propagate/share keys for skipped depths.

    A prelude runs once before the first loop; at every loop end the exit goes through the coda
    (writing its keys; a later exit of the same chunk rewrites them) and the head.
    """
    first = model.recursion.prelude
    block = sum(slot.part == "loop" for slot in model.schedule) // model.loops
    cache = model.new_cache(1, len(prompt) + new_tokens)
    chunk, outputs, loops_run = list(prompt), [], []
    for _ in range(new_tokens):
        start, seq = cache.length, len(chunk)
        positions = torch.arange(start, start + seq)[None]
        ctx = model.attention_context(torch.ones(1, start + seq, dtype=torch.long), positions, cache, torch.float32)
        h = model.embed_tokens(torch.tensor([chunk]))
        for d in range(first):
            h = model.shared_layer(d)(h, 0, d, ctx)
        for loop in range(model.loops):
            for k in range(block):
                h = model.shared_layer(first + k)(h, loop, first + loop * block + k, ctx)
            logits = model.exit_logits(h, ctx, slice(-1, None))[:, -1]
            if bool(policy.decide(logits, [loop])[0]):
                break
        for deeper in range(loop + 1, model.loops):
            for k in range(block):
                depth, layer = first + deeper * block + k, model.shared_layer(first + k)
                if kv_mode == "share":
                    key = cache.keys[first + loop * block + k, :, :, start : start + seq]  # type: ignore[index]
                    value = cache.values[first + loop * block + k, :, :, start : start + seq]  # type: ignore[index]
                else:
                    _, key, value = layer.project_qkv(layer.norm("attn_norm")(h, deeper), deeper, ctx.rope[model.arch.layer_types[depth]])
                cache.keys[depth, :, :, start : start + seq] = key  # type: ignore[index]
                cache.values[depth, :, :, start : start + seq] = value  # type: ignore[index]
        cache.advance(seq)
        token = int(logits.argmax(-1)[0])
        outputs.append(token)
        loops_run.append(loop + 1)
        chunk = [token]
    return outputs, loops_run
