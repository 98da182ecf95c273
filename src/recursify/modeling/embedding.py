"""Low-rank token embeddings and output heads (``--embed-rank`` / ``--head-rank`` / ``--embed-params``).

A vocabulary matrix W [vocab, hidden] is stored as ``table @ basis`` (table [vocab, rank], basis
[rank, hidden]), so it costs rank * (vocab + hidden) parameters instead of vocab * hidden. The same
module serves both directions: ``forward(ids)`` looks rows up (the input embedding: gather rank
numbers per token, then one small matmul) and ``project(h)`` computes h W^T = (h basis^T) table^T
(the output head: hidden -> rank -> vocab, so every exit head costs rank * (vocab + hidden) per
token instead of vocab * hidden). How the factors are fitted is ``conversion/embedding_init.py``.

``--embed-exact-rows N`` keeps the rows of the N tokens the calibration data uses most exact:
they are stored dense (``exact_rows`` [N, hidden], their token ids in the ``exact_ids`` buffer,
ascending) and replace the low-rank product's rows, in the lookup and in the head's logits alike.
Token use is Zipfian, so a few thousand dense rows cover nearly every occurrence and the rank
serves only the rare rows (a low-rank-plus-row-sparse matrix).

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
    """W ~= table @ basis, with optional exact rows: token lookup (``forward``) and the head's logits (``project``)."""

    exact_ids: torch.Tensor

    def __init__(self, vocab_size: int, hidden_size: int, rank: int, exact_rows: int = 0):
        super().__init__()
        self.table = nn.Parameter(torch.empty(vocab_size, rank))
        self.basis = nn.Parameter(torch.empty(rank, hidden_size))
        self.exact_rows: nn.Parameter | None = None
        if exact_rows:
            self.exact_rows = nn.Parameter(torch.empty(exact_rows, hidden_size))
            self.register_buffer("exact_ids", torch.zeros(exact_rows, dtype=torch.long))

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq] ids -> [batch, seq, hidden] rows of table @ basis (exact rows where kept)."""
        rows = nn.functional.embedding(input_ids, self.table) @ self.basis
        if self.exact_rows is None:
            return rows
        slot = torch.searchsorted(self.exact_ids, input_ids).clamp_(max=self.exact_ids.numel() - 1)
        kept = (self.exact_ids[slot] == input_ids).unsqueeze(-1)
        return torch.where(kept, nn.functional.embedding(slot, self.exact_rows).to(rows.dtype), rows)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., vocab] logits h (table @ basis)^T, through the rank bottleneck (exact rows' logits exact)."""
        logits = nn.functional.linear(nn.functional.linear(h, self.basis), self.table)
        if self.exact_rows is None:
            return logits
        return logits.index_copy(logits.dim() - 1, self.exact_ids, nn.functional.linear(h, self.exact_rows))

    def dense(self) -> torch.Tensor:
        """The represented matrix [vocab, hidden] (for analysis and tests; the model never forms it)."""
        matrix = self.table @ self.basis
        if self.exact_rows is not None:
            matrix = matrix.index_copy(0, self.exact_ids, self.exact_rows)
        return matrix


@dataclass(frozen=True)
class EmbeddingLayout:
    """What stores the input embedding and the output head.

    Attributes:
        input_rank: rank of the input embedding's factors; None = the dense original matrix.
        head: "input" (the head reuses the input side's tensors: a tied source kept tied),
            "dense" (its own [vocab, hidden] matrix) or "factorized" (its own factors).
        head_rank: rank of the head's own factors (head == "factorized"), else None.
        exact_rows: rows every factorised side keeps exact (``--embed-exact-rows``).
    """

    input_rank: int | None
    head: str
    head_rank: int | None
    exact_rows: int = 0

    @property
    def factorized(self) -> bool:
        return self.input_rank is not None or self.head == "factorized"


def embedding_layout(arch: ArchConfig, recursion: RecursionConfig) -> EmbeddingLayout:
    """The layout ``recursion``'s embed_rank / head_rank give on ``arch`` (see RecursionConfig).

    Without ``head_rank`` the head follows the input side: a tied source stays tied (one matrix or
    one pair of factors serves both), an untied source gets its own head at the same rank. With
    ``head_rank`` the head has its own tensors at that rank (untied from the input side).

    Raises:
        ConfigError: a rank above min(vocab, hidden), or more exact rows than the vocabulary has.
    """
    cap = min(arch.vocab_size, arch.hidden_size)
    input_rank = _rank(recursion.embed_rank, cap, "--embed-rank")
    exact = recursion.embed_exact_rows
    if exact > arch.vocab_size:
        raise ConfigError(f"--embed-exact-rows {exact} exceeds the vocabulary ({arch.vocab_size} tokens)")
    if recursion.head_rank is None:
        if arch.tie_word_embeddings:
            return EmbeddingLayout(input_rank, "input", None, exact)
        return EmbeddingLayout(input_rank, "dense" if input_rank is None else "factorized", input_rank, exact)
    head_rank = _rank(recursion.head_rank, cap, "--head-rank")
    return EmbeddingLayout(input_rank, "dense" if head_rank is None else "factorized", head_rank, exact)


def _rank(spec: int | str, cap: int, option: str) -> int | None:
    if spec == "full":
        return None
    assert isinstance(spec, int)  # RecursionConfig.__post_init__ admits "full" or a positive int only
    if spec > cap:
        raise ConfigError(f"{option} {spec} exceeds min(vocab, hidden) = {cap}; use a rank <= {cap}, or 'full' for the original matrix")
    return spec


def build_embedding(arch: ArchConfig, layout: EmbeddingLayout) -> tuple[nn.Module, nn.Module | None]:
    """(embed, lm_head) modules of ``layout``; lm_head is None when the head reuses the input side."""
    vocab, hidden, exact = arch.vocab_size, arch.hidden_size, layout.exact_rows
    embed: nn.Module = (
        nn.Embedding(vocab, hidden) if layout.input_rank is None else FactorizedEmbedding(vocab, hidden, layout.input_rank, exact)
    )
    if layout.head == "input":
        return embed, None
    if layout.head == "dense":
        return embed, nn.Linear(hidden, vocab, bias=False)
    assert layout.head_rank is not None
    return embed, FactorizedEmbedding(vocab, hidden, layout.head_rank, exact)
