"""Expert stores that keep the routed experts on the model's device: float (resident) or quantized."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from llmarch.runtime.experts.formats import dequantize, quantize

if TYPE_CHECKING:
    from llmarch.runtime.experts.placement import Placement
    from llmarch.runtime.ops.moe import MoE


def group_by_expert(idx: torch.Tensor, w: torch.Tensor):
    """(sorted token rows, sorted weights, [(expert, start, end)]) for the experts used. One host sync."""
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=1).cpu().tolist()
    segs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            segs.append((e, start, start + c))
            start += c
    return order // idx.shape[1], w.flatten()[order], segs


def expert_ffn(xs, ws, gate_up, down, gate_up_bias, down_bias, act, weight_input: bool) -> torch.Tensor:
    """One expert over the rows routed to it; ws [n, 1] weights its input (Llama 4) or its output.
    Every expert store (resident, quantized GPU, offloaded CPU/GPU-hot) computes through this."""
    if weight_input:
        xs = xs * ws.to(xs.dtype)
    y = F.linear(act(F.linear(xs, gate_up, gate_up_bias)), down, down_bias)
    return y if weight_input else y * ws.to(y.dtype)


class ResidentExperts(nn.Module):
    """Stacked float experts on one device; grouped compute (one matmul pair per used expert)."""

    def __init__(self, E: int, d: int, inter: int, bias: bool):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(E, 2 * inter, d))
        self.down = nn.Parameter(torch.empty(E, d, inter))
        self.gate_up_bias = nn.Parameter(torch.empty(E, 2 * inter)) if bias else None
        self.down_bias = nn.Parameter(torch.empty(E, d)) if bias else None

    def forward(self, x, idx, w, act, weight_input: bool = False):
        out = torch.zeros_like(x)
        rows, ws, segs = group_by_expert(idx, w)
        for e, a, b in segs:
            r = rows[a:b]
            out.index_add_(0, r, expert_ffn(x[r], ws[a:b, None], self.gate_up[e], self.down[e],
                                            None if self.gate_up_bias is None else self.gate_up_bias[e],
                                            None if self.down_bias is None else self.down_bias[e], act, weight_input))
        return out


class QuantGPUExperts(ResidentExperts):
    """--experts gpu with 8/4-bit: quantized on the GPU, each used expert dequantized as it is needed."""

    def __init__(self, moe: MoE, gate_up, down, biases, place: Placement, dtype, device):
        nn.Module.__init__(self)
        self.bits, self.dtype = place.bits, dtype
        self.q = [t.to(device) for t in (*quantize(gate_up, place.bits), *quantize(down, place.bits))]
        self.gate_up_bias = None if biases[0] is None else biases[0].to(device, dtype)
        self.down_bias = None if biases[1] is None else biases[1].to(device, dtype)

    def forward(self, x, idx, w, act, weight_input: bool = False):
        out = torch.zeros_like(x)
        rows, ws, segs = group_by_expert(idx, w)
        gq, gs, dq, ds = self.q
        for e, a, b in segs:
            r = rows[a:b]
            out.index_add_(0, r, expert_ffn(x[r], ws[a:b, None], dequantize(gq[e], gs[e], self.bits).to(x.dtype),
                                            dequantize(dq[e], ds[e], self.bits).to(x.dtype),
                                            None if self.gate_up_bias is None else self.gate_up_bias[e],
                                            None if self.down_bias is None else self.down_bias[e], act, weight_input))
        return out
