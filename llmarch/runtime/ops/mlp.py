"""Feed-forward blocks: gated (SwiGLU / GeGLU, gate and up fused into one matmul) and plain
(GPT-2's GELU MLP), with optional biases."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.errors import LlmarchError

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation(name: str | None):
    fn = ACTIVATIONS.get(name or "silu")
    if fn is None:
        raise LlmarchError(f"activation {name!r} is not supported by llmarch run")
    return fn


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); `gate_up` holds [gate; up] so one matmul reads both."""

    def __init__(self, dim: int, hidden: int, act: str | None, bias: bool = False):
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return self.down(self.act(gate) * up)

    fused = {"gate_up": ("gate", "up")}


class PlainMLP(nn.Module):
    """down(act(up(x))): GPT-2."""

    def __init__(self, dim: int, hidden: int, act: str | None, bias: bool = True):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))

    fused: dict = {}
