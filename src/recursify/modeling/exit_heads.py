"""Per-loop exit heads: what an early exit adds in front of the shared LM head.

Every loop end is an exit, and by default every exit reads its hidden state through the model's
own final norm and LM head (``RecursiveModel.head``). An early loop's residual stream is not yet
the last loop's, though, and the shared head was trained for the last. ``ExitHeads`` gives every
non-final loop b its own small map in front of the shared LM head:

    z_b = g_b * rmsnorm(h)            (its own norm gain, initialised to the final norm's)
    z_b' = z_b + U_b D_b z_b          (a rank-r residual adapter, U_b initialised to zero)
    logits_b = LM head(z_b')

so a fresh model's exits are exactly the shared head's. The last loop keeps the final norm, and
nothing here feeds back into the loop stack: training only these parameters (``uptrain
--exit-heads R --freeze-model``) leaves the final loop's output bit-for-bit unchanged. Cost per
token: 2 r hidden multiply-adds (rank 64 on SmolLM2: 74k, about 0.2% of one loop).
"""

from __future__ import annotations

import torch
from torch import nn

from recursify.modeling.lora import DepthRMSNorm, lora_delta


class ExitHeads(nn.Module):
    """Norm gains [loops - 1, hidden] and adapters D [loops - 1, r, hidden], U [loops - 1, hidden, r]."""

    def __init__(self, hidden: int, loops: int, rank: int, eps: float, offset: float):
        super().__init__()
        if loops < 2 or rank < 1:
            raise ValueError(f"exit heads need a model with loops >= 2 and a rank >= 1, got loops={loops}, rank={rank}")
        self.loops, self.rank = loops, rank
        self.norm = DepthRMSNorm(hidden, loops - 1, eps, offset)
        self.down = nn.Parameter(torch.randn(loops - 1, rank, hidden) * hidden**-0.5)
        self.up = nn.Parameter(torch.zeros(loops - 1, hidden, rank))

    def init_from(self, final_norm: DepthRMSNorm) -> None:
        """Start every loop's gain at the final norm's, so each exit initially equals the shared head."""
        with torch.no_grad():
            self.norm.weight.copy_(final_norm.weight[0].expand_as(self.norm.weight))

    def forward(self, h: torch.Tensor, loop: int) -> torch.Tensor:
        """h: [..., seq, hidden] at the end of (0-based, non-final) ``loop`` -> the LM head's input, same shape."""
        z = self.norm(h, loop)
        return z + lora_delta(z, self.down, self.up, loop).to(z.dtype)

    def extra_repr(self) -> str:
        return f"loops={self.loops}, rank={self.rank}"
