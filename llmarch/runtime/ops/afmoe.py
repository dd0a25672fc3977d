"""Arcee Trinity (AfMoE) attention: per-head QK-norm, RoPE on sliding layers only (the spec marks
global layers NoPE), and an output gate: out = o(attn * sigmoid(gate_proj(x))) before o_proj.

Only the gate differs from ops/attention.py's Attention, whose forward applies `self.gate` when set.
"""

from __future__ import annotations

from torch import nn

from llmarch.runtime.ops.attention import Attention


class GatedAttention(Attention):
    def __init__(self, spec, layer, rope):
        super().__init__(spec, layer, rope)
        self.gate = nn.Linear(spec.hidden_size, self.heads * self.v_dim, bias=False)


def attention(spec, layer, rope):
    """Factory for "full"/"sliding" mixers: AfMoE's gated form, else the shared Attention."""
    return (GatedAttention if spec.family == "afmoe" else Attention)(spec, layer, rope)
