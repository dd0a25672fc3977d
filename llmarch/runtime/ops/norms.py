"""RMSNorm (optionally Gemma's (1 + w)) and LayerNorm, computed in float32 like the references."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.runtime import cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.unit_offset = eps, unit_offset
        self.weight_f32 = None  # the weight as forward multiplies by it, set once loaded (fold_unit_offset)
        self.weight_16 = None  # the same values in the weight's 16-bit dtype, where it holds them exactly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_f32
        if w is None:
            w = self.weight.float()
            if self.unit_offset:  # Gemma stores w around 0 and scales by (1 + w)
                w = w + 1.0
        if x.device.type == "cpu":  # one fused op: on the CPU each small op costs microseconds
            if x.dtype == torch.float32 and not x.requires_grad and cpu_kernels.available():
                return cpu_kernels.rms_norm(x, w, self.eps)  # torch's own is several ops, ~30x slower
        # one call (three ops) instead of seven: an eager prefill on a GPU is bound by op dispatch
        return F.rms_norm(x.float(), x.shape[-1:], w, self.eps).to(x.dtype)

    def fold_unit_offset(self) -> None:
        """After loading: keep (1 + w) in float32 so forward adds nothing (same values as computing it),
        and a float32 copy of a 16-bit weight beside it, so forward casts nothing (the weight itself
        keeps the model's dtype, which callers read); a weight still 16-bit (no offset folded) is also
        weight_16, the float32 copy's exact values."""
        if self.unit_offset:
            self.weight = nn.Parameter(self.weight.detach().float() + 1.0, requires_grad=False)
            self.unit_offset = False
        self.weight_f32 = self.weight.detach().float()
        # a kernel that reads the weight in every program (gemv_cuda's norm prologue) reads half the bytes
        if self.weight.dtype in (torch.bfloat16, torch.float16):
            self.weight_16 = self.weight.detach()


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float | None, unit_offset: bool = False) -> nn.Module:
    if kind == "layer":
        return LayerNorm(dim, eps if eps is not None else 1e-5)
    return RMSNorm(dim, eps if eps is not None else 1e-6, unit_offset)
