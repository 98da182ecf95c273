"""Tiny random transformers models of every supported family: fast, download-free references."""

from __future__ import annotations

from typing import Any

import torch
import transformers

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")

_COMMON: dict[str, Any] = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_SLIDING = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention", "full_attention"]


def tiny_config(family: str, **overrides: Any) -> Any:
    """A small config of ``family`` exercising its distinctive features (windows, soft-caps, ...)."""
    kwargs: dict[str, Any] = dict(_COMMON)
    if family == "llama":
        kwargs.update(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
        cls = transformers.LlamaConfig
    elif family == "mistral":
        kwargs.update(sliding_window=5, tie_word_embeddings=False)
        cls = transformers.MistralConfig
    elif family == "qwen2":
        kwargs.update(tie_word_embeddings=True)
        cls = transformers.Qwen2Config
    elif family == "qwen3":
        kwargs.update(tie_word_embeddings=False)
        cls = transformers.Qwen3Config
    elif family == "gemma":
        kwargs.update(hidden_activation="gelu_pytorch_tanh")
        cls = transformers.GemmaConfig
    elif family == "gemma2":
        kwargs.update(
            sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, layer_types=_SLIDING
        )
        cls = transformers.Gemma2Config
    elif family == "gemma3_text":
        kwargs.update(sliding_window=4, query_pre_attn_scalar=24, layer_types=_SLIDING)
        cls = transformers.Gemma3TextConfig
    else:
        raise ValueError(family)
    kwargs.update(overrides)
    return cls(**kwargs)


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A float32 eager-attention model with all weights (norm gains included) randomised."""
    config = tiny_config(family, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                base = 0.0 if family.startswith("gemma") else 1.0
                param.copy_(base + 0.3 * noise)
            elif "bias" in name:
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)
    return model.eval()


def tiny_tokenizer() -> Any:
    """A character-level fast tokenizer whose ids fit the tiny models' vocabulary (97)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'-:;")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def save_tiny_checkpoint(directory: Any, family: str = "llama", seed: int = 0) -> Any:
    """A transformers checkpoint directory (weights + tokenizer) of a tiny random model."""
    model = tiny_model(family, seed)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return model


def device_under_test() -> torch.device:
    """Where device-independent tests put their models and tensors: ``$RECURSIFY_TEST_DEVICE`` (default cpu), e.g. cuda.

    scripts/gpu_check.sh sets it to run the parity, generation and export tests on a GPU; tests that
    honour it take the ``device`` fixture (tests/conftest.py).
    """
    import os

    device = torch.device(os.environ.get("RECURSIFY_TEST_DEVICE", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("RECURSIFY_TEST_DEVICE=cuda but torch sees no CUDA device (is the CUDA build of torch installed?)")
    return device
