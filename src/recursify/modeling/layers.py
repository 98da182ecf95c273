"""The decoder layer shared across depths: attention + gated MLP, with per-visit LoRA and norms.

One compact implementation covers Llama/Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm), Gemma
((1+w) norms, GeGLU, embedding scale), Gemma2 (sandwich norms, attention soft-capping) and Gemma3
(sandwich + q/k norms, per-layer-type RoPE); families differ only through ArchConfig flags.

``SharedLayer.forward`` is the only place the block is wired, for the model, generation, healing
and the serving engine alike; where keys live (a contiguous per-depth cache, or the engine's paged
pool with one depth per row) is the ``AttentionCore`` handed in (modeling/attention.py).
"""

from __future__ import annotations

import torch
from torch import nn

from recursify.config import ArchConfig
from recursify.modeling.attention import AttentionCore, Depth, rope_at
from recursify.modeling.lora import DepthLinear, DepthRMSNorm, Visit, visit_rows
from recursify.modeling.prefix import DepthPrefix

# Norms that sit right before linears: their gains can be folded into those linears.
FOLDABLE_NORMS: dict[str, tuple[str, ...]] = {"attn_norm": ("q", "k", "v"), "mlp_norm": ("gate", "up")}


def norm_names(arch: ArchConfig) -> list[str]:
    """Per-layer norms this family has, by our names."""
    names = ["attn_norm", "mlp_norm"]
    if arch.sandwich_norms:
        names += ["post_attn_norm", "post_mlp_norm"]
    if arch.qk_norm:
        names += ["q_norm", "k_norm"]
    return names


