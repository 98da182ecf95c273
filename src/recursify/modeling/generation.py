"""Autoregressive generation: prefill, one-token decode steps, and sampling, as separate pieces.

Batched prompts are left-padded (``attention_mask`` 0 at padding); finished rows emit the pad
token, as transformers' ``generate`` does, so outputs can be compared token for token.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from recursify.config import SamplingConfig, SpeculativeConfig
from recursify.errors import ConfigError

if TYPE_CHECKING:
    from recursify.modeling.model import RecursiveModel
    from recursify.modeling.speculative import SpeculativeStats


def sample_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token for each row of logits [batch, vocab] -> [batch]."""
    if config.temperature == 0.0:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, config), num_samples=1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The distribution ``sample_next`` draws from (temperature, top-k, top-p applied): [..., vocab] float32.

    Greedy (temperature 0) is the point mass on the argmax.
    """
    if config.temperature == 0.0:
        return nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    scores = logits.float() / config.temperature
    if config.top_k > 0:
        kth = torch.topk(scores, min(config.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Drop a token once the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.softmax(scores, dim=-1)


def stream(
    model: RecursiveModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    sampling: SamplingConfig | None = None,
    eos_token_ids: list[int] | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    speculative: SpeculativeConfig | None = None,
    speculative_stats: SpeculativeStats | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row ([batch]) until ``max_new_tokens`` or all rows hit EOS.

    Args:
        model: the model to decode with.
        input_ids: [batch, prompt_len] prompts, left-padded when lengths differ.
        attention_mask: [batch, prompt_len], 0 at padding; all ones when omitted.
        max_new_tokens: upper bound on generated tokens.
        sampling: greedy by default.
        eos_token_ids: tokens that finish a row; the model's own EOS ids when omitted. Pass []
            to never stop early.
        pad_token_id: emitted by finished rows; the model's pad (or first EOS) when omitted.
        use_cache: decode with the per-depth KV cache (True) or recompute the whole sequence.
        speculative: self-speculative decoding (modeling/speculative.py): the first loops draft,
            the rest verify; the output is exactly plain decoding's (greedy: token for token).
        speculative_stats: filled with acceptance counts when ``speculative`` is given.
    """
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    sampling = sampling or SamplingConfig()
    device = input_ids.device  # every step's tensors live with the inputs (a CPU EOS list or generator fails on CUDA)
    eos = torch.tensor(model.arch.eos_token_ids if eos_token_ids is None else eos_token_ids, dtype=torch.long, device=device)
    pad = pad_token_id if pad_token_id is not None else model.arch.pad_token_id
    pad = pad if pad is not None else (int(eos[0]) if len(eos) else 0)
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if speculative is not None:
        if not use_cache:
            raise ConfigError("speculative decoding reuses the drafts' keys/values: it needs the KV cache (drop --no-cache)")
        from recursify.modeling.speculative import speculative_stream

        with torch.no_grad():
            yield from speculative_stream(
                model, input_ids, attention_mask, max_new_tokens, sampling, eos, pad, generator, speculative, speculative_stats
            )
        return
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = model.new_cache(batch, input_ids.shape[1] + max_new_tokens) if use_cache else None
    tokens, mask, new_input = input_ids, attention_mask, input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            step_input = new_input if cache is not None else tokens
            logits = model(step_input, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]
            next_token = sample_next(logits, sampling, generator)
            next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
            yield next_token
            finished |= torch.isin(next_token, eos)
            new_input = next_token[:, None]
            tokens = torch.cat([tokens, new_input], dim=1)
            mask = torch.cat([mask, torch.ones_like(new_input)], dim=1)
            if bool(finished.all()):
                return


def generate(model: RecursiveModel, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """Prompts plus generated tokens, [batch, prompt_len + generated]; options as for ``stream``."""
    steps = list(stream(model, input_ids, **kwargs))  # type: ignore[arg-type]
    if not steps:
        return input_ids
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)
