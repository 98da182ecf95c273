"""log P(continuation | context), batched: the primitive behind multiple choice and the lm-eval adapter.

Tokenisation follows lm-evaluation-harness so scores are comparable with its numbers: trailing
whitespace of the context moves to the continuation, the pair is encoded as one string and split
where the context's own encoding ends, and an empty context is replaced by one BOS/EOS token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from recursify.errors import ConfigError
from recursify.modeling.model import RecursiveModel
from recursify.text import precision_context

DEFAULT_MAX_LENGTH = 2048

TokenPair = tuple[list[int], list[int]]


def model_max_length(model: RecursiveModel) -> int:
    """The source model's trained context length (``max_position_embeddings``), else 2048."""
    value = model.source.hf_config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_MAX_LENGTH


def prefix_token_id(model: RecursiveModel, tokenizer: Any) -> int:
    """The token that stands in for an empty context: BOS if the model has one, else EOS."""
    for candidate in (model.arch.bos_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, *model.arch.eos_token_ids):
        if candidate is not None:
            return int(candidate)
    raise ConfigError("this tokenizer has neither a BOS nor an EOS token to condition an empty context on")


def encode_pair(tokenizer: Any, context: str, continuation: str, prefix_token: int) -> TokenPair:
    """Context and continuation token ids, split the way lm-evaluation-harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [prefix_token], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_length = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    return whole[:context_length], whole[context_length:]


def continuation_logprobs(
    model: RecursiveModel,
    pairs: Sequence[TokenPair],
    max_length: int | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(log P(continuation | context), whether greedy decoding yields the continuation) for each pair.

    Sequences longer than ``max_length + 1`` lose context tokens from the left, as in lm-eval.
    Rows are sorted by length and left-padded, so every continuation ends at the last position
    and only ``max continuation length`` logits per row are computed.

    Raises:
        ConfigError: an empty continuation, or one longer than ``max_length``.
    """
    max_length = max_length or model_max_length(model)
    rows: list[tuple[list[int], int]] = []  # (input ids, continuation length)
    for context, continuation in pairs:
        if not continuation:
            raise ConfigError("a continuation encodes to zero tokens; every answer must be non-empty text")
        if len(continuation) > max_length:
            raise ConfigError(f"a continuation has {len(continuation)} tokens, more than the context length {max_length}")
        if not context:
            raise ConfigError("a context encodes to zero tokens; use encode_pair, which conditions empty contexts on BOS/EOS")
        full = (context + continuation)[-(max_length + 1) :]
        rows.append((full[:-1], len(continuation)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    pad = model.arch.pad_token_id if model.arch.pad_token_id is not None else 0
    with torch.no_grad(), precision_context(precision, model.device):
        for start in tqdm(range(0, len(order), batch_size), desc="loglikelihood", unit="batch", disable=not progress):
            chunk = order[start : start + batch_size]
            width = max(len(rows[i][0]) for i in chunk)
            keep = max(rows[i][1] for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, index in enumerate(chunk):
                ids = rows[index][0]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                mask[row, width - len(ids) :] = 1
            logits = model(input_ids.to(model.device), attention_mask=mask.to(model.device), logits_to_keep=keep).logits
            logprobs = logits.float().log_softmax(-1)  # (rows, keep, vocab)
            for row, index in enumerate(chunk):
                length = rows[index][1]
                targets = torch.tensor(pairs[index][1], device=logprobs.device)
                scored = logprobs[row, keep - length :]  # (length, vocab)
                total = float(scored.gather(-1, targets[:, None]).sum())
                results[index] = (total, bool((scored.argmax(-1) == targets).all()))
    return results
