"""Low-rank token embeddings and output heads (``--embed-rank`` / ``--head-rank`` / ``--embed-params``).

A vocabulary matrix W [vocab, hidden] is stored as ``table @ basis`` (table [vocab, rank], basis
[rank, hidden]), so it costs rank * (vocab + hidden) parameters instead of vocab * hidden. The same
module serves both directions: ``forward(ids)`` looks rows up (the input embedding: gather rank
numbers per token, then one small matmul) and ``project(h)`` computes h W^T = (h basis^T) table^T
(the output head: hidden -> rank -> vocab, so every exit head costs rank * (vocab + hidden) per
token instead of vocab * hidden). How the factors are fitted is ``conversion/embedding_init.py``.

Which side owns what is ``embedding_layout``: at full rank ("full", the default) nothing changes
and the model keeps the original's dense ``nn.Embedding`` / ``nn.Linear`` tensors under their old
names, which is why a full-rank model reproduces the original bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recursify.config import ArchConfig, RecursionConfig
from recursify.errors import ConfigError


class FactorizedEmbedding(nn.Module):
    """W ~= table @ basis: token lookup (``forward``) and the head's logits (``project``)."""

    def __init__(self, vocab_size: int, hidden_size: int, rank: int):
        super().__init__()
        self.table = nn.Parameter(torch.empty(vocab_size, rank))
        self.basis = nn.Parameter(torch.empty(rank, hidden_size))

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq] ids -> [batch, seq, hidden] rows of table @ basis."""
        return nn.functional.embedding(input_ids, self.table) @ self.basis

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., vocab] logits h (table @ basis)^T, through the rank bottleneck."""
        return nn.functional.linear(nn.functional.linear(h, self.basis), self.table)

    def dense(self) -> torch.Tensor:
        """The represented matrix [vocab, hidden] (for analysis and tests; the model never forms it)."""
        return self.table @ self.basis


@dataclass(frozen=True)
class EmbeddingLayout:
    """What stores the input embedding and the output head.

    Attributes:
        input_rank: rank of the input embedding's factors; None = the dense original matrix.
        head: "input" (the head reuses the input side's tensors: a tied source kept tied),
            "dense" (its own [vocab, hidden] matrix) or "factorized" (its own factors).
        head_rank: rank of the head's own factors (head == "factorized"), else None.
    """

    input_rank: int | None
    head: str
    head_rank: int | None

    @property
    def factorized(self) -> bool:
        return self.input_rank is not None or self.head == "factorized"


def embedding_layout(arch: ArchConfig, recursion: RecursionConfig) -> EmbeddingLayout:
    """The layout ``recursion``'s embed_rank / head_rank give on ``arch`` (see RecursionConfig).

    Without ``head_rank`` the head follows the input side: a tied source stays tied (one matrix or
    one pair of factors serves both), an untied source gets its own head at the same rank. With
    ``head_rank`` the head has its own tensors at that rank (untied from the input side).

    Raises:
        ConfigError: a rank above min(vocab, hidden).
    """
    cap = min(arch.vocab_size, arch.hidden_size)
    input_rank = _rank(recursion.embed_rank, cap, "--embed-rank")
    if recursion.head_rank is None:
        if arch.tie_word_embeddings:
            return EmbeddingLayout(input_rank, "input", None)
        return EmbeddingLayout(input_rank, "dense" if input_rank is None else "factorized", input_rank)
    head_rank = _rank(recursion.head_rank, cap, "--head-rank")
    return EmbeddingLayout(input_rank, "dense" if head_rank is None else "factorized", head_rank)


def _rank(spec: int | str, cap: int, option: str) -> int | None:
    if spec == "full":
        return None
    assert isinstance(spec, int)  # RecursionConfig.__post_init__ admits "full" or a positive int only
    if spec > cap:
        raise ConfigError(f"{option} {spec} exceeds min(vocab, hidden) = {cap}; use a rank <= {cap}, or 'full' for the original matrix")
    return spec


def build_embedding(arch: ArchConfig, layout: EmbeddingLayout) -> tuple[nn.Module, nn.Module | None]:
    """(embed, lm_head) modules of ``layout``; lm_head is None when the head reuses the input side."""
    vocab, hidden = arch.vocab_size, arch.hidden_size
    embed: nn.Module = nn.Embedding(vocab, hidden) if layout.input_rank is None else FactorizedEmbedding(vocab, hidden, layout.input_rank)
    if layout.head == "input":
        return embed, None
    if layout.head == "dense":
        return embed, nn.Linear(hidden, vocab, bias=False)
    assert layout.head_rank is not None
    return embed, FactorizedEmbedding(vocab, hidden, layout.head_rank)
