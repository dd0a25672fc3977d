"""Gated short convolution (LFM2 / LFM3): a mixer whose whole state is a window of past inputs.

Per layer: x -> in_proj -> [B | C | h] (hidden_size each); u = B * h passes a causal depthwise
conv (kernel L = conv_L_cache, optional bias, no activation); y = C * conv(u) -> out_proj.

Two forms: `short_conv` (delta_rule.py, shared with the linear-attention mixers: one conv1d over
[the window | the whole prompt], no loop over tokens) for prefill, and `conv_step` for one decode
token (shift the window, one multiply-add per channel: what transformers' causal_conv1d_update
does). The window (the last L - 1 values of u, in the cache dtype) lives in the cache
(kv_cache.LinearState, the spec's short_conv sizes: one value head of hidden_size channels, no
recurrent matrix) and is updated in place, so a captured decode step stays valid.
"""

from __future__ import annotations

import torch
from torch import nn

from llmarch.arch.spec import ArchSpec, LayerSpec
from llmarch.errors import LlmarchError
from llmarch.runtime.ops.delta_rule import short_conv
from llmarch.runtime.ops.linear_common import linear_sizes, tensor_reader


def conv_step(window: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One token: u [B, C], window [B, C, K - 1] (the previous K - 1 inputs, updated in place),
    weight [C, 1, K]. Returns the causal conv's output [B, C]."""
    full = torch.cat([window.to(u.dtype), u[..., None]], dim=-1)  # [B, C, K]
    y = (full * weight[:, 0].to(u.dtype)).sum(-1)
    window.copy_(full[..., 1:])
    return y if bias is None else y + bias.to(y.dtype)


def prefill(window: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """T tokens at once: u [B, T, C] -> [B, T, C]; window as conv_step's."""

    def add_bias(y: torch.Tensor) -> torch.Tensor:  # y [B, C, T]
        return y if bias is None else y + bias[:, None].to(y.dtype)

    return short_conv(window, u, weight, add_bias)


class ShortConv(nn.Module):
    def __init__(self, spec: ArchSpec, layer: LayerSpec, rope=None):
        super().__init__()
        lin = linear_sizes(spec, layer, "short_conv", "short convolution")
        d = spec.hidden_size
        if lin.key_heads or lin.value_heads * lin.value_head_dim != d:
            raise LlmarchError(f"layer {layer.index}: a short convolution runs over the {d} hidden channels")
        self.index, self.d, self.kernel = layer.index, d, lin.conv_kernel
        self.in_proj = nn.Linear(d, 3 * d, bias=False)
        self.conv = nn.Parameter(torch.empty(d, 1, self.kernel))
        self.conv_bias: nn.Parameter | None = None
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        window = cache.linear[self.index].conv
        b, c, h = self.in_proj(x).chunk(3, dim=-1)
        u = b * h
        if x.shape[1] == 1:
            y = conv_step(window, u[:, 0], self.conv, self.conv_bias)[:, None]
        else:
            y = prefill(window, u, self.conv, self.conv_bias)
        return self.out(c * y)

    def load_from(self, source, prefix: str, dtype, device) -> None:
        """This layer's conv.* tensors (in_proj, conv, out_proj; biases where the config has conv_bias),
        checked against the spec's sizes."""
        base = f"{getattr(source, 'prefix', '')}layers.{self.index}.conv."
        read = tensor_reader(source, base, "short convolution", self.index)
        d = self.d
        put = lambda t: nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)  # noqa: E731
        self.in_proj.weight = put(read("in_proj.weight", (3 * d, d)))
        self.conv = put(read("conv.weight", (d, 1, self.kernel)))
        self.out.weight = put(read("out_proj.weight", (d, d)))
        for module, name, shape in ((self.in_proj, "in_proj", (3 * d,)), (self.out, "out_proj", (d,))):
            bias = read(f"{name}.bias", shape, required=False)
            if bias is not None:
                module.bias = put(bias)
        conv_bias = read("conv.bias", (d,), required=False)
        self.conv_bias = put(conv_bias) if conv_bias is not None else None
