"""Depth-indexed building blocks: a tied linear with one LoRA per visit, and a per-visit RMSNorm.

A shared layer is *visited* once per depth it serves (loop 0, loop 1, ...). Everything that may
differ between visits (LoRA pairs, bias residuals, norm gains) is stored stacked over visits and
selected by a visit index: an int (the whole batch sits at one depth), a LongTensor [batch] (one
depth per row: a serving batch that mixes loops) or a LongTensor [batch, seq] (one depth per token).
The tensor paths gather factors per row, or group tokens by visit (one matmul per visit present),
never a Python loop over rows or tokens.
"""

from __future__ import annotations

import torch
from torch import nn

Visit = int | torch.Tensor


def visit_rows(visit: Visit, rows: int) -> Visit:
    """The visit of the first ``rows`` tokens of each sequence (a per-token visit [batch, seq] is cut; others apply to any rows)."""
    return visit[:, :rows] if isinstance(visit, torch.Tensor) and visit.dim() == 2 else visit


class DepthLinear(nn.Module):
    """``y = x W'^T + b' + B_v M_v A_v x + delta_b_v`` with W', b' shared and the rest per visit.

    Shapes: weight [out, in]; lora_A [visits, r, in]; lora_B [visits, out, r]; bias_delta [visits, out].
    With ``fixed_factors`` (LoRA-XS), A and B are frozen buffers (stored, never trained) and the
    trainable part is ``lora_R`` [visits, r, r] between them; otherwise M_v = I and A, B train.
    """

    lora_A: torch.Tensor | None
    lora_B: torch.Tensor | None

    def __init__(
        self, in_features: int, out_features: int, visits: int, rank: int, bias: bool, bias_delta: bool, fixed_factors: bool = False
    ):
        super().__init__()
        self.in_features, self.out_features, self.visits, self.rank = in_features, out_features, visits, rank
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.lora_R = nn.Parameter(torch.zeros(visits, rank, rank)) if rank > 0 and fixed_factors else None
        a, b = torch.zeros(visits, rank, in_features), torch.zeros(visits, out_features, rank)
        if rank > 0 and fixed_factors:
            self.register_buffer("lora_A", a)
            self.register_buffer("lora_B", b)
        else:
            self.lora_A, self.lora_B = (nn.Parameter(a), nn.Parameter(b)) if rank > 0 else (None, None)
        self.bias_delta = nn.Parameter(torch.zeros(visits, out_features)) if bias_delta else None

    def forward(self, x: torch.Tensor, visit: Visit) -> torch.Tensor:
        """x: [batch, seq, in]; visit: int, LongTensor [batch] or [batch, seq]."""
        y = nn.functional.linear(x, self.weight, self.bias)
        if self.lora_A is not None and self.lora_B is not None:
            y = y + lora_delta(x, self.lora_A, self.lora_B, visit, self.lora_R)
        if self.bias_delta is not None:
            delta = self.bias_delta[visit]  # (out,), (batch, out) or (batch, seq, out)
            y = y + (delta[:, None, :] if isinstance(visit, torch.Tensor) and visit.dim() == 1 else delta)
        return y

    def extra_repr(self) -> str:
        xs = ", fixed factors" if self.lora_R is not None else ""
        return f"in={self.in_features}, out={self.out_features}, visits={self.visits}, rank={self.rank}{xs}"


def lora_delta(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, visit: Visit, mix: torch.Tensor | None = None) -> torch.Tensor:
    """The LoRA term ``B_v A_v x`` (``B_v M_v A_v x`` with a LoRA-XS ``mix``) at one visit for the batch, per row, or per token.

    x: [batch, seq, in]; lora_A: [visits, r, in]; lora_B: [visits, out, r]; mix: [visits, r, r] or None;
    visit: int, LongTensor [batch] or LongTensor [batch, seq]. The r x r ``mix`` is applied in
    the rank-r space between the two projections, where it costs r^2 per token.
    Per row, the factors are gathered ([batch, r, in]) for two bmm calls. Per token (a depth-mixed
    serving batch), gathering [r, in] per token would read more bytes than it computes, and
    projecting every token through every visit's A costs visits x the FLOPs; instead the tokens
    are grouped by visit, one pair of matmuls runs per visit present (at most B, however many
    tokens), and the results are scattered back (benchmarks/lora_gather.py measures all three).
    """
    if isinstance(visit, int):
        projected = x @ lora_A[visit].transpose(0, 1)
        if mix is not None:
            projected = projected @ mix[visit].transpose(0, 1)
        return projected @ lora_B[visit].transpose(0, 1)
    if visit.dim() == 1:
        a = lora_A[visit]  # (batch, r, in)
        b = lora_B[visit]  # (batch, out, r)
        projected = torch.bmm(x, a.transpose(1, 2))  # (batch, seq, r)
        if mix is not None:
            projected = torch.bmm(projected, mix[visit].transpose(1, 2))
        return torch.bmm(projected, b.transpose(1, 2))
    flat, visits = x.reshape(-1, x.shape[-1]), visit.reshape(-1)  # (tokens, in), (tokens,)
    order = torch.argsort(visits, stable=True)
    counts = torch.bincount(visits, minlength=lora_A.shape[0]).tolist()
    grouped = flat[order].split(counts)
    parts = [lora_delta(rows, lora_A, lora_B, v, mix) for v, rows in enumerate(grouped) if rows.shape[0]]
    delta = torch.empty(flat.shape[0], lora_B.shape[1], dtype=parts[0].dtype, device=x.device)
    delta[order] = torch.cat(parts)
    return delta.reshape(*x.shape[:-1], lora_B.shape[1])


class DepthRMSNorm(nn.Module):
    """RMSNorm whose gain is either tied (one slot) or kept per visit (one slot per visit).

    ``offset`` is 1.0 for Gemma's ``(1 + w)`` convention. The norm is computed in float32, as
    transformers does, so bf16 autocast does not change the statistics.
    """

    def __init__(self, dim: int, slots: int, eps: float, offset: float):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((slots, dim), 1.0 - offset))

    @property
    def per_visit(self) -> bool:
        return self.weight.shape[0] > 1

    def forward(self, x: torch.Tensor, visit: Visit = 0) -> torch.Tensor:
        """x: [batch, seq, (heads,) dim]; visit: int, LongTensor [batch] or [batch, seq]."""
        if not self.per_visit:
            gain = self.weight[0]
        elif isinstance(visit, int):
            gain = self.weight[visit]
        else:  # one gain per row or per token, broadcast over the dims visit does not cover
            gain = self.weight[visit]
            gain = gain.view(*gain.shape[:-1], *([1] * (x.dim() - visit.dim() - 1)), gain.shape[-1])
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (self.offset + gain.float())).type_as(x)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, slots={self.weight.shape[0]}, eps={self.eps}, offset={self.offset}"
