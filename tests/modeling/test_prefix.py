"""Per-depth key/value prefixes: every visit-index form equals attention over that visit's own prefix."""

from __future__ import annotations

import torch

import recursify
from recursify.modeling.layers import scaled_attention
from recursify.modeling.model import RecursiveModel
from recursify.modeling.prefix import DepthPrefix
from tiny import tiny_model

VISITS, KV_HEADS, TOKENS, HEAD_DIM, HEADS = 3, 2, 4, 8, 4


def _prefix() -> DepthPrefix:
    prefix = DepthPrefix(VISITS, KV_HEADS, TOKENS, HEAD_DIM)
    with torch.no_grad():
        for param in prefix.parameters():
            param.copy_(torch.randn_like(param))
    return prefix


def _attend(prefix: DepthPrefix, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, visit: object) -> torch.Tensor:
    keys, values, full_mask = prefix.prepend(k, v, mask, visit)  # type: ignore[arg-type]
    return scaled_attention(q, keys, values, full_mask, HEAD_DIM**-0.5, None)


def _reference(prefix: DepthPrefix, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, visit: int) -> torch.Tensor:
    """Attention over [visit's prefix; real keys], the prefix visible to every query."""
    batch, _, queries, _ = q.shape
    keys = torch.cat([prefix.prefix_keys[visit].expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([prefix.prefix_values[visit].expand(batch, -1, -1, -1), v], dim=2)
    visible = torch.cat([torch.ones(batch, 1, queries, TOKENS, dtype=torch.bool), mask.expand(batch, 1, queries, -1)], dim=-1)
    return scaled_attention(q, keys, values, visible, HEAD_DIM**-0.5, None)


def test_prefix_visit_forms_match_per_visit_references() -> None:
    torch.manual_seed(0)
    prefix = _prefix()
    batch, queries, kv = 3, 5, 7
    q, k, v = (
        torch.randn(batch, HEADS, queries, HEAD_DIM),
        torch.randn(batch, KV_HEADS, kv, HEAD_DIM),
        torch.randn(batch, KV_HEADS, kv, HEAD_DIM),
    )
    mask = torch.rand(batch, 1, queries, kv) > 0.3
    mask[..., 0] = True
    for visit in range(VISITS):
        torch.testing.assert_close(_attend(prefix, q, k, v, mask, visit), _reference(prefix, q, k, v, mask, visit))
    rows = torch.tensor([2, 0, 1])
    per_row = torch.cat([_reference(prefix, q[i : i + 1], k[i : i + 1], v[i : i + 1], mask[i : i + 1], int(rows[i])) for i in range(batch)])
    torch.testing.assert_close(_attend(prefix, q, k, v, mask, rows), per_row)
    tokens = torch.randint(0, VISITS, (batch, queries))
    expected = torch.empty(batch, HEADS, queries, HEAD_DIM)
    for b in range(batch):
        for t in range(queries):
            one = _reference(
                prefix, q[b : b + 1, :, t : t + 1], k[b : b + 1], v[b : b + 1], mask[b : b + 1, :, t : t + 1], int(tokens[b, t])
            )
            expected[b, :, t] = one[0, :, 0]
    torch.testing.assert_close(_attend(prefix, q, k, v, mask, tokens), expected)


def _prefix_model() -> RecursiveModel:
    model = recursify.convert(tiny_model("gemma2", seed=2), loops=3, init="average", relax="prefix:3", progress=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "prefix" in name:
                param.copy_(torch.randn_like(param))
    return model


def test_prefix_model_decodes_with_the_kv_cache_as_without() -> None:
    """Prefixes are prepended after the cache (one slot per depth for real tokens only): both paths agree."""
    model = _prefix_model()
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: the prefix stays visible to padded rows too
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_ids=[])
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_ids=[], use_cache=False)
    assert torch.equal(cached, uncached)
