"""Text in, text out: prompt encoding (left padding, chat template), streaming decode, precision.

The tensor-level generation lives in ``modeling.generation``; this module only adds the tokenizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from recursify.config import PRECISIONS, SamplingConfig, SpeculativeConfig
from recursify.errors import ConfigError
from recursify.modeling.generation import stream

if TYPE_CHECKING:
    from recursify.modeling.model import RecursiveModel
    from recursify.modeling.speculative import SpeculativeStats


def precision_context(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager[Any]:
    """fp32 (exact) or bf16 autocast (about 2x faster on CPUs with AVX-512 bf16)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    raise ConfigError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")


def require_tokenizer(model: RecursiveModel) -> Any:
    if model.tokenizer is None:
        raise ConfigError("this model has no tokenizer; convert it from a source that ships one (HF directory, GGUF or alias)")
    return model.tokenizer


def apply_chat_template(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """A conversation rendered by the tokenizer's chat template, ending where the assistant's reply starts.

    Encode the result with ``add_special_tokens=False``: the template already holds the special tokens.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat needs a tokenizer with a chat template; this one has none")
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def encode_prompts(tokenizer: Any, prompts: list[str], chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [batch, len] for prompts, left-padded to a common length.

    With ``chat`` each prompt becomes a single user turn of the tokenizer's chat template.
    """
    if not prompts:
        raise ConfigError("give at least one prompt")
    if chat:
        prompts = [apply_chat_template(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    encoded = [tokenizer(p, add_special_tokens=not chat)["input_ids"] for p in prompts]
    if any(len(ids) == 0 for ids in encoded):
        raise ConfigError("a prompt encodes to zero tokens; give non-empty prompts")
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
    return input_ids, mask


def stream_text(
    model: RecursiveModel,
    prompt: str,
    max_new_tokens: int = 32,
    sampling: SamplingConfig | None = None,
    chat: bool = False,
    precision: str = "fp32",
    use_cache: bool = True,
    speculative: SpeculativeConfig | None = None,
    speculative_stats: SpeculativeStats | None = None,
    exit: str = "none",
) -> Iterator[str]:
    """Yield the continuation of one prompt piece by piece, as the tokens arrive.

    ``speculative``: self-speculative decoding (same output, modeling/speculative.py); ``exit``: an
    early-exit rule (serving/exit_policy.py), served through the engine, which keeps the keys and
    values exited tokens need at deeper loops.
    """
    tokenizer = require_tokenizer(model)
    input_ids, mask = encode_prompts(tokenizer, [prompt], chat)
    tokens: list[int] = []
    shown = ""
    eos = set(model.arch.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    if exit != "none" and speculative is not None:
        raise ConfigError("--exit and --speculative are separate ways to skip loops; pick one")
    if exit != "none":
        steps: Iterator[int] = _engine_tokens(model, input_ids[0].tolist(), max_new_tokens, sampling, sorted(eos), precision, exit)
    else:
        steps = _model_tokens(
            model, input_ids, mask, max_new_tokens, sampling, sorted(eos), precision, use_cache, speculative, speculative_stats
        )
    for token in steps:
        if token in eos:
            return
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(shown) :]
            shown = text


def _model_tokens(
    model: RecursiveModel,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig | None,
    eos: list[int],
    precision: str,
    use_cache: bool,
    speculative: SpeculativeConfig | None,
    speculative_stats: SpeculativeStats | None,
) -> Iterator[int]:
    options = {"speculative": speculative, "speculative_stats": speculative_stats, "use_cache": use_cache}
    with precision_context(precision, model.device):
        for step in stream(model, input_ids, mask, max_new_tokens, sampling, eos_token_ids=eos, **options):  # type: ignore[arg-type]
            yield int(step[0])


def _engine_tokens(
    model: RecursiveModel,
    prompt: list[int],
    max_new_tokens: int,
    sampling: SamplingConfig | None,
    eos: list[int],
    precision: str,
    exit: str,
) -> Iterator[int]:
    from recursify.serving.engine import Engine

    engine = Engine(
        model, batching="depthwise", max_batch=1, exit=exit, precision=precision, max_kv_tokens=len(prompt) + max_new_tokens + 16
    )
    for output in engine.stream([prompt], max_new_tokens=max_new_tokens, sampling=sampling, stop_token_ids=eos):
        yield from output.new_token_ids


def generate_text(model: RecursiveModel, prompts: list[str], max_new_tokens: int = 32, **kwargs: Any) -> list[str]:
    """The continuation of each prompt (see ``stream_text`` for the options)."""
    return ["".join(stream_text(model, prompt, max_new_tokens, **kwargs)) for prompt in prompts]
