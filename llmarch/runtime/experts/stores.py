"""The one expert loop, and the stores that keep the routed experts on the model's device.

Every store computes the same way: tokens grouped by expert, one matmul pair per used expert
(expert_ffn), weighted and added back into the tokens' rows (expert_loop). A store only says where
one expert's weights come from (ExpertStore.expert): ResidentExperts indexes its stacked tensors,
QuantGPUExperts dequantizes, the host store (host.py) reads host RAM or its GPU copies of hot
experts, and hands quantized ones to moe_cpu.c instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.runtime.experts.formats import ExpertFormat, dequantize, quantize


def group_by_expert(idx: torch.Tensor, w: torch.Tensor, n: int | None = None):
    """(token rows sorted by expert, their weights, [(expert, start, end)] for the experts used).
    Ids >= n, a store's mark for "computed elsewhere", are left out. One host sync."""
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=1).cpu().tolist()
    segs, start = [], 0
    for e, c in enumerate(counts[:n]):
        if c:
            segs.append((e, start, start + c))
            start += c
    return order // idx.shape[1], w.flatten()[order], segs


def expert_ffn(xs, ws, gate_up, down, gate_up_bias, down_bias, act, weight_input: bool) -> torch.Tensor:
    """One expert over the rows routed to it; ws [n, 1] weights its input (Llama 4) or its output."""
    if weight_input:
        xs = xs * ws.to(xs.dtype)
    y = F.linear(act(F.linear(xs, gate_up, gate_up_bias)), down, down_bias)
    return y if weight_input else y * ws.to(y.dtype)


def expert_loop(
    x: torch.Tensor,
    rows: torch.Tensor,
    ws: torch.Tensor,
    segs: Iterable[tuple[int, int, int]],
    weights: Callable[[int], tuple],
    act,
    weight_input: bool,
) -> torch.Tensor:
    """The experts' weighted sum for the rows of x: for each (expert e, start, end) of segs, e's
    weights(e) = (gate_up, down, gate_up bias, down bias) over rows[start:end], weighted by
    ws[start:end] and added into those rows."""
    out = torch.zeros_like(x)
    for e, a, b in segs:
        r = rows[a:b]
        out.index_add_(0, r, expert_ffn(x[r], ws[a:b, None], *weights(e), act, weight_input))
    return out


def at(t: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if t is None else t[e]


class ExpertStore(nn.Module):
    """The routed experts of one layer: forward(x [T, d], expert ids [T, k], router weights [T, k],
    activation, weight_input) -> the experts' weighted sum [T, d]."""

    def expert(self, e: int) -> tuple:
        """(gate_up [2I, d] (up [I, d] alone when not gated), down [d, I], gate_up bias or None,
        down bias or None) of expert e."""
        raise NotImplementedError

    def forward(self, x, idx, w, act, weight_input: bool = False):
        return expert_loop(x, *group_by_expert(idx, w), self.expert, act, weight_input)


class ResidentExperts(ExpertStore):
    """Stacked float experts on the model's device."""

    def __init__(self, E: int, d: int, inter: int, bias: bool, gated: bool = True):
        super().__init__()
        rows = 2 * inter if gated else inter  # gate rows then up rows, or up rows alone (non-gated)
        self.gate_up = nn.Parameter(torch.empty(E, rows, d))
        self.down = nn.Parameter(torch.empty(E, d, inter))
        self.gate_up_bias = nn.Parameter(torch.empty(E, rows)) if bias else None
        self.down_bias = nn.Parameter(torch.empty(E, d)) if bias else None

    def load(self, gate_up, down, biases, dtype, device) -> ResidentExperts:
        """Take the checkpoint's stacked experts (and biases, or None) as this store's weights."""

        def put(t):
            return None if t is None else nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)

        self.gate_up, self.down = put(gate_up), put(down)
        self.gate_up_bias, self.down_bias = put(biases[0]), put(biases[1])
        return self

    def expert(self, e):
        return self.gate_up[e], self.down[e], at(self.gate_up_bias, e), at(self.down_bias, e)


class QuantGPUExperts(ExpertStore):
    """--experts gpu with 8/4-bit: quantized on the GPU, each used expert dequantized as it is needed."""

    def __init__(self, gate_up, down, biases, fmt: ExpertFormat, dtype, device):
        super().__init__()
        self.format, self.dtype = fmt, dtype
        self.q = [t.to(device) for t in (*quantize(gate_up, fmt), *quantize(down, fmt))]
        self.gate_up_bias = None if biases[0] is None else biases[0].to(device, dtype)
        self.down_bias = None if biases[1] is None else biases[1].to(device, dtype)

    def expert(self, e):
        gq, gs, dq, ds = self.q
        return (
            dequantize(gq[e], gs[e], self.format).to(self.dtype),
            dequantize(dq[e], ds[e], self.format).to(self.dtype),
            at(self.gate_up_bias, e),
            at(self.down_bias, e),
        )
