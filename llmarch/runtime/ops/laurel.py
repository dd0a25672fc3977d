"""LAuReL (learned augmented residual layer, Gemma 3n): a low-rank map beside the attention,
x + norm(right(left(x))), averaged with the attention residual by the block."""

from __future__ import annotations

import torch
from torch import nn

from llmarch.arch.spec import ArchSpec
from llmarch.runtime.ops.norms import make_norm


class Laurel(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        d, r = spec.hidden_size, int(spec.laurel_rank or 0)
        self.left = nn.Linear(d, r, bias=False)
        self.right = nn.Linear(r, d, bias=False)
        self.norm = make_norm("rms", d, spec.norm.eps, spec.norm.unit_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.right(self.left(x)))
