"""Learned per-head query scaling by the log of the position (Mistral Large 4's softmax_scaling,
in its MLA attention and in its sparse-attention indexer).

The query of head h at position p is multiplied by s_h * log(p + 1) + b_h, s and b two learned
vectors of one entry per head (transformers initialises them to 0 and 1: no scaling until they are
loaded). A per-(head, position) factor on the query scales that query's scores alone, so it
commutes with RoPE and with MLA's absorbed decode.
"""

from __future__ import annotations

import torch
from torch import nn


class LogPositionQueryScale(nn.Module):
    def __init__(self, heads: int):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(heads))
        self.bias = nn.Parameter(torch.ones(heads))

    def forward(self, q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """q [B, H, T, D]; pos [T] absolute positions."""
        log_pos = (pos + 1).float().log().to(q.dtype)  # in float first, as the reference (no overflow)
        factor = self.scale.to(q.dtype)[:, None] * log_pos[None, :] + self.bias.to(q.dtype)[:, None]  # [H, T]
        return q * factor[..., None]
