"""Feed-forward blocks: gated (SwiGLU / GeGLU, gate and up fused into one matmul) and plain
(GPT-2's GELU MLP), with optional biases; the gate's Gaussian top-k activation sparsity (Gemma 3n)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.errors import LlmarchError
from llmarch.runtime import cpu_kernels, gemv_cuda

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # squared ReLU (Nemotron-H's MLP and experts)
}


def activation(name: str | None):
    fn = ACTIVATIONS.get(name or "silu")
    if fn is None:
        raise LlmarchError(f"activation {name!r} is not supported by llmarch run")
    return fn


def normal_icdf(p: float) -> float:
    """The standard normal's quantile at p, computed in float32 as torch.distributions does."""
    v = torch.tensor(p, dtype=torch.float32, device="cpu")
    return float(torch.erfinv(2 * v - 1) * math.sqrt(2))


def gaussian_topk(g: torch.Tensor, std_multiplier: float) -> torch.Tensor:
    """Keep what lies above mean + std * multiplier of each row, shifted down by that cutoff: the
    fraction kept is what a normal distribution would leave above the chosen quantile."""
    m = torch.tensor(std_multiplier, dtype=g.dtype)
    cutoff = g.mean(dim=-1, keepdim=True) + g.std(dim=-1, keepdim=True, correction=0) * m
    return F.relu(g - cutoff)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); `gate_up` holds [gate; up] so one matmul reads both.

    sparsity: Gaussian top-k on the gate before the activation, keeping about 1 - sparsity of it.
    limit: gate clamped to at most limit and up to [-limit, limit] first (DeepSeek V4's shared expert)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        act: str | None,
        bias: bool = False,
        sparsity: float | None = None,
        limit: float | None = None,
    ):
        super().__init__()
        self.hidden, self.limit = hidden, limit
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)
        self.std_multiplier = normal_icdf(sparsity) if sparsity else None
        # one float32 token on the CPU (a decode step): act(gate) * up in one C call, the same bits
        # as cpu_decode's whole-step path; longer inputs keep torch's vectorized activations
        self.c_act = cpu_kernels.GATED_ACTS.get(act or "silu") if sparsity is None and limit is None else None
        # a CUDA decode step: silu(gate) * up as the gate|up GEMV's epilogue (gemv_cuda.gated_silu);
        # the switch read once here, so a compiled step's choice is guarded as a module attribute
        self.silu_glu = (
            (act or "silu") in ("silu", "swish") and sparsity is None and limit is None and gemv_cuda.fused_glu()
        )

    def forward(
        self, x: torch.Tensor, norm: nn.Module | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """down(act(gate) * up) of x, or (a pre-norm layer's one-token CUDA step, Block) of norm(x),
        plus residual: the norm as the gate|up GEMV's prologue and the add as the down GEMV's
        epilogue where the kernels take them, else the same modules one after another."""
        h = self.hidden_of(x, norm)
        return gemv_cuda.linear_add(h, self.down, residual) if residual is not None else self.down(h)

    def hidden_of(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """act(gate) * up of x, or of norm(x) (the norm in the gate|up GEMV's prologue where it
        can): down's input."""
        if self.silu_glu and isinstance(self.gate_up, gemv_cuda.DecodeLinear):
            h = gemv_cuda.gated_silu(x, self.gate_up.weight, self.gate_up.bias, norm)
            if h is not None:
                return h
        if norm is not None:  # the norm apart, then the product as without one
            return self.hidden_of(norm(x))
        gu = self.gate_up(x)
        if (
            self.c_act is not None
            and gu.numel() == 2 * self.hidden
            and gu.device.type == "cpu"
            and gu.dtype == torch.float32
            and not gu.requires_grad
            and cpu_kernels.available()
        ):
            return cpu_kernels.gated_act(gu, self.c_act)
        gate, up = gu.split(self.hidden, dim=-1)
        if self.std_multiplier is not None:
            gate = gaussian_topk(gate, self.std_multiplier)
        if self.limit is not None:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return self.act(gate) * up

    fused = {"gate_up": ("gate", "up")}
    takes_prenorm = True  # forward takes a pre-norm and the residual (Block's one-token CUDA step)


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