def linear_shapes(arch: ArchConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every linear in a layer."""
    h, q_out, kv_out, ffn = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, arch.intermediate_size
    return {"q": (h, q_out), "k": (h, kv_out), "v": (h, kv_out), "o": (q_out, h), "gate": (h, ffn), "up": (h, ffn), "down": (ffn, h)}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [batch, seq, head_dim]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


class SharedLayer(nn.Module):
    """One unique layer. ``visits`` = how many depths it serves; norm slots are 1 (tied) or visits.

    ``relax`` (RecursionConfig.relax_kind) adds what differs per visit beyond the norms: LoRA
    ("lora"; with ``ranks``), fixed LoRA factors with a trainable r x r core ("lora-xs"), a bias
    vector on every linear ("bias"), or ``prefix_tokens`` learned keys/values ("prefix").
    """

    def __init__(
        self,
        arch: ArchConfig,
        visits: int,
        ranks: dict[str, int],
        norm_slots: dict[str, int],
        bias_delta: bool,
        relax: str = "lora",
        prefix_tokens: int = 0,
    ):
        super().__init__()
        self.arch = arch
        for name, (fan_in, fan_out) in linear_shapes(arch).items():
            has_bias = arch.attention_bias and name in ("q", "k", "v")
            per_visit_bias = bias_delta and (has_bias or relax == "bias")
            linear = DepthLinear(fan_in, fan_out, visits, ranks.get(name, 0), has_bias, per_visit_bias, fixed_factors=relax == "lora-xs")
            self.add_module(name, linear)
        for name in norm_names(arch):
            dim = arch.head_dim if name in ("q_norm", "k_norm") else arch.hidden_size
            self.add_module(name, DepthRMSNorm(dim, norm_slots[name], arch.rms_norm_eps, arch.norm_offset))
        self.prefix = DepthPrefix(visits, arch.num_kv_heads, prefix_tokens, arch.head_dim) if prefix_tokens else None

    def linear(self, name: str) -> DepthLinear:
        module = getattr(self, name)
        assert isinstance(module, DepthLinear)
        return module

    def norm(self, name: str) -> DepthRMSNorm:
        module = getattr(self, name)
        assert isinstance(module, DepthRMSNorm)
        return module

    def forward(self, h: torch.Tensor, visit: Visit, depth: Depth, attention: AttentionCore) -> torch.Tensor:
        """The block at ``depth``: h [batch, rows, hidden] -> [batch, queries, hidden].

        ``visit`` (int, [batch] or [batch, rows]) selects the per-depth LoRA/norms/prefix;
        ``depth`` (int, or [batch, rows] in the engine's depth-mixed batch) selects the RoPE
        table, the attention pattern and the KV slot, through ``attention`` (the core that knows
        where keys live, modeling/attention.py). The core stores keys/values for every row but
        returns attention outputs for the first ``queries`` rows only: rows after them (the
        engine's propagate fill rows: tokens that exited at an earlier loop and only need their
        keys/values at this depth) stop after the KV write, so they never pay for the
        o-projection and MLP. Everywhere else ``queries = rows``.
        """
        rope = rope_at(attention.rope, self.arch.layer_types, depth)  # (cos, sin) [batch, rows, head_dim] of each row's layer type
        q, k, v = self.project_qkv(self.norm("attn_norm")(h, visit), visit, rope)
        out = attention.attend(self, q, k, v, visit, depth)  # (batch, heads, queries, head_dim)
        batch, _, queries, _ = out.shape
        h, visit = h[:, :queries], visit_rows(visit, queries)  # from here on: the query rows only
        attn = self.linear("o")(out.transpose(1, 2).reshape(batch, queries, -1), visit)
        if self.arch.sandwich_norms:
            attn = self.norm("post_attn_norm")(attn, visit)
        h = h + attn
        mlp = self.mlp(self.norm("mlp_norm")(h, visit), visit)
        if self.arch.sandwich_norms:
            mlp = self.norm("post_mlp_norm")(mlp, visit)
        return h + mlp

    def project_qkv(
        self, x: torch.Tensor, visit: Visit, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values ([batch, heads, seq, head_dim]) with q/k norm and RoPE applied."""
        batch, seq, _ = x.shape
        arch = self.arch
        q = self.linear("q")(x, visit).view(batch, seq, arch.num_heads, arch.head_dim)
        k = self.linear("k")(x, visit).view(batch, seq, arch.num_kv_heads, arch.head_dim)
        v = self.linear("v")(x, visit).view(batch, seq, arch.num_kv_heads, arch.head_dim)
        if arch.qk_norm:
            q, k = self.norm("q_norm")(q, visit), self.norm("k_norm")(k, visit)
        cos, sin = rope
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (batch, heads, seq, head_dim)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (batch, kv_heads, seq, head_dim)
        return q, k, v.transpose(1, 2)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, visit: Visit) -> torch.Tensor:
        """Attention of q [b, heads, s, d] over the keys/values [b, kv_heads, kv, d] the core gathered for it.

        The one place the per-depth prefix (``--relax prefix:N``) joins the keys: after the core,
        since prefixes never enter a KV cache. mask: bool [b, 1, s, kv]; keys in the cache's dtype
        are cast to the queries' (the engine's pool may store another precision).
        """
        if self.prefix is not None:
            keys, values, mask = self.prefix.prepend(keys, values, mask, visit)
        return scaled_attention(q, keys.to(q.dtype), values.to(q.dtype), mask, self.arch.attn_scale, self.arch.attn_softcap)

    def mlp(self, x: torch.Tensor, visit: Visit) -> torch.Tensor:
        gate = self.linear("gate")(x, visit)
        gate = nn.functional.silu(gate) if self.arch.hidden_act == "silu" else nn.functional.gelu(gate, approximate="tanh")
        return self.linear("down")(gate * self.linear("up")(x, visit), visit)


def scaled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float | None
) -> torch.Tensor:
    """Grouped-query attention. q: [b, heads, s, d]; k, v: [b, kv_heads, kv, d]; mask: bool [b, 1, s, kv].

    Soft-capping (Gemma2) needs the raw scores, so it takes the explicit path; otherwise SDPA.
    Every query may attend at least to itself (see ``attention.build_masks``), so no row is fully masked.
    """
    if softcap is None:
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh((q @ k.transpose(-1, -2)) * scale / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
