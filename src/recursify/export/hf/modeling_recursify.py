"""RecursifyForCausalLM: recursify's RecursiveModel behind transformers' PreTrainedModel + GenerationMixin.

Copied verbatim into every ``recursify export --format transformers`` directory; ``config.json``'s
``auto_map`` points ``AutoModelForCausalLM`` here. The decoder itself is the installed recursify's
(imported, never copied). ``generate`` carries recursify's own per-depth KV cache (``RecursifyCache``):
the model declines transformers' DynamicCache, creates its cache on the first forward with
``use_cache`` and returns it as the output's ``cache``, which ``generate`` passes back every step.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from recursify.config import ArchConfig, RecursionConfig
from recursify.modeling.kv_cache import KVCache
from recursify.modeling.model import RecursiveModel

from .configuration_recursify import RecursifyConfig

# transformers 5 renamed the outputs' past_key_values to cache; use whichever this version has.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class RecursifyCache(KVCache):
    """recursify's KV cache (one slot per depth) that grows as generation appends tokens.

    Buffers double when full (amortised O(1) per token); ``reorder_cache`` follows beam search. The
    attributes transformers' ``generate`` reads of a cache are provided; it is not a
    ``transformers.Cache``, so no static-cache mask or compile path is taken.
    """

    is_compileable = False
    is_croppable = False
    is_linear = (False,)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(self, depth: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        needed = self.length + key.shape[2]
        if needed > self.max_len:
            self.max_len = max(needed, 2 * self.max_len)
            if self.keys is not None and self.values is not None:
                self.keys, self.values = self._grown(self.keys), self._grown(self.values)
        return super().update(depth, key, value)

    def _grown(self, buffer: torch.Tensor) -> torch.Tensor:
        grown = buffer.new_zeros(*buffer.shape[:3], self.max_len, buffer.shape[4])
        grown[:, :, :, : self.length] = buffer[:, :, :, : self.length]
        return grown

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the rows beam search selected (buffers are [depths, batch, kv_heads, max_len, head_dim])."""
        if self.keys is not None and self.values is not None:
            self.keys = self.keys.index_select(1, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(1, beam_idx.to(self.values.device))


class RecursifyForCausalLM(PreTrainedModel, GenerationMixin):
    """A recursify checkpoint as a transformers causal LM: ``from_pretrained``, ``generate``, lm-eval's ``hf`` model."""

    config_class = RecursifyConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["SharedLayer"]
    _supports_sdpa = True

    def __init__(self, config: RecursifyConfig):
        super().__init__(config)
        self.model = RecursiveModel(ArchConfig(**config.architecture), RecursionConfig(**config.recursion))
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model brings its own per-depth cache

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights always come from the exported safetensors; there is nothing to initialise."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: RecursifyCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids [batch, seq] (only the new tokens when ``cache`` holds the past); attention_mask [batch, past + seq]."""
        if cache is None and use_cache:
            arch = self.model.arch
            cache = RecursifyCache(self.model.num_depths, input_ids.shape[0], arch.num_kv_heads, arch.head_dim, input_ids.shape[1])
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, logits_to_keep=logits_to_keep)
        loss = None
        if labels is not None:  # next-token cross-entropy, -100 ignored (transformers' convention)
            shifted = out.logits[:, :-1].float().flatten(0, 1)
            loss = torch.nn.functional.cross_entropy(shifted, labels[:, 1:].flatten().to(shifted.device), ignore_index=-100)
        returned: dict[str, Any] = {_CACHE_FIELD: cache if use_cache else None}
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, **returned)
