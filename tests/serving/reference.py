"""Naive single-request references for the serving tests: one token at a time, one depth at a time.

Independent of the engine's packing, KV pool, batching and lazy fills: keys/values live in the core
per-depth KVCache and exits/fills are applied right where they happen.
"""

from __future__ import annotations

import torch

from recursify.modeling.model import RecursiveModel
from recursify.serving.exit_policy import ExitPolicy
from recursify.training.exit_ensemble import ensemble_log_probs


def exit_signal(
    kind: str, model: RecursiveModel, loop: int, logits: torch.Tensor, h: torch.Tensor, entering: torch.Tensor
) -> torch.Tensor | None:
    """One token's exit signal [1] from first principles: max probability, gate output, or ||h - entering|| / ||entering||."""
    if kind in ("confidence", "ensemble"):
        return torch.softmax(logits.float(), -1).amax(-1).reshape(1)
    if kind == "saturation":
        return (torch.linalg.vector_norm(h - entering) / torch.linalg.vector_norm(entering)).reshape(1)
    if kind == "gate":
        gates = model.addons.gates
        assert gates is not None
        return gates(h, entering, loop).reshape(1) if loop < model.loops - 1 else torch.ones(1)
    return None


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
    (writing its keys; a later exit of the same chunk rewrites them) and the head. The exit path
    runs at every loop here (the engine runs it only where the policy needs it).
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
        history = []
        for d in range(first):
            h = model.shared_layer(d)(h, 0, d, ctx)
        for loop in range(model.loops):
            entering = h
            for k in range(block):
                h = model.shared_layer(first + k)(h, loop, first + loop * block + k, ctx)
            logits = model.exit_logits(h, loop, ctx, slice(-1, None))[:, -1]
            history.append(logits)
            if policy.kind == "ensemble" and loop < model.loops - 1:
                logits = ensemble_log_probs(model.addons.ensemble, history, loop + 1)
            if bool(policy.decide([loop], exit_signal(policy.kind, model, loop, logits, h[0, -1], entering[0, -1]))[0]):
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
