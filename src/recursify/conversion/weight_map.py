"""transformers checkpoints -> recursify: architecture flags and weight names, kept as data.

Adding a family means adding its flags in ``arch_from_hf`` and, if its per-layer names differ, a
key table; nothing in the model code changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from recursify.config import ArchConfig
from recursify.errors import UnsupportedModelError

LAYER_PREFIX = "model.layers.{}."

# our per-layer name -> transformers' name under LAYER_PREFIX
_COMMON_KEYS = {
    "q.weight": "self_attn.q_proj.weight",
    "k.weight": "self_attn.k_proj.weight",
    "v.weight": "self_attn.v_proj.weight",
    "o.weight": "self_attn.o_proj.weight",
    "gate.weight": "mlp.gate_proj.weight",
    "up.weight": "mlp.up_proj.weight",
    "down.weight": "mlp.down_proj.weight",
    "attn_norm": "input_layernorm.weight",
}
_PRE_NORM_KEYS = {**_COMMON_KEYS, "mlp_norm": "post_attention_layernorm.weight"}
_QKV_BIAS_KEYS = {"q.bias": "self_attn.q_proj.bias", "k.bias": "self_attn.k_proj.bias", "v.bias": "self_attn.v_proj.bias"}
_QK_NORM_KEYS = {"q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}
_SANDWICH_KEYS = {
    **_COMMON_KEYS,
    "post_attn_norm": "post_attention_layernorm.weight",
    "mlp_norm": "pre_feedforward_layernorm.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight",
}

LAYER_KEYS: dict[str, dict[str, str]] = {
    "llama": _PRE_NORM_KEYS,
    "mistral": _PRE_NORM_KEYS,
    "qwen2": {**_PRE_NORM_KEYS, **_QKV_BIAS_KEYS},
    "qwen3": {**_PRE_NORM_KEYS, **_QK_NORM_KEYS},
    "gemma": _PRE_NORM_KEYS,
    "gemma2": _SANDWICH_KEYS,
    "gemma3_text": {**_SANDWICH_KEYS, **_QK_NORM_KEYS},
}
SUPPORTED_FAMILIES = tuple(LAYER_KEYS)


@dataclass
class OriginalWeights:
    """The source model's weights by our names: globals plus one dict per original depth."""

    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor | None
    layers: list[dict[str, torch.Tensor]]
    rope_inv_freq: dict[str, torch.Tensor]


def _require_supported(hf_config: Any) -> str:
    family = getattr(hf_config, "model_type", None)
    if family not in LAYER_KEYS:
        raise UnsupportedModelError(f"unsupported model type {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    if family in ("llama", "mistral") and (getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False)):
        raise UnsupportedModelError(f"{family} with attention_bias/mlp_bias is not supported yet")
    if getattr(hf_config, "partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    return str(family)


def _layer_types(hf_config: Any, family: str) -> tuple[list[str], int | None]:
    layers = hf_config.num_hidden_layers
    window = getattr(hf_config, "sliding_window", None)
    if family == "mistral":  # Mistral applies its window (if any) to every layer
        return ["sliding_attention" if window else "full_attention"] * layers, window
    types = list(getattr(hf_config, "layer_types", None) or ["full_attention"] * layers)
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise UnsupportedModelError(f"unsupported attention layer types {sorted(unknown)}")
    return types, window if "sliding_attention" in types else None


def arch_from_hf(hf_config: Any) -> ArchConfig:
    """Translate a transformers config into our ArchConfig, refusing what we do not implement."""
    family = _require_supported(hf_config)
    gemma = family.startswith("gemma")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    layer_types, window = _layer_types(hf_config, family)
    act = getattr(hf_config, "hidden_activation", None) or hf_config.hidden_act
    if act not in ("silu", "gelu_pytorch_tanh"):
        raise UnsupportedModelError(f"unsupported activation {act!r}; supported: silu, gelu_pytorch_tanh")
    eos = hf_config.eos_token_id
    scalar = getattr(hf_config, "query_pre_attn_scalar", None)
    arch = ArchConfig(
        family=family,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        hidden_act="silu" if act == "silu" else "gelu_tanh",
        attention_bias=family == "qwen2",
        qk_norm=family in ("qwen3", "gemma3_text"),
        norm_offset=1.0 if gemma else 0.0,
        sandwich_norms=family in ("gemma2", "gemma3_text"),
        embed_scale=math.sqrt(hf_config.hidden_size) if gemma else 1.0,
        attn_scale=float(scalar) ** -0.5 if scalar else head_dim**-0.5,
        attn_softcap=getattr(hf_config, "attn_logit_softcapping", None),
        final_softcap=getattr(hf_config, "final_logit_softcapping", None),
        layer_types=layer_types,
        sliding_window=window,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
        bos_token_id=hf_config.bos_token_id,
        eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        pad_token_id=hf_config.pad_token_id,
    )
    arch.rope_scaling = {kind: rope_parameters(hf_config, kind)[1] for kind in arch.rope_kinds}
    return arch


def rope_parameters(hf_config: Any, layer_type: str) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2], cos/sin scale) for one layer type.

    The default rule is computed here; scaled variants (linear, llama3, yarn) reuse transformers'
    own initialisers. Length-dependent variants (dynamic, longrope) cannot be precomputed.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = hf_config.rope_parameters or {}
    per_type = layer_type in params
    spec = params[layer_type] if per_type else params
    rope_type = spec.get("rope_type", "default")
    if rope_type == "default":
        dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        inv_freq = 1.0 / (spec["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0
    if rope_type in ("dynamic", "longrope"):
        raise UnsupportedModelError(f"RoPE type {rope_type!r} is not supported (it depends on the sequence length)")
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu", layer_type=layer_type if per_type else None)
    return inv_freq.float(), float(scale)


def split_state_dict(hf_config: Any, state_dict: dict[str, torch.Tensor]) -> OriginalWeights:
    """Pick the source model's tensors out of a transformers state dict, checking names and shapes."""
    arch = arch_from_hf(hf_config)
    keys = LAYER_KEYS[arch.family]

    def take(name: str) -> torch.Tensor:
        if name not in state_dict:
            raise UnsupportedModelError(f"checkpoint has no tensor {name!r} expected for {arch.family}")
        return state_dict[name].detach().float()

    layers = [{ours: take(LAYER_PREFIX.format(i) + theirs) for ours, theirs in keys.items()} for i in range(arch.num_layers)]
    lm_head = None if arch.tie_word_embeddings else take("lm_head.weight")
    return OriginalWeights(
        embed=take("model.embed_tokens.weight"),
        final_norm=take("model.norm.weight"),
        lm_head=lm_head,
        layers=layers,
        rope_inv_freq={kind: rope_parameters(hf_config, kind)[0] for kind in arch.rope_kinds},
    )
