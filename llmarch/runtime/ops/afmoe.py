"""Arcee Trinity (AfMoE) attention: per-head QK-norm, RoPE on sliding layers only (the spec marks
global layers NoPE), and an output gate: out = o(attn * sigmoid(gate_proj(x))) before o_proj.

Only the gate differs from ops/attention.py's Attention, but it sits inside its forward (between
attend and o), so the forward is repeated here rather than hooked into the shared class.
"""

from __future__ import annotations

import torch
from torch import nn

from llmarch.runtime.ops.attention import Attention, attend


class GatedAttention(Attention):
    def __init__(self, spec, layer, rope):
        super().__init__(spec, layer, rope)
        self.gate = nn.Linear(spec.hidden_size, self.heads * self.v_dim, bias=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        q = self.q_norm(q.view(B, T, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(B, T, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, self.v_dim).transpose(1, 2)
        if self.rope is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        lc = cache.layers[self.index]
        keys, values = lc.update(k, v)
        out = attend(q, keys.to(q.dtype), values.to(q.dtype), lc.group.mask, self.scale, self.softcap, self.sinks)
        out = out.transpose(1, 2).reshape(B, T, self.heads * self.v_dim)
        return self.o(out * torch.sigmoid(self.gate(x)))


def attention(spec, layer, rope):
    """Factory for "full"/"sliding" mixers: AfMoE's gated form, else the shared Attention."""
    return (GatedAttention if spec.family == "afmoe" else Attention)(spec, layer, rope)
