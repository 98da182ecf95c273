"""Per-depth learned key/value prefixes: the attention-only relaxation (``--relax prefix:N``).

Every visit (depth) of a shared layer owns N virtual tokens: keys and values per KV head that
are prepended to the keys/values of the real tokens at that depth, so each depth can steer its
attention without changing any weight. They stand for no input position:

- no RoPE is applied to them (a learned key needs no position: it is attended by content
  alone, equally from every query position, and survives any cache length);
- they never enter the KV cache, which keeps one slot per depth for real tokens only; they are
  prepended after the cache returns the keys so far, so prefill, decode and a serving batch that
  mixes depths all see the same N extra keys per depth.

Initialisation: keys and values are zero. A zero value adds nothing to the attention output;
a zero key scores 0 against every query, so the prefix only takes softmax mass
N / (N + sum_j exp(s_j)) away from the real keys. Pretrained models put very large scores on an
attention sink (the first token), so that share is small and the model starts close to the tied
model (measured in benchmarks/conversion_quality.py); a key pushed far negative would start
closer still but with a vanishing gradient, so it could hardly learn.
"""

from __future__ import annotations

import torch
from torch import nn

from recursify.modeling.lora import Visit


class DepthPrefix(nn.Module):
    """Keys and values [visits, kv_heads, tokens, head_dim] of every visit's prefix."""

    def __init__(self, visits: int, kv_heads: int, tokens: int, head_dim: int):
        super().__init__()
        self.prefix_keys = nn.Parameter(torch.zeros(visits, kv_heads, tokens, head_dim))
        self.prefix_values = nn.Parameter(torch.zeros(visits, kv_heads, tokens, head_dim))

    def prepend(
        self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, visit: Visit
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys/values [b, kv_heads, kv, d] and mask bool [b, 1, q, kv] with the prefixes in front.

        Every visit's prefix is prepended (visits x tokens extra keys) and the mask lets each query
        see its own visit's block only, so one code path serves a visit that is an int, one per row
        ([b]) or one per query token ([b, q]).
        """
        visits, kv_heads, tokens, head_dim = self.prefix_keys.shape
        batch = keys.shape[0]
        prefix_k = self.prefix_keys.transpose(0, 1).reshape(1, kv_heads, visits * tokens, head_dim).expand(batch, -1, -1, -1)
        prefix_v = self.prefix_values.transpose(0, 1).reshape(1, kv_heads, visits * tokens, head_dim).expand(batch, -1, -1, -1)
        owner = torch.arange(visits, device=keys.device).repeat_interleave(tokens)  # (visits * tokens,) visit of each prefix key
        if isinstance(visit, int):
            own = owner == visit  # (P,)
        elif visit.dim() == 1:
            own = owner == visit[:, None, None, None]  # (b, 1, 1, P)
        else:
            own = owner == visit[:, None, :, None]  # (b, 1, q, P)
        own = own.expand(*mask.shape[:-1], visits * tokens)
        return (
            torch.cat([prefix_k.to(keys.dtype), keys], dim=2),
            torch.cat([prefix_v.to(values.dtype), values], dim=2),
            torch.cat([own, mask], dim=-1),
        )
