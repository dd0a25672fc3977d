"""The one expert loop, and the stores that keep the routed experts on the model's device.

Every store computes the same way: tokens grouped by expert, one matmul pair per used expert
(expert_ffn), weighted and added back into the tokens' rows (expert_loop). A store only says where
one expert's weights come from (ExpertStore.expert): ResidentExperts indexes its stacked tensors,
QuantGPUExperts dequantizes, the host store (host.py) reads host RAM or its GPU copies of hot
experts, and hands quantized ones to moe_cpu.c instead.

Grouping reads the per-expert counts on the host, which a CUDA graph cannot hold. So on a GPU the
resident store computes a decode-sized call (tokens x k <= STATIC_ROWS) by routed_static instead:
fixed shapes, expert ids used on the device only, so the whole decode step can be captured.
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


# rows (tokens x experts per token) up to which a resident store on a GPU takes routed_static: a
# decode step (k rows) and the last few tokens of a prompt; the gathered-weights form copies each
# row's expert, so longer calls keep the grouped loop
STATIC_ROWS = 32
# routed_static through torch._grouped_mm where it fits, instead of gathered weights + bmm. Off: on
# an H200 (torch 2.11, one token, bf16, in a CUDA graph) the gathered form took 75.5 us per
# Qwen3-30B-A3B layer (E 128, top-8, d 2048, width 768) against 87.7, and 19.9 us against 49.0 on a
# small one (E 16, top-4, d 256, width 128): benchmarks/bench_moe_graph.py
GROUPED_MM = False


def routed_static(x, idx, w, gate_up, down, gate_up_bias, down_bias, act, weight_input: bool, grouped: bool):
    """The experts' weighted sum [T, d] of x [T, d] over idx, w [T, k] (as expert_loop) with no host
    read: every (token, expert) pair is one row, and the rows' shapes do not depend on the routing.
    grouped: rows sorted by expert through torch._grouped_mm (group ends from a device-side
    search, empty groups for the unused experts: only the used experts' weights are read);
    otherwise each row's expert weights gathered by device index and applied with bmm (any dtype
    and device). The k rows of a token are summed in the order the router gave them."""
    T, k = idx.shape
    flat, ws = idx.reshape(-1), w.reshape(-1, 1)
    if grouped:
        order = torch.argsort(flat, stable=True)
        experts = flat[order]
        ends = torch.searchsorted(experts, torch.arange(gate_up.shape[0], device=x.device), right=True)
        ends = ends.to(torch.int32)
        xs = x[order // k]
        if weight_input:
            xs = xs * ws[order].to(xs.dtype)
        gu = torch._grouped_mm(xs, gate_up.transpose(-2, -1), offs=ends)
        if gate_up_bias is not None:
            gu = gu + gate_up_bias[experts]
        y = torch._grouped_mm(act(gu), down.transpose(-2, -1), offs=ends)
        if down_bias is not None:
            y = y + down_bias[experts]
        y = torch.empty_like(y).index_copy_(0, order, y)  # back to (token, slot) order
    else:
        xs = x[:, None].expand(T, k, x.shape[-1]).reshape(T * k, -1)
        if weight_input:
            xs = xs * ws.to(xs.dtype)
        gu = torch.bmm(gate_up[flat], xs[:, :, None])[..., 0]
        if gate_up_bias is not None:
            gu = gu + gate_up_bias[flat]
        y = torch.bmm(down[flat], act(gu)[:, :, None])[..., 0]
        if down_bias is not None:
            y = y + down_bias[flat]
    if not weight_input:
        y = y * ws.to(y.dtype)
    return y.view(T, k, -1).sum(1)


def grouped_mm_fits(*mats: torch.Tensor) -> bool:
    """torch._grouped_mm's own kernel runs here: bf16 on an sm90/sm100 GPU, rows 16-byte aligned.
    Anywhere else it falls back to a loop over the groups that reads their ends on the host."""
    t = mats[0]
    if not t.is_cuda or not hasattr(torch, "_grouped_mm") or any(m.dtype != torch.bfloat16 for m in mats):
        return False
    if torch.cuda.get_device_capability(t.device)[0] not in (9, 10):
        return False
    return all(m.shape[-1] % 8 == 0 and m.shape[-2] % 8 == 0 for m in mats[1:])


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

    def forward(self, x, idx, w, act, weight_input: bool = False):
        if x.is_cuda and idx.numel() <= STATIC_ROWS:  # no host sync: a decode step stays capturable
            return self.static(x, idx, w, act, weight_input)
        return super().forward(x, idx, w, act, weight_input)

    def static(self, x, idx, w, act, weight_input: bool = False, grouped: bool | None = None):
        """routed_static over this store's weights; grouped: None picks torch._grouped_mm where its own
        kernel runs (see grouped_mm_fits), else the gathered-weights form."""
        if grouped is None:
            grouped = GROUPED_MM and grouped_mm_fits(x, self.gate_up, self.down)
        return routed_static(
            x, idx, w, self.gate_up, self.down, self.gate_up_bias, self.down_bias, act, weight_input, grouped
        )


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
